"""Argument checks and conditioning rows shared by the audit checks (private).

Every check runs before the first model call and raises naming the argument. Integers go through
``siss._checks.check_index``: Python and numpy ints are accepted, bools and floats are not.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from numbers import Real
from typing import Any

import torch
from torch import Tensor

from siss._checks import check_index


def check_int(value: object, name: str, minimum: int = 1) -> int:
    """An int ``>= minimum``: ``TypeError`` for a non-int, ``ValueError`` below ``minimum``."""
    number = check_index(value, name)
    if number < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value!r}")
    return number


def check_fraction(value: object, name: str) -> float:
    """A real number strictly between 0 and 1 (a confidence, a level, a percentile)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"`{name}` must be a number in (0, 1), got {value!r}")
    if not 0.0 < float(value) < 1.0:
        raise ValueError(f"`{name}` must be in (0, 1), got {value!r}")
    return float(value)


def check_generator(generator: object) -> torch.Generator | None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"`generator` must be a torch.Generator or None, got {type(generator).__name__}"
        )
    return generator


def check_range(data_range: object) -> tuple[float, float]:
    """``(lo, hi)``: two finite numbers with ``hi > lo``."""
    if (
        not isinstance(data_range, Sequence)
        or len(data_range) != 2
        or not all(isinstance(v, Real) and not isinstance(v, bool) for v in data_range)
    ):
        raise TypeError(f"`data_range` must be a pair of numbers (lo, hi), got {data_range!r}")
    lo, hi = float(data_range[0]), float(data_range[1])
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise ValueError(f"`data_range` must be finite with hi > lo, got {data_range!r}")
    return lo, hi


def check_images(
    images: object,
    name: str,
    *,
    rows: int = 1,
    like: Tensor | None = None,
    like_name: str = "forget",
    finite: bool = True,
) -> Tensor:
    """A floating batch ``(N, *S)`` of non-empty images with ``N >= rows``.

    ``like``: the images must have its image shape ``S``. ``finite``: NaN or inf values raise
    (not checked on the meta device).
    """
    if not isinstance(images, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor (N, *S), got {type(images).__name__}")
    if not images.is_floating_point():
        raise TypeError(
            f"`{name}` must be a floating-point tensor, got dtype {images.dtype} (scale integer "
            "images to the model's range first)"
        )
    if images.ndim < 2 or math.prod(images.shape[1:]) == 0:
        raise ValueError(
            f"`{name}` must have shape (N, *S) with non-empty images, got {tuple(images.shape)}"
        )
    if images.shape[0] < rows:
        raise ValueError(f"`{name}` must hold N >= {rows} images, got {tuple(images.shape)}")
    if like is not None and images.shape[1:] != like.shape[1:]:
        raise ValueError(
            f"`{name}` images have shape {tuple(images.shape[1:])} but the `{like_name}` images "
            f"have {tuple(like.shape[1:])}: they must be comparable"
        )
    if finite and images.device.type != "meta" and not bool(torch.isfinite(images).all()):
        raise ValueError(f"`{name}` holds NaN or inf values")
    return images


# --------------------------------------------------------------------------------------------
# Conditioning: model keyword inputs whose tensors have one row per image or one shared row
# --------------------------------------------------------------------------------------------


def tensors(value: Any, name: str) -> list[tuple[str, Tensor]]:
    """The tensors in ``value`` (through dicts, lists and tuples), each with its name."""
    if isinstance(value, Tensor):
        return [(name, value)]
    if isinstance(value, Mapping):
        return [item for k, v in value.items() for item in tensors(v, f"{name}[{k!r}]")]
    if isinstance(value, list | tuple):
        return [item for i, v in enumerate(value) for item in tensors(v, f"{name}[{i}]")]
    return []


def check_conditioning(
    conditioning: object, name: str, rows: int | None, per: str = "image"
) -> dict[str, Any]:
    """Conditioning kwargs whose tensors have ``rows`` rows (one per ``per``) or 1 (shared).

    ``rows=None``: the check takes one conditioning for every image, so only 1-row tensors.
    """
    if conditioning is None:
        return {}
    if not isinstance(conditioning, Mapping):
        raise TypeError(
            f"`{name}` must be a dict of model keyword inputs (e.g. "
            f"{{'encoder_hidden_states': embeds}}), got {type(conditioning).__name__}"
        )
    for key, tensor in tensors(conditioning, name):
        if tensor.ndim >= 1 and tensor.shape[0] not in (1, rows):
            expected = (
                "1: this check takes one conditioning shared by every image; run it per "
                "conditioning"
                if rows is None
                else f"{rows} (one per {per}) or 1 (shared by every {per})"
            )
            raise ValueError(f"`{key}` has {tensor.shape[0]} rows; expected {expected}")
    return dict(conditioning)


def shared(conditioning: Mapping[str, Any]) -> bool:
    """Whether every tensor of ``conditioning`` has one row (so it can condition any images)."""
    return all(t.ndim == 0 or t.shape[0] == 1 for _, t in tensors(conditioning, ""))


def broadcast_rows(value: Any, rows: int, name: str) -> Any:
    """``value`` with ``rows`` rows: 1-row tensors expanded, 0-dim tensors and non-tensors kept."""
    if isinstance(value, Tensor):
        if value.ndim == 0 or value.shape[0] == rows:
            return value
        if value.shape[0] == 1:
            return value.expand(rows, *value.shape[1:])
        raise ValueError(f"`{name}` has {value.shape[0]} rows; expected {rows} or 1 (shared)")
    if isinstance(value, Mapping):
        return {k: broadcast_rows(v, rows, f"{name}[{k!r}]") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(broadcast_rows(v, rows, f"{name}[{i}]") for i, v in enumerate(value))
    return value


def take_rows(value: Any, index: Tensor) -> Any:
    """Conditioning for the rows ``index`` (1-row tensors expanded, 0-dim tensors kept)."""
    if isinstance(value, Tensor):
        if value.ndim == 0:
            return value
        if value.shape[0] == 1:
            return value.expand(len(index), *value.shape[1:])
        return value[index.to(value.device)]
    if isinstance(value, Mapping):
        return {k: take_rows(v, index) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(take_rows(v, index) for v in value)
    return value
