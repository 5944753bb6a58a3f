"""Latent-space use: encode images with the pipeline's VAE before the loss."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from siss import _checks


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

    Raises:
        TypeError, ValueError: naming ``vae``, ``images`` or ``generator`` when they cannot go
            through the encoder (not a VAE; integer pixels; not ``(B, C, H, W)`` with the VAE's
            ``in_channels`` and a size divisible by its downsampling factor; on the meta device).
            NaN or inf pixels give NaN latents unless
            ``siss.debug.set_validate_values(True)`` is on.

    Examples:
        >>> from diffusers import AutoencoderKL
        >>> vae = AutoencoderKL(block_out_channels=(8, 8), latent_channels=4, norm_num_groups=4,
        ...     layers_per_block=1, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        ...     up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"))
        >>> images = torch.rand(2, 3, 16, 16) * 2 - 1  # pixels in [-1, 1]
        >>> latents = encode_latents(vae, images, generator=torch.Generator().manual_seed(0))
        >>> latents.shape, latents.requires_grad
        (torch.Size([2, 4, 8, 8]), False)
    """
    if not (
        isinstance(vae, torch.nn.Module)
        and callable(getattr(vae, "encode", None))
        and getattr(vae, "config", None) is not None
    ):
        raise TypeError(
            "`vae` must be an AutoencoderKL-like model (an nn.Module with `encode` and `config`), "
            f"got {type(vae).__name__}"
        )
    parameter = next((p for p in vae.parameters() if p.is_floating_point()), None)
    if parameter is None:
        raise ValueError(f"`vae` ({type(vae).__name__}) has no floating-point parameters")
    _check_images(vae, images, parameter.device)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"`generator` must be a torch.Generator or None, got {type(generator).__name__}"
        )
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
        raise ValueError(f"`vae` ({type(vae).__name__}): its config has no `scaling_factor`")
    return latents * scaling


def _check_images(vae: Any, images: object, device: torch.device) -> None:
    if not isinstance(images, Tensor):
        raise TypeError(f"`images` must be a torch.Tensor, got {type(images).__name__}")
    if not images.is_floating_point():
        raise TypeError(
            f"`images` must be floating-point pixels in [-1, 1], got dtype {images.dtype} (for "
            "uint8 images use `images.float() / 127.5 - 1`)"
        )
    config = vae.config
    channels = getattr(config, "in_channels", None)
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(
            f"`images` must have shape (B, C, H, W) with B >= 1, got {tuple(images.shape)}"
        )
    if isinstance(channels, int) and images.shape[1] != channels:
        raise ValueError(
            f"`images` has {images.shape[1]} channels but the VAE takes in_channels={channels}"
        )
    blocks = getattr(config, "block_out_channels", None)
    factor = 2 ** (len(blocks) - 1) if isinstance(blocks, list | tuple) and blocks else 1
    height, width = images.shape[2:]
    if min(height, width) < factor or height % factor or width % factor:
        raise ValueError(
            f"`images` has spatial size {height}x{width}; the VAE downsamples by {factor}, so "
            f"height and width must be positive multiples of {factor}"
        )
    if images.device.type == "meta" and device.type != "meta":
        raise ValueError(f"`images` is on the meta device but the VAE is on {device}")
    _checks.check_finite_values(images, "images")
