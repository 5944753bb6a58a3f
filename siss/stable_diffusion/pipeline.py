"""The diffusers pipeline the job works on: loading it, its dtype, its denoiser and its LoRA.

Any text-to-image pipeline of the families ``siss.adapters`` covers (SD 1.x/2.x, SDXL, SD3,
Flux; a hub id or a local folder) is loaded with ``DiffusionPipeline.from_pretrained`` in the
``--dtype`` asked for, without the safety checker (it would black out images before the split
sees them), and with the paper's DDIM sampler where the pipeline's scheduler is a DDPM-style one
(a flow-matching model, SD3 or Flux, keeps its ``FlowMatchEulerDiscreteScheduler``). Its
denoiser (``pipe.unet``, or ``pipe.transformer`` for SD3 and Flux) is the model that is
fine-tuned, through a PEFT LoRA on the modules diffusers' LoRA training script of its family
wraps (``LORA_TARGETS_OF``) unless ``--full``. A pipeline the job cannot use (no text encoder,
no module the LoRA can wrap, a ``--resolution`` it cannot generate) is refused with the flag
named before any image is generated.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Any

import torch

from siss._cli import FlagError
from siss._optional import needs
from siss.loop import derived_seed
from siss.stable_diffusion.files import read_json

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # diffusers' train_text_to_image_lora.py
# train_dreambooth_lora_sd3.py's default target modules (the joint attention's both streams)
SD3_LORA_TARGETS = (
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "attn.to_k",
    "attn.to_out.0",
    "attn.to_q",
    "attn.to_v",
)
# train_dreambooth_lora_flux.py's default --lora_layers (attention and both feed-forwards)
FLUX_LORA_TARGETS = (
    "attn.to_k",
    "attn.to_q",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
)
# The default --lora_targets per family (SDXL: train_text_to_image_lora_sdxl.py's, SD 1.x's).
LORA_TARGETS_OF = {
    "sd": LORA_TARGETS,
    "sdxl": LORA_TARGETS,
    "sd3": SD3_LORA_TARGETS,
    "flux": FLUX_LORA_TARGETS,
}


def family_of_classes(denoiser_class: str, addition_embed_type: str | None = None) -> str:
    """``"sd" | "sdxl" | "sd3" | "flux"`` of a denoiser's class name (and, for a UNet, its
    ``addition_embed_type``: SDXL's is ``"text_time"``). A transformer that is not Flux's is
    taken as SD3's (its attention modules have SD3's names)."""
    if "Flux" in denoiser_class:
        return "flux"
    if "Transformer" in denoiser_class:
        return "sd3"
    return "sdxl" if addition_embed_type == "text_time" else "sd"


def family_of(pipe: Any) -> str:
    """The family of a loaded pipeline, from its denoiser (``family_of_classes``)."""
    _, denoiser = denoiser_of(pipe)
    config = getattr(denoiser, "config", None)
    embed = config.get("addition_embed_type") if config is not None else None
    return family_of_classes(type(denoiser).__name__, embed)


def resolve_lora_targets(args: argparse.Namespace) -> None:
    """``--lora_targets`` left out: the family's default (``LORA_TARGETS_OF``), read from the
    pipeline's ``model_index.json`` (a local folder's, or the hub's through diffusers), so that
    ``config.json`` records the modules before the pipeline is loaded. Where the index cannot be
    read it stays ``None`` here and ``load_pipeline`` reports why; ``add_lora`` and
    ``check_lora_targets`` then take the loaded denoiser's family."""
    if args.lora_targets is not None:
        return
    model = args.pretrained_model_name_or_path
    index_path = Path(model).expanduser() / "model_index.json"
    try:
        if index_path.is_file():
            index = read_json(index_path)
        else:
            with needs("siss-stable-diffusion"):
                from diffusers import DiffusionPipeline

            index = DiffusionPipeline.load_config(model)
    except (OSError, ValueError):
        return
    entries = [index.get(key) for key in ("transformer", "unet")]
    names = [e[1] for e in entries if isinstance(e, list | tuple) and len(e) == 2 and e[1]]
    name = str(names[0]) if names else ""
    embed = None
    folder = Path(model).expanduser() / "unet" / "config.json"
    if "Transformer" not in name and folder.is_file():
        embed = read_json(folder).get("addition_embed_type")
    args.lora_targets = list(LORA_TARGETS_OF[family_of_classes(name, embed)])


def lora_targets(denoiser: torch.nn.Module, args: argparse.Namespace) -> list[str]:
    """``--lora_targets``, or the denoiser's family's default where it was not resolved."""
    if args.lora_targets is not None:
        return list(args.lora_targets)
    embed = denoiser.config.get("addition_embed_type") if hasattr(denoiser, "config") else None
    return list(LORA_TARGETS_OF[family_of_classes(type(denoiser).__name__, embed)])


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``--dtype``: ``auto`` is bfloat16 on a GPU that has it, float16 on other GPUs, float32
    on the CPU (half precision there is slow and not what the tests measure)."""
    if name != "auto":
        return getattr(torch, name)
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def mixed_precision_of(args: argparse.Namespace, dtype: torch.dtype) -> str:
    """accelerate's ``mixed_precision`` of ``--mixed-precision``; ``auto`` follows the dtype of
    the pipeline, so that the trained float32 weights meet activations of that dtype."""
    if args.mixed_precision != "auto":
        return args.mixed_precision
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")


def check_model_index(model: str) -> None:
    """A local pipeline without a text encoder is refused before its weights are read."""
    index = Path(model).expanduser() / "model_index.json"
    if not index.is_file():
        return
    components = read_json(index)
    entry = components.get("text_encoder") or components.get("text_encoder_2")
    if not entry or entry[0] is None:
        raise FlagError(
            f"--pretrained_model_name_or_path {model}: a "
            f"{components.get('_class_name', 'pipeline')} without a text encoder; this job needs "
            "a text-to-image pipeline (the prompt is its conditioning)"
        )


def denoiser_of(pipe: Any) -> tuple[str, torch.nn.Module]:
    """``("unet" | "transformer", module)``: the model that is fine-tuned."""
    for name in ("unet", "transformer"):
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            return name, module
    raise FlagError(
        f"--pretrained_model_name_or_path: {type(pipe).__name__} has neither a unet nor a "
        "transformer"
    )


def load_pipeline(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Any:
    """The pipeline on ``device`` in ``dtype``, its text encoder checked, progress bars off."""
    with needs("siss-stable-diffusion"):
        from diffusers import DDIMScheduler, DiffusionPipeline
        from diffusers.pipelines import pipeline_utils

    model = args.pretrained_model_name_or_path
    check_model_index(model)
    # diffusers renamed `torch_dtype` to `dtype` (0.36); older releases know the first only.
    key = "dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype"
    try:
        # Components the folder saved as [null, null] (e.g. SD3 without its T5 encoder) must be
        # passed as None, or diffusers refuses to build the pipeline.
        index = DiffusionPipeline.load_config(model)
        absent = {
            name: None
            for name, entry in index.items()
            if isinstance(entry, list | tuple) and len(entry) == 2 and entry[0] is None
        }
        if "safety_checker" in index:  # never run (see below): not loaded either
            absent.update(safety_checker=None, feature_extractor=None)
            absent["requires_safety_checker"] = False
        pipe = DiffusionPipeline.from_pretrained(model, **{key: dtype}, **absent)
    except (OSError, ValueError) as error:
        raise FlagError(
            f"--pretrained_model_name_or_path {model}: could not load the pipeline ({error})"
        ) from None
    if (
        getattr(pipe, "text_encoder", None) is None
        and getattr(pipe, "text_encoder_2", None) is None
    ):
        raise FlagError(
            f"--pretrained_model_name_or_path {model}: {type(pipe).__name__} has no text "
            "encoder; this job needs a text-to-image pipeline"
        )
    # The safety checker would black out images before the split sees them; output_type="latent"
    # skips it anyway (see the tutorial).
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe.training_scheduler = pipe.scheduler  # the forward process the loss trains on
    if args.sampler == "ddim" and "Flow" not in type(pipe.scheduler).__name__:
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    _, denoiser = denoiser_of(pipe)
    if args.lora_targets is None:  # model_index.json could not be read before loading
        args.lora_targets = lora_targets(denoiser, args)
    pipe.job_resolution = None
    if getattr(args, "resolution", None):
        pipe.job_resolution = check_resolution(pipe, args.resolution)
    return pipe


def check_resolution(pipe: Any, resolution: list[int]) -> tuple[int, int]:
    """``--resolution`` as ``(H, W)``, refused unless the pipeline generates that size: a
    multiple of the VAE's factor, of twice it for Flux (2x2 latent patches are packed), of
    the factor times the patch size for SD3."""
    height, width = resolution if len(resolution) == 2 else (resolution[0], resolution[0])
    factor = int(getattr(pipe, "vae_scale_factor", 8))
    family = family_of(pipe)
    if family == "flux":
        factor *= 2
    elif family == "sd3":
        _, denoiser = denoiser_of(pipe)
        factor *= int(denoiser.config.get("patch_size", 1) or 1)
    if height % factor or width % factor:
        raise FlagError(
            f"--resolution {height} {width}: {type(pipe).__name__} generates heights and widths "
            f"that are multiples of {factor}"
        )
    return height, width


def latent_channels(pipe: Any) -> int:
    """Channels of the denoiser's unpacked latents ``(N, C, h, w)``: its ``in_channels``, a
    quarter of them for Flux (whose transformer takes 2x2 patches packed into channels)."""
    _, denoiser = denoiser_of(pipe)
    channels = int(denoiser.config.in_channels)
    return channels // 4 if family_of(pipe) == "flux" else channels


def unpack_latents(pipe: Any, latents: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The pipeline's ``output_type="latent"`` result as ``(N, C, h, w)``: Flux returns packed
    latents ``(N, h/2 * w/2, 4C)`` (``FluxPipeline._unpack_latents``); others are unpacked."""
    if latents.ndim == 3 and callable(getattr(pipe, "_unpack_latents", None)):
        return pipe._unpack_latents(latents, size[0], size[1], pipe.vae_scale_factor)
    return latents


def guidance_conditioning(pipe: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Inputs of the denoiser beyond the prompt's: a guidance-distilled Flux model
    (``guidance_embeds``, FLUX.1-dev) takes ``guidance``, set to ``--guidance_scale``, the
    value its generations (``FluxPipeline(guidance_scale=...)``) feed it, so the trained and the
    sampled conditional model are the same; ``{}`` for every other model."""
    _, denoiser = denoiser_of(pipe)
    if family_of(pipe) == "flux" and denoiser.config.get("guidance_embeds", False):
        return {"guidance": float(args.guidance_scale)}
    return {}


def image_size(pipe: Any) -> tuple[int, int]:
    """``(H, W)`` of the images the job generates: ``--resolution`` (``load_pipeline`` keeps it
    as ``pipe.job_resolution``), else the pipeline's default (its ``default_sample_size``, or
    the UNet's ``sample_size``, times the VAE's factor)."""
    if getattr(pipe, "job_resolution", None):
        return tuple(pipe.job_resolution)
    _, denoiser = denoiser_of(pipe)
    sample = getattr(pipe, "default_sample_size", None) or denoiser.config.get("sample_size")
    factor = int(getattr(pipe, "vae_scale_factor", 8))
    if isinstance(sample, int):
        return sample * factor, sample * factor
    return int(sample[0]) * factor, int(sample[1]) * factor


def check_lora_targets(denoiser: torch.nn.Module, args: argparse.Namespace) -> None:
    """Refuse a LoRA PEFT cannot put on this model, before any image is generated."""
    if args.full:
        return
    if not callable(getattr(denoiser, "add_adapter", None)):
        raise FlagError(
            f"--rank {args.rank}: {type(denoiser).__name__} does not take a PEFT "
            "adapter (no add_adapter); use --full"
        )
    names = [name for name, _ in denoiser.named_modules()]
    targets = lora_targets(denoiser, args)
    found = [t for t in targets if any(n == t or n.endswith("." + t) for n in names)]
    if not found:
        raise FlagError(
            f"--rank {args.rank}: none of the --lora_targets {targets} is a "
            f"module of {type(denoiser).__name__} (it has no attention projections to wrap); "
            "name its layers with --lora_targets, or use --full"
        )


def add_lora(denoiser: torch.nn.Module, args: argparse.Namespace) -> None:
    """A PEFT LoRA of ``--lora-rank`` and ``--lora-alpha`` on the ``--lora_targets`` modules of
    the denoiser (default: its family's, ``LORA_TARGETS_OF``), drawn from a seed of its own; its
    weights in float32."""
    with needs("siss-stable-diffusion"):
        from peft import LoraConfig

    config = LoraConfig(
        r=args.rank,
        lora_alpha=args.lora_alpha,
        init_lora_weights="gaussian",
        target_modules=lora_targets(denoiser, args),
    )
    try:
        # PEFT draws lora_A from the global generator: seed it, so that the start (and so the
        # run) is the same whatever ran before, on every process and on every number of them.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derived_seed(args.seed, "lora"))
            denoiser.add_adapter(config)
    except ValueError as error:  # PEFT's "Target modules ... not found"
        raise FlagError(f"--rank {args.rank} / --lora_targets: {error}") from None
    for parameter in denoiser.parameters():  # LoRA weights in float32 under mixed precision
        if parameter.requires_grad:
            parameter.data = parameter.data.float()


def to_signed(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, 3, H, W)`` to float32 in [-1, 1]."""
    return images.float() / 127.5 - 1


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float ``(N, 3, H, W)`` in [-1, 1] to uint8, rounded (what a PNG keeps)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def autocast_for(pipe: Any, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast to the pipeline's dtype when the denoiser keeps float32 master weights (a full
    fine-tune under mixed precision): its inputs come in the text encoder's dtype."""
    _, denoiser = denoiser_of(pipe)
    dtype = pipe.text_encoder.dtype if getattr(pipe, "text_encoder", None) is not None else None
    if device.type == "cpu" or dtype in (None, torch.float32) or denoiser.dtype == dtype:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
