"""The diffusers pipeline the job works on: loading it, its dtype, its denoiser and its LoRA.

Any text-to-image pipeline (SD 1.x/2.x, SDXL, SD3; a hub id or a local folder) is loaded in the
``--dtype`` asked for, with the paper's DDIM sampler and without the safety checker (it would
black out images before the split sees them). Its denoiser (the UNet, or SD3's transformer) is
the model that is fine-tuned, through a PEFT LoRA on the attention projections unless ``--full``.
A pipeline the job cannot use (no text encoder, no module the LoRA can wrap) is refused with the
flag named before any image is generated.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Any

import torch

from siss._optional import needs
from siss.loop import derived_seed
from siss.stable_diffusion.files import read_json

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # diffusers' train_text_to_image_lora.py


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
        raise SystemExit(
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
    raise SystemExit(
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
        raise SystemExit(
            f"--pretrained_model_name_or_path {model}: could not load the pipeline ({error})"
        ) from None
    if (
        getattr(pipe, "text_encoder", None) is None
        and getattr(pipe, "text_encoder_2", None) is None
    ):
        raise SystemExit(
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
    return pipe


def image_size(pipe: Any) -> tuple[int, int]:
    """``(H, W)`` of the images the pipeline generates by default."""
    _, denoiser = denoiser_of(pipe)
    sample = denoiser.config.sample_size
    factor = int(getattr(pipe, "vae_scale_factor", 8))
    if getattr(pipe, "default_sample_size", None):
        sample = pipe.default_sample_size
    if isinstance(sample, int):
        return sample * factor, sample * factor
    return int(sample[0]) * factor, int(sample[1]) * factor


def check_lora_targets(denoiser: torch.nn.Module, args: argparse.Namespace) -> None:
    """Refuse a LoRA PEFT cannot put on this model, before any image is generated."""
    if args.full:
        return
    if not callable(getattr(denoiser, "add_adapter", None)):
        raise SystemExit(
            f"--rank {args.rank}: {type(denoiser).__name__} does not take a PEFT "
            "adapter (no add_adapter); use --full"
        )
    names = [name for name, _ in denoiser.named_modules()]
    found = [t for t in args.lora_targets if any(n == t or n.endswith("." + t) for n in names)]
    if not found:
        raise SystemExit(
            f"--rank {args.rank}: none of the --lora_targets {args.lora_targets} is a "
            f"module of {type(denoiser).__name__} (it has no attention projections to wrap); "
            "name its layers with --lora_targets, or use --full"
        )


def add_lora(denoiser: torch.nn.Module, args: argparse.Namespace) -> None:
    """A PEFT LoRA of ``--lora-rank`` and ``--lora-alpha`` on the ``--lora_targets`` modules of
    the denoiser, drawn from a seed of its own; its weights in float32."""
    with needs("siss-stable-diffusion"):
        from peft import LoraConfig

    config = LoraConfig(
        r=args.rank,
        lora_alpha=args.lora_alpha,
        init_lora_weights="gaussian",
        target_modules=list(args.lora_targets),
    )
    try:
        # PEFT draws lora_A from the global generator: seed it, so that the start (and so the
        # run) is the same whatever ran before, on every process and on every number of them.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derived_seed(args.seed, "lora"))
            denoiser.add_adapter(config)
    except ValueError as error:  # PEFT's "Target modules ... not found"
        raise SystemExit(f"--rank {args.rank} / --lora_targets: {error}") from None
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
