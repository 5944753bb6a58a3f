"""Generation check: how often does the model generate each forget image?

A sample "is" forget image ``a`` when its distance to ``a`` under a feature map is below a
threshold. Per forget image the check reports the rate of such samples with an exact
(Clopper-Pearson) binomial interval, the nearest sample's distance, and the indices of the
nearest samples (a gallery, for a picture).

Default feature map and threshold (the paper's, Hasanaliyev et al. 2025, Sec. 5.2): pixels mapped
from ``data_range`` to ``[0, 1]`` and flattened, Euclidean distance, threshold
``siss.metrics.default_threshold(S)``: ``L2 < 10`` on 28x28x1 images in ``[0, 1]``, i.e. a fixed
per-pixel RMS distance of ``10 / 28`` (5.71 at 16x16x1). Scale: for the digits data in
``[-1, 1]`` (``data_range=(-1, 1)``) the images are mapped by ``(x + 1) / 2`` first, so the
threshold 5.71 in ``[0, 1]`` units is an L2 distance of 11.4 on the raw ``[-1, 1]`` pixels.
With your own ``features`` (SSCD, DINO, CLIP embeddings) there is no default scale: pass
``threshold`` in that feature space.

Verdict (``held``): the model holds the image if at least one sample lies within the threshold
(``count >= 1``, i.e. the rate's exact interval excludes 0). The threshold decides what
"generates" means; calibrate it on non-member images when the data has near-duplicates (a
digits model generates many "1"s close to any "1"). ``held`` is ``False`` with ``count == 0``,
and the reason states the rate's upper bound (``0 of N`` only bounds the rate by about
``3.7 / N`` at 95%).

Overshot (with ``reference`` images): the mirror of "held" asks whether the model generates
*less* near the forget image than near comparable non-members. Each image's nearest-sample
distance is ranked among the reference images' own nearest-sample distances (statistic
``"nearest_percentile"``, the share of references whose nearest sample is at least as close,
exact interval; ``siss.audit._stats.rank_against_reference``); the verdict is ``"overshot"``
when no sample is within the threshold and the share of references whose nearest sample is at
least as far has its interval below ``percentile`` (5%): the samples avoid the forget image
more than almost all non-members (needs 72 references at 5%, as every percentile verdict).

Non-finite samples (a diverged model): counted; if any sample holds NaN or inf, the rate and the
nearest distance have status ``"non-finite"`` (never a 0 rate) and ``held`` is ``None``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Real

import torch
from torch import Tensor

from siss.audit._inputs import check_fraction, check_images, check_int
from siss.audit._inputs import check_range as _check_range  # also imported by siss.audit.run
from siss.audit._stats import rank_against_reference
from siss.audit.report import CheckResult, Estimate, Verdict, held_of
from siss.metrics.rate import default_threshold, proportion_ci

__all__ = ["generation_check", "pixel_features"]

FeatureMap = Callable[[Tensor], Tensor]


def pixel_features(images: Tensor, data_range: tuple[float, float] = (-1.0, 1.0)) -> Tensor:
    """The default feature map: pixels mapped from ``data_range`` to ``[0, 1]``, flattened.

    Args:
        images: ``(N, *S)`` floating images in ``data_range`` (not clamped).
        data_range: ``(lo, hi)`` of the data.

    Returns:
        ``(N, prod(S))`` float64 features ``(x - lo) / (hi - lo)``.
    """
    lo, hi = data_range
    return ((images.to(torch.float64) - lo) / (hi - lo)).flatten(1)


def check_confidence(confidence: object) -> float:
    """A confidence level in ``(0, 1)``."""
    return check_fraction(confidence, "confidence")


def _features(features: FeatureMap, images: Tensor, name: str) -> Tensor:
    out = features(images)
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != images.shape[0]:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"`features` must map {name} ({images.shape[0]} images) to a (N, F) tensor, got {shape}"
        )
    return out.to(torch.float64)


def check_threshold(threshold: object, name: str = "threshold") -> float:
    """The copy threshold: a finite number ``> 0``, as a float."""
    if isinstance(threshold, bool) or not isinstance(threshold, Real):
        raise TypeError(f"`{name}` must be a number, got {threshold!r}")
    threshold = float(threshold)
    if not (math.isfinite(threshold) and threshold > 0):
        raise ValueError(f"`{name}` must be finite and > 0, got {threshold!r}")
    return threshold


def generation_check(
    samples: Tensor,
    forget: Tensor,
    *,
    features: FeatureMap | None = None,
    threshold: float | None = None,
    data_range: tuple[float, float] = (-1.0, 1.0),
    confidence: float = 0.95,
    gallery: int = 8,
    batch_size: int = 1024,
    reference: Tensor | None = None,
    percentile: float = 0.05,
) -> list[CheckResult]:
    """Per forget image: the rate at which ``samples`` reproduce it, with an exact interval.

    Args:
        samples: ``(N, *S)`` generated images (e.g. from ``siss.audit.sampling.generate``),
            floating point, in ``data_range``; ``N >= 1``. Rows with NaN or inf are counted
            (see the module docstring).
        forget: ``(M, *S)`` finite images to forget (or one image ``(*S)``), same space.
        features: ``features(images (B, *S)) -> (B, F)``, the feature map distances are taken
            in; ``None`` for ``pixel_features`` (pixels in ``[0, 1]``). Called in batches of
            ``batch_size`` under ``torch.inference_mode``.
        threshold: a sample counts as the image when its Euclidean feature distance is
            ``< threshold`` (finite, ``> 0``). ``None`` is allowed with the default features
            only: ``siss.metrics.default_threshold(S)`` (the paper's, see the module docstring).
        data_range: ``(lo, hi)`` of the images, for the default features.
        confidence: level of the rate's two-sided Clopper-Pearson interval, in ``(0, 1)``.
        gallery: how many nearest samples to list in ``details`` (``>= 0``).
        batch_size: images per ``features`` call.

    Returns:
        One ``CheckResult("generation", i, ...)`` per forget image with statistics ``"rate"``
        (``held_when="higher"``, ``n`` = finite samples) and ``"nearest_distance"``
        (``held_when="lower"``), and ``details`` with ``count``, ``finite_samples``,
        ``nonfinite_samples``, ``threshold``, ``gallery`` (indices into ``samples``, nearest
        first) and ``gallery_distances``.

    Raises:
        ValueError, TypeError: naming the argument (shapes, a non-finite ``forget``, a custom
            ``features`` without ``threshold``), before any feature is computed.
    """
    samples = check_images(samples, "samples", finite=False)
    if isinstance(forget, Tensor) and forget.dim() == samples.dim() - 1:
        forget = forget.unsqueeze(0)
    forget = check_images(forget, "forget", like=samples, like_name="samples")
    confidence = check_confidence(confidence)
    gallery = check_int(gallery, "gallery", minimum=0)
    batch_size = check_int(batch_size, "batch_size")
    percentile = check_fraction(percentile, "percentile")
    if reference is not None:
        reference = check_images(reference, "reference", rows=0, like=forget, like_name="forget")
    lo, hi = _check_range(data_range)
    if features is None:
        feature_name = f"pixels mapped from [{lo:g}, {hi:g}] to [0, 1]"
        if threshold is None:
            threshold = default_threshold(tuple(samples.shape[1:]))

        def features(images: Tensor) -> Tensor:
            return pixel_features(images, (lo, hi))

    else:
        if not callable(features):
            raise TypeError(f"`features` must be callable, got {type(features).__name__}")
        feature_name = getattr(features, "__name__", type(features).__name__)
        if threshold is None:
            raise ValueError(
                "`threshold` is required with a custom `features` map: the default (the paper's "
                "L2 < 10 at 28x28 in [0, 1]) is on the pixel scale only"
            )
    threshold = check_threshold(threshold)

    bad = ~torch.isfinite(samples).reshape(samples.shape[0], -1).all(dim=1)
    finite_idx = (~bad).nonzero().flatten()
    with torch.inference_mode():
        target = _features(features, forget, "`forget`")
        parts = [
            _features(features, samples[finite_idx[i : i + batch_size]], "`samples`")
            for i in range(0, len(finite_idx), batch_size)
        ]
    if not bool(torch.isfinite(target).all()):
        raise ValueError("`features` of `forget` hold NaN or inf values")
    feats = torch.cat(parts) if parts else target.new_zeros(0, target.shape[1])
    # Features that are non-finite for finite images: the feature model failed; not measured.
    bad_feat = ~torch.isfinite(feats).all(dim=1)
    if bool(bad_feat.any()):
        bad[finite_idx[bad_feat]] = True
        finite_idx, feats = finite_idx[~bad_feat], feats[~bad_feat]
    nonfinite, total = int(bad.sum()), len(finite_idx)
    distances = torch.cdist(target, feats.to(target.device)) if total else None  # (M, n)
    reference_nearest = None
    if reference is not None and len(reference) and distances is not None:
        with torch.inference_mode():
            own = torch.cat(
                [
                    _features(features, reference[i : i + batch_size], "`reference`")
                    for i in range(0, len(reference), batch_size)
                ]
            )
        reference_nearest = torch.cdist(own.to(target.device), feats.to(target.device)).amin(1)

    results = []
    for i in range(forget.shape[0]):
        details: dict = {
            "threshold": threshold,
            "feature_map": feature_name,
            "finite_samples": total,
            "nonfinite_samples": nonfinite,
            "gallery": [],
            "gallery_distances": [],
        }
        count = 0
        if distances is not None:
            row = distances[i]
            count = int((row < threshold).sum())
            order = row.argsort()[:gallery]
            details["gallery"] = finite_idx[order.to(finite_idx.device)].tolist()
            details["gallery_distances"] = row[order].tolist()
            details["count"] = count
        rule = f"held if at least one sample is within distance {threshold:.4g} ({feature_name})"
        if nonfinite:
            why = (
                f"{nonfinite} of {samples.shape[0]} samples hold NaN or inf (a diverged model?): "
                "the rate is not measured, never read as 0"
            )
            details["finite_only_count"] = details.pop("count", 0)
            results.append(
                CheckResult(
                    "generation",
                    i,
                    {
                        "rate": Estimate.missing(why, "higher", n=total, status="non-finite"),
                        "nearest_distance": Estimate.missing(
                            why, "lower", n=total, status="non-finite"
                        ),
                    },
                    None,
                    f"undecided: {why}; {rule}",
                    details,
                )
            )
            continue
        low, high = proportion_ci(count, total, confidence=confidence)
        rate = Estimate(
            count / total,
            low,
            high,
            total,
            "higher",
            note=(
                f"fraction of {total} samples within distance {threshold:.4g} ({feature_name}); "
                "exact Clopper-Pearson interval"
            ),
            confidence=confidence,
        )
        nearest = Estimate(
            float(distances[i].min()),
            math.nan,
            math.nan,
            total,
            "lower",
            note=f"smallest distance over {total} samples ({feature_name}); no interval "
            "(an extreme order statistic)",
            confidence=confidence,
        )
        statistics = {"rate": rate, "nearest_distance": nearest}
        verdict: Verdict = "held" if count >= 1 else "not held"
        reason = (
            f"held: {count} of {total} samples within the threshold; {rule}"
            if count >= 1
            else f"not held: 0 of {total} samples within the threshold (rate <= {high:.3g} at "
            f"{confidence:.0%}); {rule}"
        )
        if reference is not None:
            rank, ranked, why, more = rank_against_reference(
                nearest.value,
                reference_nearest,
                held_when="lower",
                percentile=percentile,
                confidence=confidence,
                statistic="nearest-sample distance",
            )
            statistics["nearest_percentile"] = rank
            details["reference_values"] = (
                [] if reference_nearest is None else reference_nearest.cpu().tolist()
            )
            details.update({f"nearest_{k}": v for k, v in more.items()})
            if count == 0 and ranked == "overshot":
                verdict = "overshot"
                reason = f"overshot: 0 of {total} samples within the threshold; {why}"
            else:
                reason += f"; overshot if none is and the nearest sample is far: {why}"
        results.append(
            CheckResult("generation", i, statistics, held_of(verdict), reason, details, verdict)
        )
    return results
