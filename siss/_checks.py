"""Argument validation and broadcasting shared by the core modules.

Every check raises at the call that received the bad value and names the argument, so a user reads
what to fix rather than a shape error from deep inside a kernel. None of them reads tensor *values*
from an accelerator: the hot path stays free of host syncs. Checks of tensor values (non-finite
inputs, ``sigma > 0`` on an accelerator, a loss that overflowed) do cost a host sync; they run when
``set_validate_values(True)`` is in force (or ``SISS_VALIDATE_VALUES=1`` in the environment), and
otherwise a NaN or inf *value* in the inputs propagates to a non-finite loss.
"""

from __future__ import annotations

import math
import operator
import os
from numbers import Integral, Real
from types import TracebackType

import numpy as np
import torch
from torch import Tensor

_validate_values = os.environ.get("SISS_VALIDATE_VALUES", "0") not in ("", "0")


def validate_values_enabled() -> bool:
    """Whether the value checks of ``set_validate_values`` are in force.

    Example:
        >>> with set_validate_values(True):
        ...     validate_values_enabled()
        True
    """
    return _validate_values


class set_validate_values:
    """Turn the checks of tensor *values* on or off, globally or as a context manager.

    Shape, dtype, device and Python-scalar checks are always on: they cost nothing. Value checks
    read tensors back to the host, so they are off by default, and then a NaN or inf in ``x0``,
    ``a0``, ``model_output``, ``gamma`` or ``sigma`` gives a NaN or inf loss. With them on, such a
    value, ``sigma <= 0`` on an accelerator, a timestep index out of range on an accelerator, or a
    loss that overflowed float32 from finite inputs raises a ``ValueError`` naming the argument.
    Turn them on to debug a run that produced NaN. ``SISS_VALIDATE_VALUES=1`` in the environment
    turns them on from the start.

    Example:
        >>> import siss
        >>> with siss.set_validate_values(True):
        ...     siss.validate_values_enabled()
        True
        >>> siss.validate_values_enabled()
        False
    """

    def __init__(self, mode: bool) -> None:
        global _validate_values
        if not isinstance(mode, bool | np.bool_):
            raise TypeError(f"`mode` must be a bool, got {type(mode).__name__}")
        self._previous = _validate_values
        _validate_values = bool(mode)

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        global _validate_values
        _validate_values = self._previous


def check_finite_values(tensor: Tensor, name: str) -> None:
    """A named ``ValueError`` for NaN or inf in ``tensor``, when value checks are on (a sync)."""
    if _validate_values and tensor.device.type != "meta" and not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"`{name}` holds NaN or inf values")


def check_positive_values(tensor: Tensor, name: str) -> None:
    """``tensor > 0``: always checked on the CPU (free), elsewhere when value checks are on.

    Under ``torch.compile`` the CPU check is skipped: reading a tensor's value would break the
    graph (value checks, when switched on, still run and break it: they asked for the sync)."""
    if tensor.device.type == "meta":
        return
    eager_cpu = tensor.device.type == "cpu" and not torch.compiler.is_compiling()
    if (eager_cpu or _validate_values) and not bool((tensor > 0).all()):
        raise ValueError(f"`{name}` must be > 0 in every row")


def append_dims(values: Tensor, ndim: int) -> Tensor:
    """View a per-row tensor ``(B,)`` as ``(B, 1, ..., 1)`` with ``ndim`` dimensions."""
    extra = ndim - values.ndim
    if extra < 0:
        raise ValueError(f"cannot broadcast a tensor of {values.ndim} dims to {ndim} dims")
    return values.reshape(*values.shape, *([1] * extra))


def check_index(value: object, name: str) -> int:
    """A Python or numpy integer (not a bool), as a Python ``int``."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, Integral):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__} {value!r}")
    return operator.index(value)


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
    sizes = []
    for value, name in ((n, "n"), (k, "k")):
        if isinstance(value, bool | np.bool_) or not isinstance(value, Integral) or value < 1:
            raise ValueError(f"`{name}` must be a positive int, got {value!r}")
        sizes.append(operator.index(value))
    n, k = sizes
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


def check_batch(tensor: object, name: str) -> Tensor:
    """A floating batch ``(B, ...)`` with ``B >= 1`` and at least one non-batch dimension."""
    check_floating(tensor, name)
    if tensor.ndim < 2 or tensor.numel() == 0:
        raise ValueError(
            f"`{name}` must have shape (B, ...) with B >= 1 and at least one dimension per row, "
            f"none of size 0 (e.g. (B, C, H, W); B scalars are (B, 1)), got {tuple(tensor.shape)}"
        )
    check_finite_values(tensor, name)
    return tensor


def broadcast_forget(x0: Tensor, a0: Tensor) -> Tensor:
    """``a0`` in the dtype of ``x0`` and, of batch 1, paired with every row of ``x0``.

    The cast mirrors diffusers' training scripts, which cast the batch to the weights' dtype
    (``bf16``) while a forget image kept aside is often still ``float32``.
    """
    if not (isinstance(a0, Tensor) and isinstance(x0, Tensor)):
        return a0
    if a0.dtype != x0.dtype and a0.is_floating_point() and x0.is_floating_point():
        a0 = a0.to(x0.dtype)
    if a0.shape[:1] == (1,) and x0.ndim >= 1 and x0.shape[0] >= 1 and a0.shape[1:] == x0.shape[1:]:
        return a0.expand_as(x0)
    return a0


def check_pair(x0: Tensor, a0: Tensor) -> None:
    """``x0`` (keep rows) and ``a0`` (forget rows): same shape, dtype and device."""
    check_batch(x0, "x0")
    check_batch(a0, "a0")
    if x0.shape != a0.shape:
        raise ValueError(
            f"`a0` must have the shape of `x0` {tuple(x0.shape)}, got {tuple(a0.shape)}"
        )
    if x0.dtype != a0.dtype:
        raise TypeError(f"`a0` must have the dtype of `x0` ({x0.dtype}), got {a0.dtype}")
    if x0.device != a0.device:
        raise ValueError(f"`a0` must be on the device of `x0` ({x0.device}), got {a0.device}")


def check_rows(values: Tensor, name: str, like: Tensor) -> None:
    """A per-row floating tensor: shape ``(B,)`` matching the batch of ``like``, on its device."""
    if not isinstance(values, Tensor):
        raise TypeError(
            f"`{name}` must be a torch.Tensor of shape (B,), got {type(values).__name__}"
        )
    if not values.is_floating_point():
        raise TypeError(f"`{name}` must be a floating-point tensor, got dtype {values.dtype}")
    if values.shape != like.shape[:1]:
        raise ValueError(f"`{name}` must have shape ({like.shape[0]},), got {tuple(values.shape)}")
    if values.device != like.device:
        raise ValueError(f"`{name}` must be on device {like.device}, got {values.device}")
    check_finite_values(values, name)


def check_model_output(
    model_output: object,
    target_shape: torch.Size,
    device: torch.device,
    name: str = "model_output",
) -> Tensor:
    tensor = check_floating(model_output, name)
    check_finite_values(tensor, name)
    if tensor.shape != target_shape:
        raise ValueError(
            f"`{name}` must have the shape of the noisy batch {tuple(target_shape)}, "
            f"got {tuple(tensor.shape)}"
        )
    if tensor.device != device:
        raise ValueError(f"`{name}` must be on device {device}, got {tensor.device}")
    return tensor


def work_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 when any input is float64, float32 otherwise: never compute in half precision."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def check_loss_finite(loss: Tensor) -> None:
    """With value checks on: a named error when finite inputs gave a non-finite loss."""
    if _validate_values and loss.device.type != "meta" and not bool(torch.isfinite(loss).all()):
        hint = (
            "(|values| above ~1e150); rescale the data"
            if loss.dtype == torch.float64
            else "(|values| above ~1e18); rescale the data or pass float64 tensors"
        )
        raise ValueError(
            "the loss overflowed to inf or NaN although `x0`, `a0` and `model_output` are finite: "
            f"their values are too large for {loss.dtype} squared errors {hint}"
        )
