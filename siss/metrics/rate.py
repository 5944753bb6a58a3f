"""Generation rate of a target image, with a binomial confidence interval.

The paper (Hasanaliyev et al., 2025, Sec. 5.2 and Table 2) counts a sample as the unlearned
T-shirt when its L2 distance to the T-shirt, pixels in ``[0, 1]``, is below 10 on 28x28 MNIST.
:func:`default_threshold` keeps that per-pixel RMS distance (``10 / 28``) for other sizes.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Literal, NamedTuple

import torch

__all__ = ["RateEstimate", "default_threshold", "generation_rate", "l2_distances", "proportion_ci"]

_PAPER_THRESHOLD = 10.0
_PAPER_NUMEL = 28 * 28


class RateEstimate(NamedTuple):
    """A binomial proportion with its confidence interval.

    Attributes:
        rate: ``count / total``.
        low: lower end of the confidence interval.
        high: upper end of the confidence interval.
        count: number of samples counted as the target.
        total: number of samples.
    """

    rate: float
    low: float
    high: float
    count: int
    total: int


def default_threshold(image_shape: tuple[int, ...] | torch.Size) -> float:
    """The paper's detection threshold rescaled to an image shape.

    The paper used ``L2 < 10`` on 28x28x1 images in ``[0, 1]``, i.e. a per-pixel RMS
    distance of ``10 / 28 ≈ 0.357``. Keeping the RMS distance fixed gives

    .. math:: \\tau(D) = 10 \\sqrt{D / 784}

    for ``D`` values per image: 10 at 28x28x1, 5.71 at 16x16x1, 39.6 at 3x64x64.
    """
    numel = math.prod(image_shape)
    if numel <= 0:
        raise ValueError(f"image_shape must have a positive size, got {tuple(image_shape)!r}")
    return _PAPER_THRESHOLD * math.sqrt(numel / _PAPER_NUMEL)


def l2_distances(samples: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Euclidean distance of every sample to ``target``, in float64.

    Args:
        samples: ``(N, *S)`` images.
        target: ``(*S)`` or ``(1, *S)`` the reference image.

    Returns:
        ``(N,)`` float64 distances.
    """
    if target.dim() == samples.dim():
        if target.shape[0] != 1:
            raise ValueError(f"target must be (*S) or (1, *S), got {tuple(target.shape)}")
        target = target[0]
    if target.shape != samples.shape[1:]:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match samples {tuple(samples.shape)}"
        )
    diff = samples.to(torch.float64) - target.to(samples.device, torch.float64)
    return diff.flatten(1).norm(dim=1)


def proportion_ci(
    count: int,
    total: int,
    *,
    confidence: float = 0.95,
    method: Literal["exact", "wilson"] = "exact",
) -> tuple[float, float]:
    """Two-sided confidence interval of a binomial proportion.

    Args:
        count: successes, ``0 <= count <= total``.
        total: trials, ``> 0``.
        confidence: confidence level in ``(0, 1)``.
        method: ``"exact"`` for Clopper-Pearson (guaranteed coverage, conservative; needs
            scipy) or ``"wilson"`` for the Wilson score interval (no dependency).

    Returns:
        ``(low, high)``; with ``count == 0`` the low end is 0 and with ``count == total`` the
        high end is 1.
    """
    if total <= 0:
        raise ValueError(f"total must be positive, got {total!r}")
    if not 0 <= count <= total:
        raise ValueError(f"count must be in [0, total={total}], got {count!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    alpha = 1.0 - confidence
    if method == "exact":
        try:
            from scipy.stats import beta
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("method='exact' needs scipy; use method='wilson'") from err
        low = 0.0 if count == 0 else float(beta.ppf(alpha / 2, count, total - count + 1))
        high = 1.0 if count == total else float(beta.isf(alpha / 2, count + 1, total - count))
        return low, high
    if method == "wilson":
        z = NormalDist().inv_cdf(1.0 - alpha / 2)
        p = count / total
        denom = 1.0 + z * z / total
        center = (p + z * z / (2 * total)) / denom
        half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
        low = 0.0 if count == 0 else max(0.0, center - half)
        high = 1.0 if count == total else min(1.0, center + half)
        return low, high
    raise ValueError(f"method must be 'exact' or 'wilson', got {method!r}")


def generation_rate(
    samples: torch.Tensor,
    target: torch.Tensor,
    threshold: float | None = None,
    *,
    confidence: float = 0.95,
    method: Literal["exact", "wilson"] = "exact",
) -> RateEstimate:
    """Fraction of samples within L2 distance ``threshold`` of ``target``, with a CI.

    Args:
        samples: ``(N, *S)`` generated images, pixels in ``[0, 1]``.
        target: ``(*S)`` or ``(1, *S)`` the image whose generation is counted, in ``[0, 1]``.
        threshold: distance below which a sample counts; ``None`` uses
            :func:`default_threshold` of the image shape (10 at 28x28, 5.71 at 16x16).
        confidence: level of the two-sided interval.
        method: interval, see :func:`proportion_ci`.

    Returns:
        A :class:`RateEstimate`.

    Example:
        >>> import torch
        >>> target = torch.ones(1, 16, 16)
        >>> samples = torch.cat([target.expand(3, 1, 16, 16), torch.zeros(97, 1, 16, 16)])
        >>> est = generation_rate(samples, target)
        >>> est.count, est.total, est.rate
        (3, 100, 0.03)
        >>> est.low < 0.03 < est.high
        True
    """
    if samples.dim() < 2 or samples.shape[0] == 0:
        raise ValueError(f"samples must be (N, *S) with N > 0, got {tuple(samples.shape)}")
    if threshold is None:
        threshold = default_threshold(samples.shape[1:])
    elif not threshold > 0:
        raise ValueError(f"threshold must be positive, got {threshold!r}")
    count = int((l2_distances(samples, target) < threshold).sum())
    total = int(samples.shape[0])
    low, high = proportion_ci(count, total, confidence=confidence, method=method)
    return RateEstimate(count / total, low, high, count, total)
