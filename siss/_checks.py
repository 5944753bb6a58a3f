"""Argument validation and broadcasting shared by the core modules.

Every check raises at the call that received the bad value and names the argument, so a user reads
what to fix rather than a shape error from deep inside a kernel. None of them reads tensor *values*
from an accelerator: the hot path stays free of host syncs.
"""

from __future__ import annotations

import math
from numbers import Real

import torch
from torch import Tensor


def append_dims(values: Tensor, ndim: int) -> Tensor:
    """View a per-row tensor ``(B,)`` as ``(B, 1, ..., 1)`` with ``ndim`` dimensions."""
    extra = ndim - values.ndim
    if extra < 0:
        raise ValueError(f"cannot broadcast a tensor of {values.ndim} dims to {ndim} dims")
    return values.reshape(*values.shape, *([1] * extra))


def check_probability(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not 0.0 <= value <= 1.0:
        raise ValueError(f"`{name}` must be a number in [0, 1], got {value!r}")
    return float(value)


def check_nonnegative(value: float, name: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, Real)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}")
    return float(value)


def check_max_weight(value: float) -> float:
    """The importance-weight cap: a finite number >= 1 (a cap below 1 would bind on every row)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, Real)
        or not math.isfinite(value)
        or value < 1
    ):
        raise ValueError(f"`max_weight` must be a finite number >= 1, got {value!r}")
    return float(value)


def check_choice(value: str, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_set_sizes(n: int | None, k: int | None) -> tuple[int | None, int | None]:
    """``n = |X|`` and ``k = |A|``: both given with ``0 < k < n``, or both ``None``."""
    if (n is None) != (k is None):
        raise ValueError(f"give both `n` (|X|) and `k` (|A|) or neither; got n={n!r}, k={k!r}")
    if n is None:
        return None, None
    for value, name in ((n, "n"), (k, "k")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive int, got {value!r}")
    if k >= n:
        raise ValueError(
            f"`k` (|A|={k}) must be smaller than `n` (|X|={n}): X \\ A must be non-empty"
        )
    return n, k


def check_floating(tensor: object, name: str) -> Tensor:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"`{name}` must be a floating-point tensor, got dtype {tensor.dtype}")
    if tensor.ndim < 1:
        raise ValueError(f"`{name}` must have a batch dimension, got a 0-dim tensor")
    return tensor


def broadcast_forget(x0: Tensor, a0: Tensor) -> Tensor:
    """``a0`` of batch 1 paired with every row of ``x0`` (forgetting one image); else ``a0``."""
    if (
        isinstance(a0, Tensor)
        and isinstance(x0, Tensor)
        and a0.shape[:1] == (1,)
        and a0.shape[1:] == x0.shape[1:]
    ):
        return a0.expand_as(x0)
    return a0


def check_pair(x0: Tensor, a0: Tensor) -> None:
    """``x0`` (keep rows) and ``a0`` (forget rows): same shape, dtype and device."""
    check_floating(x0, "x0")
    check_floating(a0, "a0")
    if x0.shape != a0.shape:
        raise ValueError(
            f"`a0` must have the shape of `x0` {tuple(x0.shape)}, got {tuple(a0.shape)}"
        )
    if x0.dtype != a0.dtype:
        raise TypeError(f"`a0` must have the dtype of `x0` ({x0.dtype}), got {a0.dtype}")
    if x0.device != a0.device:
        raise ValueError(f"`a0` must be on the device of `x0` ({x0.device}), got {a0.device}")


def check_rows(values: Tensor, name: str, like: Tensor) -> None:
    """A per-row tensor: shape ``(B,)`` matching the batch of ``like``, on its device."""
    if not isinstance(values, Tensor):
        raise TypeError(
            f"`{name}` must be a torch.Tensor of shape (B,), got {type(values).__name__}"
        )
    if values.shape != like.shape[:1]:
        raise ValueError(f"`{name}` must have shape ({like.shape[0]},), got {tuple(values.shape)}")
    if values.device != like.device:
        raise ValueError(f"`{name}` must be on device {like.device}, got {values.device}")


def check_model_output(
    model_output: object, target_shape: torch.Size, device: torch.device
) -> Tensor:
    tensor = check_floating(model_output, "model_output")
    if tensor.shape != target_shape:
        raise ValueError(
            f"`model_output` must have the shape of the noisy batch {tuple(target_shape)}, "
            f"got {tuple(tensor.shape)}"
        )
    if tensor.device != device:
        raise ValueError(f"`model_output` must be on device {device}, got {tensor.device}")
    return tensor


def work_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 when any input is float64, float32 otherwise: never compute in half precision."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
