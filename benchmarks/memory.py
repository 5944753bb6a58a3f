"""GPU memory of an unlearning run on paper: computed from parameter counts, not measured.

For Stable Diffusion 1.5, SDXL-base, SD3-medium and FLUX.1-dev, each denoiser is built **on the
meta device** from its published config (no download, no memory), and so are the frozen text
encoders and VAE the job loads with it. The memory of the recipe (``siss.Unlearner``: the model
being trained, AdamW, the ``NormBalancer``'s forget-gradient buffer, the teacher) then follows
per mode, in bytes, with ``W`` the denoiser's parameters, ``P`` the trained ones, ``E`` the text
encoders' and VAE's, ``b`` the bytes per weight of what is stored frozen (2 in bf16, 4 in fp32)
and ``N`` the number of GPUs:

* LoRA: base ``b W`` + LoRA ``4P`` + gradients ``4P`` + AdamW ``8P`` + balancer ``4P`` + the
  teacher ``0`` (the base model with its adapters disabled, no copy) + ``b E``;
* full, DDP: weights ``4W`` (float32 master weights) + gradients ``4P`` + AdamW ``8P`` +
  balancer ``4P`` + teacher ``4W`` (``teacher_for`` deep-copies the float32 model) + DDP's
  reducer buckets ``4P`` when ``N > 1`` (``gradient_as_bucket_view=False``, torch's and
  accelerate's default) + ``b E``, the same on every GPU whatever ``N``;
* full, FSDP (full sharding; FSDP2's ``fully_shard``, whose gradients, forget buffer included,
  are reduce-scattered shards): ``(4W + 4P + 8P + 4P) / N`` + the teacher, counted as a full
  float32 replica ``4W`` (``teacher_for`` deep-copies the model it is given; what that copy holds
  under FSDP is untested, ``4W / N`` at best, ``teacher_sharded``) + ``b E``, plus the unit
  being gathered and the parameters outside every unit (``fsdp_units``).

Activations are left out (gradient checkpointing reduces them), as are the CUDA context, the
allocator's fragmentation, and transients such as the foreach AdamW step's temporaries. The
balancer's buffer lives on refresh steps only (every ``balance_every`` steps), from the forget
backward to ``NormBalancer.step``. Run from the repository root::

    python -m benchmarks.memory                 # rank 4, FSDP on 1, 2, 4 and 8 GPUs
    python -m benchmarks.memory --rank 16 --gpus 8 --models sdxl flux-dev
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from benchmarks.workloads import SD15_UNET
from siss.stable_diffusion.pipeline import LORA_TARGETS_OF

GIB = 2**30
DEFAULT_RANK = 4  # the SD job's --rank default (siss/stable_diffusion/cli.py)
DEFAULT_GPUS = (1, 2, 4, 8)

# --- published configs (the fields that differ from the classes' defaults) -------------------

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json
SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "cross_attention_dim": 2048,
    "attention_head_dim": (5, 10, 20),
    "transformer_layers_per_block": (1, 2, 10),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
# stabilityai/stable-diffusion-3-medium-diffusers, transformer/config.json
SD3_MEDIUM = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 192,
}
# black-forest-labs/FLUX.1-dev, transformer/config.json
FLUX_DEV = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
# openai/clip-vit-large-patch14's text tower: SD 1.x text_encoder, SDXL text_encoder, SD3
# text_encoder (with projection), FLUX text_encoder
CLIP_L = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
# laion/CLIP-ViT-bigG-14-laion2B-39B-b160k's text tower: SDXL and SD3 text_encoder_2
CLIP_BIGG = {
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}
# google/t5-v1_1-xxl's encoder: SD3 text_encoder_3, FLUX text_encoder_2
T5_XXL = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 32,
}
# the KL-f8 autoencoder of SD 1.x and SDXL (4 latent channels); SD3 and FLUX: 16, no quant convs
VAE_F8 = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
}
VAE_F8_16 = {**VAE_F8, "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False}

# the modules diffusers' LoRA training scripts wrap, which the SD job's --lora_targets default
# to per family (siss.stable_diffusion.pipeline.LORA_TARGETS_OF): train_text_to_image_lora.py and
# train_dreambooth_lora_sdxl.py (UNets), train_dreambooth_lora_sd3.py and
# train_dreambooth_lora_flux.py (their defaults without --lora_layers)
UNET_TARGETS = LORA_TARGETS_OF["sd"]
SD3_TARGETS = LORA_TARGETS_OF["sd3"]
FLUX_TARGETS = LORA_TARGETS_OF["flux"]


@dataclasses.dataclass(frozen=True)
class Part:
    """One model of a pipeline: its class name, config and role."""

    label: str
    cls: str
    config: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Family:
    """A pipeline: its denoiser, its frozen parts, the LoRA targets of diffusers' scripts and the
    published size of the denoiser (parameters, source)."""

    name: str
    denoiser: Part
    frozen: tuple[Part, ...]
    lora_targets: tuple[str, ...]
    published: tuple[float, str]  # (size the count is checked against, how it is published)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "sd15",
            Part("UNet", "UNet2DConditionModel", SD15_UNET),
            (
                Part("CLIP ViT-L text", "CLIPTextModel", CLIP_L),
                Part("VAE", "AutoencoderKL", VAE_F8),
            ),
            UNET_TARGETS,
            (860e6, "860M (CompVis/stable-diffusion model card)"),
        ),
        Family(
            "sdxl",
            Part("UNet", "UNet2DConditionModel", SDXL_UNET),
            (
                Part("CLIP ViT-L text", "CLIPTextModel", CLIP_L),
                Part("OpenCLIP bigG text", "CLIPTextModelWithProjection", CLIP_BIGG),
                Part("VAE", "AutoencoderKL", VAE_F8),
            ),
            UNET_TARGETS,
            (2.57e9, "2.6B (SDXL paper, Table 1)"),
        ),
        Family(
            "sd3-medium",
            Part("MMDiT", "SD3Transformer2DModel", SD3_MEDIUM),
            (
                Part("CLIP ViT-L text", "CLIPTextModelWithProjection", CLIP_L),
                Part("OpenCLIP bigG text", "CLIPTextModelWithProjection", CLIP_BIGG),
                Part("T5-XXL encoder", "T5EncoderModel", T5_XXL),
                Part("VAE", "AutoencoderKL", VAE_F8_16),
            ),
            SD3_TARGETS,
            (2.03e9, "2B (SD3-medium model card)"),
        ),
        Family(
            "flux-dev",
            Part("transformer", "FluxTransformer2DModel", FLUX_DEV),
            (
                Part("CLIP ViT-L text", "CLIPTextModel", CLIP_L),
                Part("T5-XXL encoder", "T5EncoderModel", T5_XXL),
                Part("VAE", "AutoencoderKL", VAE_F8_16),
            ),
            FLUX_TARGETS,
            (11.9e9, "12B (FLUX.1-dev model card)"),
        ),
    )
}
# published sizes of the frozen parts (parameters) the counts are checked against
PUBLISHED_FROZEN = {
    "CLIP ViT-L text": 123e6,  # SD v1 model card: "123M text encoder"
    "OpenCLIP bigG text": 695e6,  # SDXL paper: "OpenCLIP ViT-bigG ... 694M parameters"
    "T5-XXL encoder": 4.76e9,  # the encoder half of T5 v1.1 XXL (11B)
    "VAE": 84e6,  # the KL-f8 autoencoder, 83.7M
}


def build(part: Part, device: torch.device | str = "meta") -> nn.Module:
    """``part``'s model from its config, on ``device`` (meta: shapes only, no memory)."""
    import diffusers
    import transformers

    if hasattr(diffusers, part.cls):
        cls = getattr(diffusers, part.cls)
        with torch.device(device):
            return cls(**part.config)
    cls = getattr(transformers, part.cls)
    config_cls = transformers.T5Config if part.cls.startswith("T5") else transformers.CLIPTextConfig
    with torch.device(device):
        return cls(config_cls(**part.config))


def count(model: nn.Module, *, trainable: bool = False) -> int:
    """Parameters of ``model`` (the ones that require grad with ``trainable``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def lora_parameters(model: nn.Module, rank: int, targets: Iterable[str]) -> int:
    """Parameters of a PEFT LoRA of ``rank`` on ``targets``, put on ``model`` in place (as the
    job does: ``add_adapter`` on the frozen denoiser, on its own device, meta included)."""
    from peft import LoraConfig

    device = next(model.parameters()).device
    model.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets))
    with torch.device(device):
        model.add_adapter(config)
    return count(model, trainable=True)


def fsdp_units(model: nn.Module) -> tuple[int, int]:
    """(largest FSDP unit, parameters outside every unit) when each module of a class in the
    model's ``_no_split_modules`` is wrapped (accelerate's transformer-based policy by default).

    A unit's own parameters exclude those of units nested in it; the rest stay with the root,
    which FSDP gathers for the whole forward (and again for the backward).
    """
    classes = set(getattr(model, "_no_split_modules", None) or ())
    wrapped = [m for m in model.modules() if type(m).__name__ in classes]
    inside: set[int] = set()
    largest = 0
    for unit in wrapped:
        nested = {
            id(p) for m in unit.modules() if m is not unit and m in wrapped for p in m.parameters()
        }
        own = [p for p in unit.parameters() if id(p) not in nested]
        largest = max(largest, sum(p.numel() for p in own))
        inside.update(id(p) for p in own)
    root = sum(p.numel() for p in model.parameters() if id(p) not in inside)
    return largest, root


@dataclasses.dataclass(frozen=True)
class Counts:
    """The parameter counts of one pipeline the formula needs."""

    name: str
    denoiser: int  # W: all parameters of the denoiser (without LoRA)
    lora: int  # P of the LoRA of diffusers' scripts at the rank asked for
    frozen: dict[str, int]  # text encoders and VAE, by label
    largest_unit: int
    root: int

    @property
    def encoders(self) -> int:
        return sum(self.frozen.values())


@functools.cache
def _frozen_count(family: str, index: int) -> int:
    part = FAMILIES[family].frozen[index]
    return count(build(part))


def counts(name: str, rank: int = DEFAULT_RANK) -> Counts:
    """Every count of family ``name``, from models built on the meta device."""
    family = FAMILIES[name]
    denoiser = build(family.denoiser)
    total = count(denoiser)
    largest, root = fsdp_units(denoiser)
    lora = lora_parameters(denoiser, rank, family.lora_targets)
    frozen = {part.label: _frozen_count(name, i) for i, part in enumerate(family.frozen)}
    return Counts(name, total, lora, frozen, largest, root)


@dataclasses.dataclass(frozen=True)
class Memory:
    """Bytes per GPU of one mode, term by term (activations excluded)."""

    weights: float
    gradients: float
    adam: float
    balancer: float
    teacher: float
    buckets: float  # DDP's reducer buckets (N > 1)
    encoders: float  # text encoders and VAE

    @property
    def total(self) -> float:
        return sum(dataclasses.astuple(self))


MODES = ("lora", "ddp", "fsdp")


def memory(
    mode: str,
    *,
    denoiser: int,
    trainable: int,
    encoders: int,
    frozen_bytes: int = 2,
    gpus: int = 1,
    teacher: bool = True,
    teacher_sharded: bool = False,
) -> Memory:
    """The formula: bytes per GPU of ``mode`` (``"lora"``, ``"ddp"`` or ``"fsdp"``).

    Args:
        denoiser: ``W``, the denoiser's parameters (without LoRA).
        trainable: ``P``, the trained parameters (the LoRA's; ``W`` for a full fine-tune).
        encoders: ``E``, the frozen text encoders' and VAE's parameters.
        frozen_bytes: ``b``, bytes per stored frozen weight (2: bf16/fp16, 4: fp32).
        gpus: ``N``.
        teacher: the teacher keep target (``siss.Unlearner``'s default for SISS); the SD job's
            default is the noise target, which has none.
        teacher_sharded: FSDP only: the teacher copy is itself wrapped in FSDP.

    Examples:
        >>> memory("ddp", denoiser=10, trainable=10, encoders=0).total  # 4+4+8+4 and 4 (teacher)
        240.0
        >>> memory("lora", denoiser=10, trainable=1, encoders=0).total  # 2*10 + 20*1
        40.0
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus}")
    p = float(trainable)
    frozen = float(frozen_bytes * encoders)
    if mode == "lora":  # LoRA weights in float32 (the job casts them), the base stored frozen
        weights = frozen_bytes * denoiser + 4 * p
        return Memory(weights, 4 * p, 8 * p, 4 * p, 0.0, 4 * p if gpus > 1 else 0.0, frozen)
    copy = 4.0 * denoiser if teacher else 0.0  # teacher_for deep-copies the float32 model
    if mode == "ddp":
        buckets = 4 * p if gpus > 1 else 0.0
        return Memory(4.0 * denoiser, 4 * p, 8 * p, 4 * p, copy, buckets, frozen)
    n = float(gpus)
    teacher_bytes = copy / n if teacher_sharded else copy
    return Memory(4 * denoiser / n, 4 * p / n, 8 * p / n, 4 * p / n, teacher_bytes, 0.0, frozen)


def rows(c: Counts, gpus: Sequence[int] = DEFAULT_GPUS) -> list[tuple[str, int, Memory, Memory]]:
    """(mode label, N, memory with bf16 frozen parts, with fp32) for each mode of ``c``."""
    out = []

    def both(mode: str, trainable: int, n: int) -> tuple[Memory, Memory]:
        kwargs = {"denoiser": c.denoiser, "trainable": trainable, "encoders": c.encoders}
        return tuple(memory(mode, frozen_bytes=b, gpus=n, **kwargs) for b in (2, 4))  # type: ignore[return-value]

    out.append(("LoRA, 1 GPU", 1, *both("lora", c.lora, 1)))
    out.append(("full, DDP (any N > 1)", 2, *both("ddp", c.denoiser, 2)))
    for n in gpus:
        out.append((f"full, FSDP N={n}", n, *both("fsdp", c.denoiser, n)))
    return out


def _gib(value: float) -> str:
    return f"{value / GIB:.2f}"


def _params(value: float) -> str:
    return f"{value / 1e9:.3f}B" if value >= 1e9 else f"{value / 1e6:.2f}M"


def parameter_table(all_counts: Sequence[Counts], rank: int) -> list[str]:
    lines = [
        f"| model | denoiser W | published | LoRA r{rank} | text encoders + VAE E | "
        "largest FSDP unit | outside units |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in all_counts:
        _, published = FAMILIES[c.name].published
        frozen = " + ".join(f"{label} {_params(v)}" for label, v in c.frozen.items())
        lines.append(
            f"| {c.name} | {_params(c.denoiser)} | {published} | {_params(c.lora)} | "
            f"{frozen} = {_params(c.encoders)} | "
            f"{_params(c.largest_unit)} | {_params(c.root)} |"
        )
    return lines


def memory_table(all_counts: Sequence[Counts], gpus: Sequence[int]) -> list[str]:
    lines = [
        "| model | mode | weights | gradients | AdamW | balancer | teacher | DDP buckets | "
        "text enc. + VAE | total, frozen bf16 | total, frozen fp32 | without teacher, bf16 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in all_counts:
        for label, _, bf16, fp32 in rows(c, gpus):
            weights = (
                f"{_gib(bf16.weights)} / {_gib(fp32.weights)}"
                if bf16.weights != fp32.weights
                else _gib(bf16.weights)
            )
            lines.append(
                f"| {c.name} | {label} | {weights} | {_gib(bf16.gradients)} | {_gib(bf16.adam)} | "
                f"{_gib(bf16.balancer)} | {_gib(bf16.teacher)} | {_gib(bf16.buckets)} | "
                f"{_gib(bf16.encoders)} / {_gib(fp32.encoders)} | **{_gib(bf16.total)}** | "
                f"{_gib(fp32.total)} | {_gib(bf16.total - bf16.teacher)} |"
            )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=DEFAULT_RANK, help="LoRA rank (default 4)")
    parser.add_argument(
        "--gpus", type=int, nargs="+", default=list(DEFAULT_GPUS), help="FSDP's N (1 2 4 8)"
    )
    parser.add_argument(
        "--models", nargs="+", choices=tuple(FAMILIES), default=list(FAMILIES), metavar="MODEL"
    )
    args = parser.parse_args(argv)
    if args.rank < 1 or min(args.gpus) < 1:
        parser.error("--rank and --gpus must be >= 1")
    all_counts = [counts(name, args.rank) for name in args.models]
    print("Parameters (counted on the meta device from the published configs):\n")
    print("\n".join(parameter_table(all_counts, args.rank)))
    print(
        "\nMemory per GPU, GiB (2^30 bytes), COMPUTED, NOT MEASURED; activations, CUDA context "
        "and allocator fragmentation excluded. LoRA weights: frozen base bf16 / fp32 + LoRA "
        "fp32; the balancer's buffer exists on refresh steps only; the teacher is the teacher "
        "keep target's (the SD job's default noise target has none: last column).\n"
    )
    print("\n".join(memory_table(all_counts, args.gpus)))
    print("\nFSDP: add one gathered unit (bf16) and the prefetched next one:")
    for c in all_counts:
        print(
            f"  {c.name}: largest unit {_params(c.largest_unit)} = "
            f"{_gib(2 * c.largest_unit)} GiB in bf16; parameters outside every unit "
            f"{_params(c.root)} = {_gib(2 * c.root)} GiB, gathered for the whole step"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
