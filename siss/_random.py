"""Random draws that honour a ``torch.Generator`` living on another device.

As diffusers' ``randn_tensor`` does: a CPU generator with CUDA data draws on the CPU and moves the
result, so a seed gives the same numbers on every device. Without a generator, draws happen directly
on the target device.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _draw_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"`generator` must be a torch.Generator or None, got {type(generator).__name__}"
        )
    if generator is None or generator.device.type == device.type:
        return device
    return generator.device


def rand(
    shape: tuple[int, ...], *, generator: torch.Generator | None, device: torch.device
) -> Tensor:
    where = _draw_device(generator, device)
    return torch.rand(shape, generator=generator, device=where).to(device)


def randn(
    shape: tuple[int, ...],
    *,
    generator: torch.Generator | None,
    device: torch.device,
    dtype: torch.dtype,
) -> Tensor:
    where = _draw_device(generator, device)
    return torch.randn(shape, generator=generator, device=where, dtype=dtype).to(device)


def randint(
    low: int,
    high: int,
    shape: tuple[int, ...],
    *,
    generator: torch.Generator | None,
    device: torch.device,
) -> Tensor:
    where = _draw_device(generator, device)
    return torch.randint(low, high, shape, generator=generator, device=where).to(device)
