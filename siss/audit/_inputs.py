"""Argument checks and conditioning rows shared by the audit checks (private).

Every check runs before the first model call and raises naming the argument. The generic checks
(``check_fraction``, ``check_generator``, ``check_range``) live in ``siss._checks``, the one home
of the package's argument checks, and are re-exported here for the audit modules; what stays here
is specific to the audit: integer counts (``>= 1`` unless told), image batches, conditioning.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from siss import _checks
from siss._checks import check_finite, check_fraction, check_generator, check_range, check_tensor

__all__ = [
    "broadcast_rows",
    "check_conditioning",
    "check_fraction",
    "check_generator",
    "check_images",
    "check_int",
    "check_range",
    "shared",
    "take_rows",
    "tensors",
]


def check_int(value: object, name: str, minimum: int = 1) -> int:
    """``siss._checks.check_int`` with the audit's default: a count, ``>= 1`` unless told."""
    return _checks.check_int(value, name, minimum)


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
    dims = "(N, *S) with non-empty images"
    hint = "scale integer images to the model's range first"
    check_tensor(images, name, dims=dims, min_dim=2, meta=True, hint=hint)
    if math.prod(images.shape[1:]) == 0:
        raise ValueError(f"`{name}` must have shape {dims}, got {tuple(images.shape)}")
    if images.shape[0] < rows:
        raise ValueError(f"`{name}` must hold N >= {rows} images, got {tuple(images.shape)}")
    if like is not None and images.shape[1:] != like.shape[1:]:
        raise ValueError(
            f"`{name}` images have shape {tuple(images.shape[1:])} but the `{like_name}` images "
            f"have {tuple(like.shape[1:])}: they must be comparable"
        )
    if finite:
        check_finite(images, name)
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
