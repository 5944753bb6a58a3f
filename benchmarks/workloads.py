"""The models the GPU benchmarks time, built from config with random weights (no download).

* ``digits``  the shipped digits ``UNet2DModel`` (``examples/assets/pretrained/config.json``),
  1 x 16 x 16 pixels, unconditional, ``DDPMScheduler``.
* ``sd15``    the Stable Diffusion 1.5 ``UNet2DConditionModel`` config (859.5M parameters),
  4 x 64 x 64 latents, 77 x 768 text embeddings, ``DDPMScheduler`` (scaled-linear betas).
* ``dit-xl2`` a DiT-XL/2-size ``DiTTransformer2DModel`` (28 layers, width 1152, 675M parameters),
  4 x 32 x 32 latents, 1000 classes, learned variance (8 output channels).

``smoke=True`` gives the same architectures at toy width and depth, for checking the scripts on
a CPU in seconds; its figures mean nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, DiTTransformer2DModel, UNet2DConditionModel, UNet2DModel

DIGITS_CONFIG = Path(__file__).resolve().parents[1] / "examples/assets/pretrained/config.json"
WORKLOADS = ("digits", "sd15", "dit-xl2")

# stable-diffusion-v1-5/stable-diffusion-v1-5, unet/config.json (the fields that differ from
# UNet2DConditionModel's defaults)
SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
}
SD15_SMOKE = {
    **SD15_UNET,
    "sample_size": 8,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "attention_head_dim": 4,
    "norm_num_groups": 8,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
}
# facebook/DiT-XL-2-256, transformer/config.json
DIT_XL2 = {
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "in_channels": 4,
    "out_channels": 8,
    "num_layers": 28,
    "patch_size": 2,
    "sample_size": 32,
    "num_embeds_ada_norm": 1000,
}
DIT_SMOKE = {**DIT_XL2, "num_attention_heads": 2, "attention_head_dim": 8, "num_layers": 2}
DIT_SMOKE["sample_size"] = 8


@dataclass
class Workload:
    """A model, its scheduler, the clean-input shape per row and its conditioning per batch."""

    name: str
    model: torch.nn.Module
    scheduler: DDPMScheduler
    row_shape: tuple[int, ...]
    conditioning: Callable[[int], dict[str, Any]]

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def build(name: str, device: torch.device, *, smoke: bool = False, seed: int = 0) -> Workload:
    """The workload ``name`` (one of ``WORKLOADS``) in float32 on ``device``, seeded."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    torch.manual_seed(seed)
    generator = torch.Generator(device).manual_seed(seed)
    if name == "digits":
        config = json.loads(DIGITS_CONFIG.read_text())
        with torch.device(device):  # initialised where it runs: seconds, not a minute, at 860M
            model = UNet2DModel.from_config(config)
        size = config["sample_size"]
        shape = (config["in_channels"], size, size)
        scheduler = DDPMScheduler(num_train_timesteps=1000)
        return Workload(name, model, scheduler, shape, lambda batch: {})
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )
    if name == "sd15":
        config = SD15_SMOKE if smoke else SD15_UNET
        with torch.device(device):
            model = UNet2DConditionModel(**config)
        size, width = config["sample_size"], config["cross_attention_dim"]
        length = 8 if smoke else 77
        # one prompt for the whole batch, as in the paper's memorized-prompt experiment
        embeds = torch.randn(1, length, width, device=device, generator=generator)
        return Workload(
            name, model, scheduler, (4, size, size), lambda batch: {"encoder_hidden_states": embeds}
        )
    config = DIT_SMOKE if smoke else DIT_XL2
    with torch.device(device):
        model = DiTTransformer2DModel(**config)
    size = config["sample_size"]

    def labels(batch: int) -> dict[str, Any]:
        return {"class_labels": torch.zeros(batch, dtype=torch.long, device=device)}

    return Workload(name, model, scheduler, (4, size, size), labels)
