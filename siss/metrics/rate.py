"""Generation rate of a target image, with a binomial confidence interval.

The paper (Hasanaliyev et al., 2025, Sec. 5.2 and Table 2) counts a sample as the unlearned
T-shirt when its L2 distance to the T-shirt, pixels in ``[0, 1]``, is below 10 on 28x28 MNIST.
``default_threshold`` keeps that per-pixel RMS distance (``10 / 28``) for other sizes.

Non-finite samples: a model that diverged (NegGrad does, within a few hundred steps) samples
NaN or inf images. Such a sample is at no distance from the target, so it is neither a hit nor
a miss; counting it as a miss would report 0% generation, i.e. perfect unlearning. Instead
``generation_rate`` counts the non-finite samples in ``RateEstimate.nonfinite``, keeps
them out of ``count`` and ``total``, and by default reports the rate as NaN whenever there is
any (``on_nonfinite="exclude"`` gives the rate over the finite samples instead, and
``"raise"`` raises).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral
from statistics import NormalDist
from typing import Literal, NamedTuple

import torch

from siss._optional import needs
from siss.metrics._validate import (
    check_choice,
    check_finite_rows,
    check_int,
    check_real,
    check_tensor,
    nonfinite_rows,
)

__all__ = ["RateEstimate", "default_threshold", "generation_rate", "l2_distances", "proportion_ci"]

_PAPER_THRESHOLD = 10.0
_PAPER_NUMEL = 28 * 28
_METHODS = ("exact", "wilson")
_ON_NONFINITE = ("nan", "exclude", "raise")


class RateEstimate(NamedTuple):
    """A binomial proportion with its confidence interval, and what could not be counted.

    Attributes:
        rate: ``count / total``; NaN when it was not measured: no finite sample (``total ==
            0``), or some sample was non-finite under ``on_nonfinite="nan"`` (the default of
            ``generation_rate``). Never 0 for samples that could not be measured.
        low: lower end of the confidence interval (NaN when ``rate`` is).
        high: upper end of the confidence interval (NaN when ``rate`` is).
        count: number of finite samples counted as the target.
        total: number of finite samples (those the rate is over).
        nonfinite: number of samples holding a NaN or ±inf value, left out of ``count`` and
            ``total`` (so ``total + nonfinite`` is the number of samples given).

    Examples:
        >>> estimate = RateEstimate(rate=0.25, low=0.05, high=0.6, count=2, total=8)
        >>> estimate.total + estimate.nonfinite
        8
    """

    rate: float
    low: float
    high: float
    count: int
    total: int
    nonfinite: int = 0


def default_threshold(image_shape: Sequence[int] | torch.Size) -> float:
    """The paper's detection threshold rescaled to an image shape.

    The paper used ``L2 < 10`` on 28x28x1 images in ``[0, 1]``, i.e. a per-pixel RMS
    distance of ``10 / 28 ≈ 0.357``. Keeping the RMS distance fixed gives

    $$
    \\tau(D) = 10 \\sqrt{D / 784}
    $$

    for ``D`` values per image: 10 at 28x28x1, 5.71 at 16x16x1, 39.6 at 3x64x64.

    Args:
        image_shape: the shape ``S`` of one image, a sequence of positive ints (numpy ints are
            accepted).

    Examples:
        >>> default_threshold((1, 28, 28))
        10.0
        >>> round(default_threshold((1, 16, 16)), 2)
        5.71
    """
    if isinstance(image_shape, (str, bytes)) or not isinstance(image_shape, Sequence):
        raise TypeError(
            f"`image_shape` must be a tuple of ints, got {type(image_shape).__name__} "
            f"{image_shape!r}"
        )
    if any(isinstance(size, bool) or not isinstance(size, Integral) for size in image_shape):
        raise TypeError(f"`image_shape` must be a tuple of ints, got {tuple(image_shape)!r}")
    if any(size < 1 for size in image_shape):
        raise ValueError(f"`image_shape` must have positive sizes, got {tuple(image_shape)!r}")
    return _PAPER_THRESHOLD * math.sqrt(math.prod(int(size) for size in image_shape) / _PAPER_NUMEL)


def _check_images(samples: object, target: object) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, *S)`` floating samples with non-empty images and a ``(*S)`` target (of either form)."""
    samples = check_tensor(samples, "samples", dims="(N, *S)", min_dim=2)
    target = check_tensor(target, "target", dims="(*S) or (1, *S)")
    if math.prod(samples.shape[1:]) == 0:
        raise ValueError(f"`samples` must hold non-empty images, got {tuple(samples.shape)}")
    if target.dim() == samples.dim():
        if target.shape[0] != 1:
            raise ValueError(f"`target` must be (*S) or (1, *S), got {tuple(target.shape)}")
        target = target[0]
    if target.shape != samples.shape[1:]:
        raise ValueError(
            f"`target` shape {tuple(target.shape)} does not match `samples` {tuple(samples.shape)}"
        )
    return samples, target


def l2_distances(samples: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Euclidean distance of every sample to ``target``, in float64.

    The norm is taken after scaling each row by its largest difference, so finite distances up
    to float64's range do not overflow in the squares.

    Args:
        samples: ``(N, *S)`` floating-point images (``N`` may be 0; the images may not be
            empty). Integer or bool images raise ``TypeError``: scale them to the target's
            range first (e.g. ``x.float() / 255``).
        target: ``(*S)`` or ``(1, *S)`` floating-point reference image.

    Returns:
        ``(N,)`` float64 distances. A sample holding NaN or ±inf values (or a non-finite
        target) gives a NaN or inf distance in its row; ``generation_rate`` reports those.

    Examples:
        >>> samples = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
        >>> l2_distances(samples, torch.zeros(2)).tolist() == [5.0, 0.0]
        True
    """
    samples, target = _check_images(samples, target)
    diff = (samples.to(torch.float64) - target.to(samples.device, torch.float64)).flatten(1)
    scale = diff.abs().amax(dim=1, keepdim=True)
    # Rows with a zero or non-finite largest entry keep scale 1: their norm is 0, inf or NaN.
    scale = torch.where(torch.isfinite(scale) & (scale > 0), scale, torch.ones_like(scale))
    return (diff / scale).norm(dim=1) * scale.squeeze(1)


def proportion_ci(
    count: int,
    total: int,
    *,
    confidence: float = 0.95,
    method: Literal["exact", "wilson"] = "exact",
) -> tuple[float, float]:
    """Two-sided confidence interval of a binomial proportion.

    Args:
        count: successes, an int with ``0 <= count <= total``.
        total: trials, an int ``> 0``.
        confidence: confidence level in ``(0, 1)``.
        method: ``"exact"`` for Clopper-Pearson (guaranteed coverage, conservative; needs
            scipy) or ``"wilson"`` for the Wilson score interval (no dependency).

    Returns:
        ``(low, high)``, finite, in ``[0, 1]``; with ``count == 0`` the low end is 0 and with
        ``count == total`` the high end is 1.

    Examples:
        >>> low, high = proportion_ci(0, 10)
        >>> low, round(high, 4)
        (0.0, 0.3085)
    """
    total = check_int(total, "total", minimum=1)
    count = check_int(count, "count", minimum=0)
    if count > total:
        raise ValueError(f"`count` must be in [0, total={total}], got {count!r}")
    confidence = check_real(
        confidence, "confidence", low=0.0, high=1.0, low_open=True, high_open=True
    )
    method = check_choice(method, "method", _METHODS)
    alpha = 1.0 - confidence
    if method == "exact":
        with needs("method='exact' (or use method='wilson')"):
            from scipy.stats import beta
        low = 0.0 if count == 0 else float(beta.ppf(alpha / 2, count, total - count + 1))
        high = 1.0 if count == total else float(beta.isf(alpha / 2, count + 1, total - count))
        return low, high
    z = NormalDist().inv_cdf(1.0 - alpha / 2)
    p = count / total
    denom = 1.0 + z * z / total
    center = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    low = 0.0 if count == 0 else max(0.0, center - half)
    high = 1.0 if count == total else min(1.0, center + half)
    return low, high


def generation_rate(
    samples: torch.Tensor,
    target: torch.Tensor,
    threshold: float | None = None,
    *,
    confidence: float = 0.95,
    method: Literal["exact", "wilson"] = "exact",
    on_nonfinite: Literal["nan", "exclude", "raise"] = "nan",
) -> RateEstimate:
    """Fraction of samples within L2 distance ``threshold`` of ``target``, with a CI.

    Samples holding any NaN or ±inf value cannot be measured. They are always counted in
    ``RateEstimate.nonfinite`` and left out of ``count`` and ``total``; ``on_nonfinite``
    decides what the rate says about them (see the module docstring for why a diverged model
    must not read as perfect unlearning).

    Args:
        samples: ``(N, *S)`` generated images, floating point, pixels in ``[0, 1]``; ``N > 0``
            and non-empty images. Integer or bool images raise ``TypeError`` (an 8-bit image
            in ``[0, 255]`` would sit ~255x too far from the target and read as a rate of 0).
        target: ``(*S)`` or ``(1, *S)`` the image whose generation is counted, floating point
            in ``[0, 1]``, finite.
        threshold: distance below which a sample counts, a finite number ``> 0``; ``None``
            uses ``default_threshold`` of the image shape (10 at 28x28, 5.71 at 16x16).
        confidence: level of the two-sided interval, in ``(0, 1)``.
        method: interval, see ``proportion_ci``.
        on_nonfinite: ``"nan"`` (default): any non-finite sample makes ``rate``, ``low`` and
            ``high`` NaN (the tallies are still reported); ``"exclude"``: the rate and its
            interval are over the finite samples only, and NaN if there is none;
            ``"raise"``: raise ``ValueError`` with the count.

    Returns:
        A ``RateEstimate``; its ``rate`` is NaN exactly when it could not be measured.

    Examples:
        >>> import torch
        >>> target = torch.ones(1, 16, 16)
        >>> samples = torch.cat([target.expand(3, 1, 16, 16), torch.zeros(97, 1, 16, 16)])
        >>> est = generation_rate(samples, target)
        >>> est.count, est.total, est.rate
        (3, 100, 0.03)
        >>> est.low < 0.03 < est.high
        True
        >>> samples[5] = float("nan")  # a diverging model: not "0% generated"
        >>> generation_rate(samples, target).rate
        nan
        >>> est = generation_rate(samples, target, on_nonfinite="exclude")
        >>> est.count, est.total, est.nonfinite
        (3, 99, 1)
    """
    samples, target = _check_images(samples, target)
    if samples.shape[0] == 0:
        raise ValueError(f"`samples` must be (N, *S) with N > 0, got {tuple(samples.shape)}")
    if threshold is None:
        threshold = default_threshold(samples.shape[1:])
    else:
        threshold = check_real(threshold, "threshold", low=0.0, low_open=True)
    check_real(confidence, "confidence", low=0.0, high=1.0, low_open=True, high_open=True)
    check_choice(method, "method", _METHODS)
    policy = check_choice(on_nonfinite, "on_nonfinite", _ON_NONFINITE)
    if not bool(torch.isfinite(target).all()):
        raise ValueError("`target` holds NaN or inf values")
    if policy == "raise":
        check_finite_rows(samples, "samples", "samples")
    bad = nonfinite_rows(samples)
    nonfinite = int(bad.sum())
    total = int(samples.shape[0]) - nonfinite
    count = int(((l2_distances(samples, target) < threshold) & ~bad).sum())
    if total == 0 or (nonfinite and policy == "nan"):
        return RateEstimate(math.nan, math.nan, math.nan, count, total, nonfinite)
    low, high = proportion_ci(count, total, confidence=confidence, method=method)
    return RateEstimate(count / total, low, high, count, total, nonfinite)
