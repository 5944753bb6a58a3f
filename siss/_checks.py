"""Argument validation and broadcasting shared by the core modules.

Every check raises at the call that received the bad value and names the argument, so a user reads
what to fix rather than a shape error from deep inside a kernel. None of them reads tensor *values*
from an accelerator: the hot path stays free of host syncs. Checks of tensor values (non-finite
inputs, ``sigma > 0`` on an accelerator, a loss that overflowed) do cost a host sync; they run when
``set_validate_values(True)`` is in force (or ``SISS_VALIDATE_VALUES=1`` in the environment), and
otherwise a NaN or inf *value* in the inputs propagates to a non-finite loss.

This module is the one home of the generic argument checks of the package (the metrics and the
audit import theirs from here). Wrong *types* (a bool where a number is expected, an integer tensor
where a floating one is) raise ``TypeError``; wrong *values* (out of range, non-finite, wrong
shape) raise ``ValueError``. Numpy scalars are accepted wherever a Python number is (numpy
registers its integer and floating types with ``numbers``); bools are not numbers here, since
``superfactor=True`` or ``splits=True`` is a bug, not a 1.
"""

from __future__ import annotations

import math
import operator
import os
from collections.abc import Sequence
from numbers import Integral, Real
from types import TracebackType

import numpy as np
import torch
from torch import Tensor

_validate_values = os.environ.get("SISS_VALIDATE_VALUES", "0") not in ("", "0")


def validate_values_enabled() -> bool:
    """Whether the value checks of ``set_validate_values`` are in force.

    Examples:
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

    Examples:
        >>> import siss
        >>> with siss.debug.set_validate_values(True):
        ...     siss.debug.validate_values_enabled()
        True
        >>> siss.debug.validate_values_enabled()
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


def check_finite(tensor: Tensor, name: str) -> None:
    """A named ``ValueError`` for NaN or inf in ``tensor`` (a sync; skipped on the meta device)."""
    if tensor.device.type != "meta" and not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"`{name}` holds NaN or inf values")


def check_finite_values(tensor: Tensor, name: str) -> None:
    """``check_finite`` when value checks are on (``set_validate_values``); free otherwise."""
    if _validate_values:
        check_finite(tensor, name)


def nonfinite_rows(tensor: Tensor) -> Tensor:
    """``(N,)`` bool: which rows (first axis) of an ``(N, ...)`` tensor hold a NaN or ±inf.

    Examples:
        >>> nonfinite_rows(torch.tensor([[0.0, 1.0], [float("nan"), 0.0]]))
        tensor([False,  True])
    """
    return ~torch.isfinite(tensor).reshape(tensor.shape[0], -1).all(dim=1)


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


def check_int(value: object, name: str, minimum: int | None = None) -> int:
    """An integer (Python or numpy, not bool) ``>= minimum``, returned as a Python int.

    Examples:
        >>> check_int(np.int64(3), "splits", minimum=1)
        3
        >>> check_int(0, "splits", minimum=1)
        Traceback (most recent call last):
        ...
        ValueError: `splits` must be >= 1, got 0
    """
    number = check_index(value, name)
    if minimum is not None and number < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value!r}")
    return number


def check_real(
    value: object,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """A finite real number (Python or numpy, not bool) in an interval, returned as a float.

    ``low`` / ``high`` are the ends of the interval (``None``: unbounded); ``low_open`` /
    ``high_open`` exclude them.

    Examples:
        >>> check_real(np.float32(0.5), "dropout", low=0.0, high=1.0)
        0.5
        >>> check_real(float("inf"), "ratio", low=0.0)
        Traceback (most recent call last):
        ...
        ValueError: `ratio` must be a finite number in [0, inf), got inf
    """
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"`{name}` must be a real number, got {type(value).__name__} {value!r}")
    number = float(value)
    too_low = low is not None and (number <= low if low_open else number < low)
    too_high = high is not None and (number >= high if high_open else number > high)
    if not math.isfinite(number) or too_low or too_high:
        left = "-inf" if low is None else f"{low:g}"
        right = "inf" if high is None else f"{high:g}"
        interval = f"{'(' if low_open or low is None else '['}{left}, {right}"
        interval += ")" if high_open or high is None else "]"
        raise ValueError(f"`{name}` must be a finite number in {interval}, got {value!r}")
    return number


def check_probability(value: object, name: str) -> float:
    """A real number in ``[0, 1]``."""
    return check_real(value, name, low=0.0, high=1.0)


def check_fraction(value: object, name: str) -> float:
    """A real number strictly between 0 and 1 (a confidence, a level, a percentile)."""
    return check_real(value, name, low=0.0, high=1.0, low_open=True, high_open=True)


def check_nonnegative(value: object, name: str) -> float:
    """A finite real number ``>= 0``."""
    return check_real(value, name, low=0.0)


def check_max_weight(value: object) -> float:
    """The importance-weight cap: a finite number >= 1 (a cap below 1 would bind on every row)."""
    return check_real(value, "max_weight", low=1.0)


def check_choice(value: object, name: str, choices: Sequence[str]) -> str:
    """One of the strings ``choices``.

    Examples:
        >>> check_choice("sum", "reduction", ("mean", "sum", "none"))
        'sum'
        >>> check_choice("max", "reduction", ("mean", "sum", "none"))
        Traceback (most recent call last):
        ...
        ValueError: `reduction` must be one of 'mean', 'sum', 'none'; got 'max'
    """
    if not isinstance(value, str):
        raise TypeError(f"`{name}` must be a str, got {type(value).__name__} {value!r}")
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_window(
    value: object, length: int, name: str = "forget_timesteps"
) -> tuple[int, int] | None:
    """``None`` or an inclusive ``(low, high)`` window of grid indices in ``[0, length)``.

    Examples:
        >>> check_window([0, 300], 1000)
        (0, 300)
        >>> check_window((300, 0), 1000)
        Traceback (most recent call last):
        ...
        ValueError: `forget_timesteps` must be a (low, high) window of grid indices with 0 <= low <= high < 1000, got (300, 0)
    """  # noqa: E501
    if value is None:
        return None
    values = tuple(value) if isinstance(value, tuple | list) else (value,)
    if (
        len(values) != 2
        or any(isinstance(v, bool) or not isinstance(v, Integral) for v in values)
        or not 0 <= values[0] <= values[1] < length
    ):
        raise ValueError(
            f"`{name}` must be a (low, high) window of grid indices with 0 <= low <= high < "
            f"{length}, got {value!r}"
        )
    return int(values[0]), int(values[1])


def check_range(data_range: object, name: str = "data_range") -> tuple[float, float]:
    """``(lo, hi)``: two finite real numbers with ``hi > lo`` (a data range), as floats."""
    if (
        not isinstance(data_range, Sequence)
        or len(data_range) != 2
        or not all(isinstance(v, Real) and not isinstance(v, bool) for v in data_range)
    ):
        raise TypeError(f"`{name}` must be a pair of numbers (lo, hi), got {data_range!r}")
    lo, hi = float(data_range[0]), float(data_range[1])
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise ValueError(f"`{name}` must be finite with hi > lo, got {data_range!r}")
    return lo, hi


def check_generator(generator: object) -> torch.Generator | None:
    """A ``torch.Generator`` or ``None``."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"`generator` must be a torch.Generator or None, got {type(generator).__name__}"
        )
    return generator


def check_set_sizes(n: int | None, k: int | None) -> tuple[int | None, int | None]:
    """``n = |X|`` and ``k = |A|``: both given with ``0 < k < n``, or both ``None``."""
    if (n is None) != (k is None):
        raise ValueError(f"give both `n` (|X|) and `k` (|A|) or neither; got n={n!r}, k={k!r}")
    if n is None:
        return None, None
    n, k = check_int(n, "n", minimum=1), check_int(k, "k", minimum=1)
    if k >= n:
        raise ValueError(
            f"`k` (|A|={k}) must be smaller than `n` (|X|={n}): X \\ A must be non-empty"
        )
    return n, k


def check_tensor(
    value: object,
    name: str,
    *,
    dims: str = "",
    min_dim: int = 0,
    ndim: int | None = None,
    floating: bool = True,
    meta: bool = False,
    hint: str = "",
) -> Tensor:
    """A tensor with the expected rank and dtype.

    Args:
        value: the argument.
        name: its name, for the message.
        dims: its documented shape, e.g. ``"(N, *S)"``, for the message.
        min_dim: fewest dimensions.
        ndim: exact number of dimensions (overrides ``min_dim``).
        floating: require a floating-point dtype (integer and bool tensors raise ``TypeError``).
        meta: accept a tensor on the meta device (by default it raises: it holds no values).
        hint: how to fix a wrong dtype, appended to that message in parentheses.

    Examples:
        >>> check_tensor(torch.zeros(2, 3, dtype=torch.long), "x", dims="(B, D)", ndim=2)
        Traceback (most recent call last):
        ...
        TypeError: `x` must be a floating-point tensor, got dtype torch.int64
    """
    if not isinstance(value, Tensor):
        shape = f" {dims}" if dims else ""
        raise TypeError(f"`{name}` must be a torch.Tensor{shape}, got {type(value).__name__}")
    if not meta and value.is_meta:
        raise ValueError(f"`{name}` is a meta tensor: it holds no values to measure")
    if floating and not value.is_floating_point():
        fix = f" ({hint})" if hint else ""
        raise TypeError(f"`{name}` must be a floating-point tensor, got dtype {value.dtype}{fix}")
    if (value.dim() != ndim) if ndim is not None else (value.dim() < min_dim):
        raise ValueError(f"`{name}` must have shape {dims}, got {tuple(value.shape)}")
    return value


def check_floating(tensor: object, name: str) -> Tensor:
    """A floating tensor with at least one dimension (the meta device allowed)."""
    check_tensor(tensor, name, meta=True)
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
    check_tensor(values, name, dims="of shape (B,)", meta=True)
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
