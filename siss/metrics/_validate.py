"""Argument checks shared by the metrics.

Every check raises at the public call that received the bad value and names the argument in
backticks, so the user reads what to fix instead of an error from inside torch, scipy or
torchdiffeq. Wrong *types* (a bool where a number is expected, an integer tensor where images
are) raise ``TypeError``; wrong *values* (out of range, non-finite, empty, meta device) raise
``ValueError``. Numpy scalars are accepted wherever a Python number is (numpy registers its
integer and floating types with ``numbers``); bools are not numbers here, since
``splits=True`` or ``threshold=True`` is a bug, not a 1.

Metrics are evaluated off the training hot path, so these checks may read tensor values
(finiteness), which synchronises with an accelerator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real

import torch

__all__ = [
    "check_choice",
    "check_finite_rows",
    "check_int",
    "check_real",
    "check_tensor",
    "nonfinite_rows",
]


def check_int(value: object, name: str, *, minimum: int | None = None) -> int:
    """An integer (Python or numpy, not bool) ``>= minimum``, returned as a Python int."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value!r}")
    return int(value)


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


def check_choice(value: object, name: str, choices: Sequence[str]) -> str:
    if not isinstance(value, str):
        raise TypeError(f"`{name}` must be a str, got {type(value).__name__} {value!r}")
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_tensor(
    value: object,
    name: str,
    *,
    dims: str = "",
    min_dim: int = 0,
    ndim: int | None = None,
    floating: bool = True,
) -> torch.Tensor:
    """A tensor holding data (not on the meta device) with the expected rank and dtype.

    Args:
        value: the argument.
        name: its name, for the message.
        dims: its documented shape, e.g. ``"(N, *S)"``, for the message.
        min_dim: fewest dimensions.
        ndim: exact number of dimensions (overrides ``min_dim``).
        floating: require a floating-point dtype (integer and bool tensors raise ``TypeError``).
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor {dims}, got {type(value).__name__}")
    if value.is_meta:
        raise ValueError(f"`{name}` is a meta tensor: it holds no values to measure")
    if floating and not value.is_floating_point():
        raise TypeError(f"`{name}` must be a floating-point tensor, got dtype {value.dtype}")
    if (value.dim() != ndim) if ndim is not None else (value.dim() < min_dim):
        raise ValueError(f"`{name}` must have shape {dims}, got {tuple(value.shape)}")
    return value


def nonfinite_rows(tensor: torch.Tensor) -> torch.Tensor:
    """``(N,)`` bool: which rows (first axis) of an ``(N, ...)`` tensor hold a NaN or ±inf."""
    return ~torch.isfinite(tensor).reshape(tensor.shape[0], -1).all(dim=1)


def check_finite_rows(tensor: torch.Tensor, name: str, what: str = "rows") -> None:
    """Raises ``ValueError`` naming ``name`` with the count of non-finite rows, if any."""
    bad = nonfinite_rows(tensor)
    count = int(bad.sum())
    if count:
        first = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"`{name}` has {count} of {tensor.shape[0]} {what} with NaN or inf values "
            f"(first at index {first}); a diverged model or a bad input cannot be measured"
        )
