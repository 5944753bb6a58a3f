"""Latent-space use: encode images with the pipeline's VAE before the loss."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


@torch.no_grad()
def encode_latents(vae: Any, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Latents of ``images`` as the diffusion model sees them, the diffusers training convention.

    ``(vae.encode(images).latent_dist.sample(generator) - shift_factor) * scaling_factor``, where
    ``shift_factor`` is read from the VAE's config when it has one (SD3, Flux) and is 0 otherwise
    (SD 1.x/2.x, SDXL). The VAE is not trained: the result carries no graph.

    Args:
        vae: an ``AutoencoderKL``-like model whose ``encode`` returns ``.latent_dist`` (or
            ``.latents`` for deterministic autoencoders).
        images: pixels in ``[-1, 1]``, shape ``(B, 3, H, W)``; moved to the VAE's device and dtype.
        generator: source of the posterior sample.

    Returns:
        Latents ``(B, C_lat, H / f, W / f)`` in the VAE's dtype.
    """
    parameter = next(vae.parameters())
    encoded = vae.encode(images.to(device=parameter.device, dtype=parameter.dtype))
    if hasattr(encoded, "latent_dist"):
        latents = encoded.latent_dist.sample(generator)
    elif hasattr(encoded, "latents"):
        latents = encoded.latents
    else:
        raise TypeError(
            f"{type(vae).__name__}.encode returned {type(encoded).__name__} with neither "
            "`latent_dist` nor `latents`"
        )
    config = vae.config
    shift = getattr(config, "shift_factor", None)
    if shift is not None:
        latents = latents - shift
    scaling = getattr(config, "scaling_factor", None)
    if scaling is None:
        raise ValueError(f"{type(vae).__name__}.config has no `scaling_factor`")
    return latents * scaling
