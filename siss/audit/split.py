"""Which generated images are copies of a memorized training image: the split into A and X \\ A.

The paper's Stable Diffusion experiment (Section 5.3) samples 128 images for a memorized prompt
and labels each as memorized (A) or not (X \\ A) with a k-means classifier; the labelled sets are
then the forget and keep data of SISS, and the same labelling counts the memorized samples after
unlearning ("0 of 16"). Two rules, one result type (``MemorizationSplit``):

* **Reference** (``split_by_reference``): the user has the training image to remove. An image
  is memorized when its feature distance to the reference is below a threshold (or its cosine
  similarity above one). On pixels the convention of ``siss.audit.generation`` holds: pixels
  mapped to ``[0, 1]``, Euclidean distance, threshold ``siss.metrics.default_threshold(S)`` (the
  paper's ``L2 < 10`` at 28x28, a per-pixel RMS distance of 0.357).
* **2-means** (``split_by_clustering``): no reference. sklearn's ``KMeans(n_clusters=2)`` on
  the features; the memorized cluster is the *tight*, near-duplicate one. With ``s_t`` the
  within-cluster spread of the tight cluster (RMS distance of its members to its centre), ``s_o``
  the other cluster's and ``d`` the distance between the centres, the rule compares ``s_t`` to
  ``r_o = sqrt(s_o^2 + d^2)``, the RMS distance of the *other* images to the tight centre::

      ratio = s_t / r_o,     found  iff  ratio <= tightness  (default 0.25)

  Copies of one image sit close to their centre while the other images are far from it: a small
  ratio. A prompt without memorization still splits into two clusters, but two parts of one
  spread-out population: their ratio is large (0.93 to 0.98 for 128 Gaussian images of 100 or
  more features) and the split is reported as "not found" with its statistics, never forced. The
  default 0.25 sits below the large-sample ratio of a 2-means split of a one-dimensional
  single-mode population, ``1 / sqrt(13) = 0.277`` for a uniform cut in half and
  ``sqrt((1 - 2/pi) / (1 + 6/pi)) = 0.353`` for a Gaussian; in more dimensions the ratio of such a
  split grows toward 1. The ratio is scale-free (multiplying every feature by the same factor
  changes nothing), and the split does not depend on the order of the images.

  A cluster smaller than ``min_size`` (default 2: a single odd image) is not a group: its images
  are set aside as outliers and the rest is clustered again. Limits, inherent to a rule without
  a reference: when *every* image is a copy there is no second group, and the spread of the
  copies alone cannot tell them from diverse images (the reason says so: look at the grid, or
  give a reference image); and a few copies among many diverse images can go unfound (2-means
  prefers the split of lowest within-cluster variance; a second start from the densest image
  helps, see ``split_by_clustering``).
  The large-sample bounds above are for many images; in one or two dimensions, chance gaps in a
  small sample lower the ratio (a 1-D uniform sample of 128 gives 0.23 to 0.28, so 4 of 10 such
  draws come out "found"): the rule is meant for image features of many dimensions (measured
  false-alarm rates: ``split_by_clustering``).

Features: ``pixel_features`` by default (no download), ``vae_features`` (the pipeline's
own VAE), ``image_encoder_features`` (a CLIP / DINOv2 image model from a local folder, or any
callable such as an SSCD torchscript module); a feature map takes images ``(N, 3, H, W)`` in
``[-1, 1]`` and returns ``(N, F)`` features.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from siss._optional import needs
from siss.audit._inputs import check_images, check_int, check_range
from siss.audit.generation import pixel_features

__all__ = [
    "MemorizationSplit",
    "image_encoder_features",
    "memorization_split",
    "split_by_clustering",
    "split_by_reference",
    "vae_features",
]

FeatureMap = Callable[[Tensor], Tensor]
METRICS = ("euclidean", "cosine")
DEFAULT_TIGHTNESS = 0.25


def _json_number(value: Any) -> Any:
    """A JSON-safe number: ints stay ints, non-finite floats become ``None``."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, Integral):
        return int(value)
    number = float(value)
    return number if math.isfinite(number) else None


@dataclass
class MemorizationSplit:
    """The split of ``N`` images into memorized (A) and not memorized (X \\ A).

    Attributes:
        memorized: ``(N,)`` bool, True where the image is a copy of the memorized one (all False
            when ``found`` is False).
        rule: ``"reference"`` or ``"2-means"``.
        found: whether a memorized group exists (False: "no memorization", see ``reason``).
        threshold: the rule's threshold on the distance to the memorized centre (a similarity
            for ``metric="cosine"``): the reference rule's given one, or the middle of the gap
            the split measured (``gap_low``, ``gap_high`` in ``statistics``); ``None`` when no
            memorized group was found.
        scores: ``(N,)`` float64, the per-image score the rule thresholded: the distance (or
            similarity) to the nearest reference row; for 2-means the distance to the tight
            cluster's centre. NaN where not measured (a degenerate 2-means input).
        statistics: the numbers behind the decision. Reference: ``count``, ``total``,
            ``nearest`` (the best score), ``median``. 2-means: ``spread_tight``,
            ``spread_other`` (RMS distance of each cluster's members to its centre),
            ``separation`` (between the centres), ``other_to_tight`` (RMS distance of the other
            images to the tight centre), ``ratio`` (``spread_tight / other_to_tight``, the
            quantity compared with ``tightness``), ``spread_ratio`` (``spread_tight /
            spread_other``), ``size_tight``, ``size_other``, ``set_aside`` (outliers).
        reason: one sentence: why found or not found.
        metric: ``"euclidean"`` or ``"cosine"`` (reference rule); ``"euclidean"`` for 2-means.
        tightness, min_size, seed: the 2-means rule's parameters (``None`` for the reference
            rule).
        features: a description of the feature map (e.g. ``"pixels mapped from [-1, 1] to [0,
            1]"``); empty when the features were given directly.
        clusters: 2-means: ``(N,)`` int64, 0 for the tight cluster (the candidate A), 1 for the
            other, 2 for outliers set aside (clusters smaller than ``min_size``); ``None``
            otherwise or when no clustering was possible.
        centres: 2-means: ``(2, F)`` float64 feature-space centres, tight first.
        reference_features: reference rule: ``(R, F)`` float64 reference features.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> copies = torch.randn(1, 50, generator=g) + 0.01 * torch.randn(6, 50, generator=g)
        >>> others = torch.randn(10, 50, generator=g)
        >>> split = split_by_clustering(torch.cat([copies, others]))
        >>> split.found, split.counts, split.memorized[:6].all().item()
        (True, (6, 10), True)
    """

    memorized: Tensor
    rule: str
    found: bool
    threshold: float | None
    scores: Tensor
    statistics: dict[str, float]
    reason: str
    metric: str = "euclidean"
    tightness: float | None = None
    min_size: int | None = None
    seed: int | None = None
    features: str = ""
    start: str | None = None
    clusters: Tensor | None = field(default=None, repr=False)
    centres: Tensor | None = field(default=None, repr=False)
    reference_features: Tensor | None = field(default=None, repr=False)

    @property
    def counts(self) -> tuple[int, int]:
        """``(memorized, not memorized)`` image counts."""
        memorized = int(self.memorized.sum())
        return memorized, int(self.memorized.numel()) - memorized

    @property
    def rule_text(self) -> str:
        """The rule in words, with its parameters."""
        if self.rule == "reference":
            if self.threshold is None:
                return (
                    "memorized if near the reference, below the middle of the gap between the "
                    "2-means memorized group and the other images (none found)"
                )
            if self.metric == "cosine":
                return f"memorized if cosine similarity to the reference > {self.threshold:.6g}"
            return f"memorized if Euclidean distance to the reference < {self.threshold:.6g}"
        text = (
            f"2-means (sklearn KMeans, random_state={self.seed}; k-means++ with n_init=10, and "
            "from the densest image and the mean; the partition with the tighter group kept); "
            f"a memorized group exists if spread_tight / other_to_tight <= "
            f"{self.tightness:g}; clusters of fewer than {self.min_size} images set aside"
        )
        if self.threshold is not None:
            text += (
                f"; memorized if Euclidean distance to the tight centre < {self.threshold:.6g} "
                "(the middle of the gap between its members and the other images)"
            )
        return text

    def classify(self, features: Tensor) -> Tensor:
        """The rule applied to new images' features ``(M, F)`` (e.g. fresh samples after
        unlearning): ``(M,)`` bool.

        One rule for both ways of finding the copies: an image is memorized when its distance to
        the memorized centre (the reference, or the tight cluster's centre) is below
        ``threshold`` (with ``metric="cosine"``: its similarity above it). For 2-means the
        threshold is the split's own gap (``split_by_clustering``); all False when the split
        found no memorized group. The paper's k-means classifier (the nearer centre) is
        ``classify_nearer_centre``, reported beside this one, never deciding.
        """
        features = _check_features(features, "features", rows=1)
        if self.rule == "reference":
            if self.reference_features is None or self.threshold is None:
                raise ValueError("this split holds no reference features to classify against")
            scores = _reference_scores(features, self.reference_features, self.metric)
            return _below(scores, float(self.threshold), self.metric)
        if self.centres is None or not self.found or self.threshold is None:
            return torch.zeros(features.shape[0], dtype=torch.bool)
        self._check_width(features)
        return (features - self.centres[0]).norm(dim=1) < self.threshold

    def classify_nearer_centre(self, features: Tensor) -> Tensor:
        """The paper's k-means classifier on ``(M, F)`` features: ``(M,)`` bool, memorized when
        the tight centre is the nearer of the two (2-means only; all False when no memorized
        group was found). It calls a faint ghost of the memorized image a copy as soon as it is
        nearer the copies' centre than the other images' mean, whatever its distance: the job
        reports it beside ``classify`` and decides with ``classify``."""
        features = _check_features(features, "features", rows=1)
        if self.rule == "reference":
            return self.classify(features)
        if self.centres is None or not self.found:
            return torch.zeros(features.shape[0], dtype=torch.bool)
        self._check_width(features)
        distances = torch.cdist(features, self.centres)
        return distances[:, 0] < distances[:, 1]

    def _check_width(self, features: Tensor) -> None:
        assert self.centres is not None
        if features.shape[1] != self.centres.shape[1]:
            raise ValueError(
                f"`features` have {features.shape[1]} dimensions but the split's centres "
                f"{self.centres.shape[1]}: use the same feature map"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: the rule, its parameters, the statistics and the per-image results.

        With the images and the same feature map the rule can be re-applied from this: for
        2-means the centres are the means of the features of ``clusters == 0`` and ``== 1``;
        for the reference rule the reference image, ``metric`` and ``threshold``. Non-finite
        numbers are written as ``null``.
        """
        memorized, rest = self.counts
        return {
            "rule": self.rule,
            "rule_text": self.rule_text,
            "found": bool(self.found),
            "reason": self.reason,
            "metric": self.metric,
            "threshold": _json_number(self.threshold),
            "tightness": _json_number(self.tightness),
            "min_size": self.min_size,
            "seed": self.seed,
            "features": self.features,
            "start": self.start,
            "counts": {"memorized": memorized, "not_memorized": rest, "total": memorized + rest},
            "statistics": {key: _json_number(v) for key, v in self.statistics.items()},
            "memorized": [bool(v) for v in self.memorized.tolist()],
            "memorized_indices": [int(i) for i in self.memorized.nonzero().flatten().tolist()],
            "scores": [_json_number(v) for v in self.scores.tolist()],
            "clusters": None if self.clusters is None else [int(v) for v in self.clusters],
        }


# --------------------------------------------------------------------------------------------
# Checks and scores
# --------------------------------------------------------------------------------------------


def _check_features(features: object, name: str, rows: int) -> Tensor:
    """``(N, F)`` finite floating features with ``N >= rows``, as float64 on the CPU."""
    if not isinstance(features, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor (N, F), got {type(features).__name__}")
    if not features.is_floating_point():
        raise TypeError(f"`{name}` must be a floating-point tensor, got dtype {features.dtype}")
    if features.ndim != 2 or features.shape[1] == 0:
        raise ValueError(
            f"`{name}` must have shape (N, F) with F >= 1, got {tuple(features.shape)}"
        )
    if features.shape[0] < rows:
        what = "is empty" if features.shape[0] == 0 else f"has {features.shape[0]} row"
        raise ValueError(
            f"`{name}` {what}: the split needs at least {rows} images"
            + (" (two clusters)" if rows == 2 else "")
        )
    features = features.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(features).all()):
        bad = (~torch.isfinite(features).all(1)).nonzero().flatten()[:5].tolist()
        raise ValueError(f"`{name}` holds NaN or inf values (rows {bad})")
    return features


def _check_metric(metric: object) -> str:
    if metric not in METRICS:
        raise ValueError(f"`metric` must be one of {METRICS}, got {metric!r}")
    return str(metric)


def _check_threshold(threshold: object, metric: str) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, Real):
        raise TypeError(f"`threshold` must be a number, got {threshold!r}")
    value = float(threshold)
    if metric == "euclidean" and not (math.isfinite(value) and value > 0):
        raise ValueError(f"`threshold` must be a finite distance > 0, got {threshold!r}")
    if metric == "cosine" and not -1.0 < value < 1.0:
        raise ValueError(f"`threshold` must be a cosine similarity in (-1, 1), got {threshold!r}")
    return value


def _unit(features: Tensor, name: str) -> Tensor:
    norms = features.norm(dim=1, keepdim=True)
    if bool((norms == 0).any()):
        raise ValueError(f"`{name}` has all-zero rows: the cosine similarity is undefined")
    return features / norms


def _reference_scores(features: Tensor, reference: Tensor, metric: str) -> Tensor:
    """``(N,)`` distance to the nearest reference row, or cosine similarity to the most
    similar one."""
    if metric == "cosine":
        similarity = _unit(features, "features") @ _unit(reference, "reference_features").T
        return similarity.max(1).values
    return torch.cdist(features, reference).min(1).values


def _gap_threshold(scores: Tensor, copy: Tensor, metric: str) -> tuple[float, dict[str, float]]:
    """The threshold on ``scores`` ``(M,)`` that best reproduces the labels ``copy`` ``(M,)``
    (both groups non-empty), at the middle of its gap.

    Sorted by score (distances ascending; similarities descending), every cut between two
    neighbours is a candidate: the one that disagrees with the fewest labels wins, the widest gap
    among equals, and the threshold is the gap's middle. Returns it and ``gap_low``,
    ``gap_high`` (the scores either side, in the metric's units) and ``disagreements``.
    """
    sign = -1.0 if metric == "cosine" else 1.0
    values, order = (sign * scores).sort()
    labels = copy[order].to(torch.int64)
    # a cut after position c (1 <= c < M) calls the first c copies: the non-copies among them
    # and the copies after them disagree with the labels
    above = labels.cumsum(0)[:-1]
    cut = torch.arange(1, len(values), dtype=torch.int64)
    wrong = (cut - above) + (labels.sum() - above)
    width = values[1:] - values[:-1]
    best = int(torch.nonzero(wrong == wrong.min()).flatten()[width[wrong == wrong.min()].argmax()])
    low, high = float(sign * values[best]), float(sign * values[best + 1])
    return (low + high) / 2, {
        "gap_low": low,
        "gap_high": high,
        "disagreements": int(wrong[best]),
    }


def _below(scores: Tensor, threshold: float, metric: str) -> Tensor:
    return scores > threshold if metric == "cosine" else scores < threshold


# --------------------------------------------------------------------------------------------
# The two rules
# --------------------------------------------------------------------------------------------


def split_by_reference(
    features: Tensor,
    reference_features: Tensor,
    *,
    threshold: float,
    metric: str = "euclidean",
) -> MemorizationSplit:
    """Memorized: the images whose features lie within ``threshold`` of the reference.

    Args:
        features: ``(N, F)`` features of the generated images, ``N >= 1``.
        reference_features: ``(F,)`` or ``(R, F)`` features of the training image to remove (or
            of several views of it: an image is memorized when it is close to any row).
        threshold: ``metric="euclidean"``: memorized if the distance is ``< threshold`` (the
            audit's generation-check convention; on pixels in ``[0, 1]`` use
            ``siss.metrics.default_threshold(S)``). ``metric="cosine"``: memorized if the cosine
            similarity is ``> threshold``, in ``(-1, 1)`` (for L2-normalised embeddings such as
            ``image_encoder_features``'; Somepalli et al. (2023) count an SSCD similarity
            above 0.5 as a replica; calibrate yours on known copies and non-copies).
        metric: ``"euclidean"`` or ``"cosine"``.

    Returns:
        A ``MemorizationSplit`` with ``rule="reference"``; ``found`` when at least one
        image passes the threshold.

    Raises:
        TypeError, ValueError: naming the argument (empty or non-finite features, a reference
            of another width, a threshold out of range, all-zero rows with ``"cosine"``).

    Examples:
        >>> features = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.1, 0.0]], dtype=torch.float64)
        >>> split = split_by_reference(features, torch.zeros(2), threshold=1.0)
        >>> split.memorized.tolist(), split.scores.tolist()
        ([True, False, True], [0.0, 5.0, 0.1])
    """
    metric = _check_metric(metric)
    features = _check_features(features, "features", rows=1)
    if isinstance(reference_features, Tensor) and reference_features.ndim == 1:
        reference_features = reference_features.unsqueeze(0)
    reference = _check_features(reference_features, "reference_features", rows=1)
    if reference.shape[1] != features.shape[1]:
        raise ValueError(
            f"`reference_features` has {reference.shape[1]} features per row but `features` "
            f"{features.shape[1]}: compute both with the same feature map (shape (F,) or (R, F))"
        )
    threshold = _check_threshold(threshold, metric)
    scores = _reference_scores(features, reference, metric)
    memorized = _below(scores, threshold, metric)
    count, total = int(memorized.sum()), int(features.shape[0])
    best = float(scores.max() if metric == "cosine" else scores.min())
    if metric == "cosine":
        rule = f"cosine similarity to the reference > {threshold:.4g}"
    else:
        rule = f"distance to the reference < {threshold:.4g}"
    if count:
        reason = f"{count} of {total} images have {rule}"
    else:
        word = "highest similarity" if metric == "cosine" else "nearest distance"
        reason = f"no image has {rule} (the {word} is {best:.4g}): no memorized image found"
    return MemorizationSplit(
        memorized=memorized,
        rule="reference",
        found=count > 0,
        threshold=threshold,
        scores=scores,
        statistics={
            "count": count,
            "total": total,
            "nearest": best,
            "median": float(scores.median()),
        },
        reason=reason,
        metric=metric,
        reference_features=reference,
    )


def _check_tightness(tightness: object) -> float:
    if isinstance(tightness, bool) or not isinstance(tightness, Real):
        raise TypeError(f"`tightness` must be a number in (0, 1], got {tightness!r}")
    if not 0.0 < float(tightness) <= 1.0:
        raise ValueError(f"`tightness` must be in (0, 1], got {tightness!r}")
    return float(tightness)


def _kmeans(array: Any, seed: int, init: Any = None) -> Any:
    with needs("split_by_clustering"):
        from sklearn.cluster import KMeans
    if init is None:
        model = KMeans(n_clusters=2, n_init=10, random_state=seed)
    else:
        model = KMeans(n_clusters=2, init=init, n_init=1, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. ConvergenceWarning on many duplicate rows
        return model.fit_predict(array)


def _canonical_order(array: Any) -> Any:
    """Row indices of ``array`` ``(M, F)`` in lexicographic order of the rows (ties: identical
    rows, interchangeable). ``np.lexsort`` over all ``F`` columns costs a pass per column (8 s
    for 128 images of 512x512x3 pixels), so the rows are sorted on their first 8 columns and only
    the runs still tied there are compared in full."""
    import functools

    import numpy as np

    head = min(array.shape[1], 8)
    order = np.lexsort(array[:, :head].T[::-1])
    if array.shape[1] == head:
        return order
    keys = array[order, :head]
    tied = np.all(keys[1:] == keys[:-1], axis=1)
    if not tied.any():
        return order

    def compare(i: int, j: int) -> int:
        differ = np.flatnonzero(array[i] != array[j])
        if differ.size == 0:
            return 0
        return -1 if array[i, differ[0]] < array[j, differ[0]] else 1

    start = 0
    for end in [*(np.flatnonzero(~tied) + 1).tolist(), len(order)]:
        if end - start > 1:
            run = sorted(order[start:end].tolist(), key=functools.cmp_to_key(compare))
            order[start:end] = run
        start = end
    return order


# Above this many features (and more features than images), 2-means runs on coordinates with the
# same pairwise distances in at most N dimensions: sklearn's KMeans on 128 raw 512x512x3 images
# takes 16 s per start.
_PROJECT_ABOVE = 256


def _coordinates(features: Tensor, index: Tensor) -> Tensor:
    """``features[index]`` ``(M, F)``, or when ``F`` is large, ``(M, M)`` coordinates ``Y`` with
    ``Y Y^T = X X^T`` (the Gram matrix, from its eigendecomposition): every pairwise distance
    and inner product, hence every 2-means partition, is that of the features. The Gram matrix is
    summed over column chunks of the rows in ``index`` order (no full copy of the features; the
    same sums whatever the input order)."""
    m, f = features.shape
    if f <= max(m, _PROJECT_ABOVE):
        return features[index]
    gram = torch.zeros(m, m, dtype=torch.float64)
    for start in range(0, f, 65536):
        chunk = features[index, start : start + 65536]
        gram += chunk @ chunk.T
    values, vectors = torch.linalg.eigh(gram)
    return vectors * values.clamp(min=0).sqrt()


def _two_means(
    features: Tensor, seed: int, min_size: int
) -> tuple[Tensor, list[tuple[str, Tensor, int]]]:
    """Candidate 2-means partitions of ``features`` ``(M, F)`` (at least two distinct rows).

    Returns the coordinates the clustering ran on, ``(M, D)`` in the rows' order (the features,
    or ``_coordinates``' with the same distances), and the candidates ``(start, labels (M,),
    label of the lexicographically first row)``.

    Two starts: sklearn's k-means++ (10 of them, the lowest within-cluster variance kept), and
    Lloyd's iterations started from the densest image (the one nearest to its second nearest
    neighbour; its ``(min_size - 1)``-th for ``min_size > 3``) and the mean of all: a group of
    copies too small to beat a split of the diverse images in variance is still a fixed point of
    2-means from there. Rows are taken in lexicographic order, so neither depends on their order.
    """
    import numpy as np

    order = _canonical_order(features.numpy())
    index = torch.from_numpy(order)
    coordinates = _coordinates(features, index)
    points = coordinates.numpy()
    starts = [("k-means++", _kmeans(points, seed))]
    neighbour = min(max(min_size - 1, 2), len(points) - 1)
    distances = torch.cdist(coordinates, coordinates)
    densest = int(distances.sort(dim=1).values[:, neighbour].argmin())
    init = np.stack([points[densest], points.mean(0)])
    if not np.array_equal(init[0], init[1]):
        starts.append(("densest image", _kmeans(points, seed, init)))
    candidates = []
    for name, sorted_labels in starts:
        labels = torch.empty(len(points), dtype=torch.int64)
        labels[index] = torch.from_numpy(np.asarray(sorted_labels).astype("int64"))
        candidates.append((name, labels, int(sorted_labels[0])))
    in_row_order = torch.empty_like(coordinates)
    in_row_order[index] = coordinates
    return in_row_order, candidates


def _describe_split(rows: Tensor, labels: Tensor, first: int) -> dict[str, Any]:
    """The tight cluster of a 2-cluster partition of ``rows`` ``(M, D)`` and its statistics (all
    from distances: the clustering coordinates give the features' values)."""
    sizes = [int((labels == k).sum()) for k in (0, 1)]
    centres, spreads = [], []
    for k in (0, 1):
        members = rows[labels == k]
        centres.append(members.mean(0))
        spreads.append(float((members - centres[k]).pow(2).sum(1).mean().sqrt()))
    tight = min((0, 1), key=lambda k: (spreads[k], -sizes[k], k != first))
    other = 1 - tight
    separation = float((centres[tight] - centres[other]).norm())
    other_to_tight = math.sqrt(spreads[other] ** 2 + separation**2)
    return {
        "tight": tight,
        "statistics": {
            "spread_tight": spreads[tight],
            "spread_other": spreads[other],
            "separation": separation,
            "other_to_tight": other_to_tight,
            "ratio": spreads[tight] / other_to_tight,
            "spread_ratio": spreads[tight] / spreads[other] if spreads[other] > 0 else math.nan,
            "size_tight": sizes[tight],
            "size_other": sizes[other],
        },
    }


def split_by_clustering(
    features: Tensor,
    *,
    tightness: float = DEFAULT_TIGHTNESS,
    min_size: int = 2,
    seed: int = 0,
) -> MemorizationSplit:
    """The paper's rule: 2-means on the features, the tight near-duplicate cluster is memorized.

    See the module docstring for the rule and the derivation of the default ``tightness``. A
    cluster of fewer than ``min_size`` images is not a group: its images are set aside as
    outliers (never memorized, ``clusters == 2``) and the rest is clustered again, so one odd
    generation far from all others cannot make the rest look like a tight group.

    The clustering runs on the rows in a canonical (lexicographic) order, so the result does not
    depend on the order of the images; scaling every feature by a power of two leaves it exactly
    unchanged, and by any positive factor up to rounding.

    Two 2-means partitions are considered, and the one with the tighter group (lower ratio)
    decides: sklearn's k-means++ result (10 starts, lowest within-cluster variance), and Lloyd's
    iterations started from the densest image (nearest to its second nearest neighbour) and the
    mean of all. The second finds a small group of copies that loses, in variance, to a split of
    the diverse images along their widest direction: among 128 images of 768 features, 4 planted
    copies were found in 5 of 5 draws (copy noise 0.02 or 0.05 per feature) where k-means++
    alone needed 8 to 16 (diverse images spread evenly) or 32 (a power-law spectrum, as natural
    images have). A group of 2 is found only when it is also k-means++'s split; a reference image
    finds any.

    False alarms, in 20 draws of diverse data each: 128 images of 30 or 768 Gaussian features,
    smallest ratio 0.58 and 0.96; of 30 or 768 uniform features, 0.30 and 0.94; none found. With
    few images in few dimensions chance groups come closer: 16 images of 5 or 10 uniform
    features, 1 of 20 draws below 0.25. Use many images (the paper's 128) and image features of
    many dimensions.

    Cost: with more than 256 features (and more features than images) the clustering runs on
    ``N``-dimensional coordinates with the features' pairwise distances (their Gram matrix), so
    128 images of 512x512x3 pixels take about 9 s on one CPU thread (sklearn's KMeans on the raw
    pixels: 16 s per start).

    Args:
        features: ``(N, F)`` features of the generated images, ``N >= 2``, finite.
        tightness: the largest ``spread_tight / other_to_tight`` still called a memorized group,
            in ``(0, 1]``.
        min_size: the fewest images a memorized (or any) group holds (``>= 1``).
        seed: ``KMeans``'s ``random_state`` (its k-means++ starts; 10 of them).

    Returns:
        A ``MemorizationSplit`` with ``rule="2-means"``, its statistics (``set_aside``
        counts the outliers), the cluster labels and centres; ``found=False`` with a reason when
        no cluster is tight enough, when fewer than two groups of ``min_size`` images remain, or
        when all (remaining) rows are identical.

    Raises:
        TypeError, ValueError: naming the argument (fewer than 2 images, NaN or inf features,
            parameters out of range).
        ImportError: without scikit-learn (``pip install scikit-learn``).

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> diverse = torch.randn(128, 100, generator=g)  # no memorization
        >>> split = split_by_clustering(diverse)
        >>> split.found, split.counts, round(split.statistics["ratio"], 2)
        (False, (0, 128), 0.95)
    """
    features = _check_features(features, "features", rows=2)
    tightness = _check_tightness(tightness)
    min_size = check_int(min_size, "min_size", minimum=1)
    seed = check_int(seed, "seed", minimum=0)
    n = features.shape[0]
    base = {
        "rule": "2-means",
        "metric": "euclidean",
        "tightness": tightness,
        "min_size": min_size,
        "seed": seed,
        "threshold": None,
    }
    clusters = torch.full((n,), 2, dtype=torch.int64)  # 2: set aside as an outlier
    active = torch.arange(n)

    def not_found(reason: str) -> MemorizationSplit:
        aside = n - len(active)
        if aside:
            reason += f" ({aside} outlier images in clusters of fewer than {min_size} set aside)"
        return MemorizationSplit(
            memorized=torch.zeros(n, dtype=torch.bool),
            found=False,
            scores=torch.full((n,), math.nan, dtype=torch.float64),
            statistics={"size_tight": math.nan, "size_other": math.nan, "set_aside": aside},
            reason=reason,
            **base,
        )

    while True:
        rows = features if len(active) == n else features[active]
        if len(active) < 2 * min_size:
            return not_found(
                f"fewer than two groups of min_size={min_size} images: {len(active)} images "
                "remain, no memorized group"
            )
        if bool((rows == rows[:1]).all()):
            return not_found(
                f"all {len(active)} feature rows are identical: nothing to split (if these are "
                "copies of one image, every generation is memorized: decide with a reference "
                "image)"
            )
        coordinates, candidates = _two_means(rows, seed, min_size)
        _, labels, _ = candidates[0]
        sizes = [int((labels == k).sum()) for k in (0, 1)]
        small = [k for k in (0, 1) if sizes[k] < min_size]
        if not small:
            break
        if len(small) == 2:  # pragma: no cover - excluded by the size check above
            return not_found(f"no cluster holds min_size={min_size} images")
        active = active[labels != small[0]]

    # the tightest group among the partitions whose clusters both hold min_size images (the
    # k-means++ one does, after the loop above)
    start, labels, first = candidates[0]
    split = _describe_split(coordinates, labels, first)
    for other_start, other_labels, other_first in candidates[1:]:
        if min(int((other_labels == k).sum()) for k in (0, 1)) < min_size:
            continue
        other_split = _describe_split(coordinates, other_labels, other_first)
        if other_split["statistics"]["ratio"] < split["statistics"]["ratio"]:
            start, labels, split = other_start, other_labels, other_split
    statistics = split["statistics"]
    ratio = statistics["ratio"]
    found = ratio <= tightness
    clusters[active] = (labels != split["tight"]).to(torch.int64)  # 0: tight, 1: other
    aside = n - len(active)
    statistics["set_aside"] = aside
    sizes = [statistics["size_tight"], statistics["size_other"]]
    spread_tight, other_to_tight = statistics["spread_tight"], statistics["other_to_tight"]
    tight_rows = labels == split["tight"]
    centres = torch.stack([rows[tight_rows].mean(0), rows[~tight_rows].mean(0)])
    scores = (features - centres[0]).norm(dim=1)
    threshold, gap = _gap_threshold(scores[active], tight_rows, "euclidean")
    statistics.update(gap)
    describe = (
        f"the tighter cluster ({sizes[0]} of {n} images, 2-means from the {start}) has spread "
        f"{spread_tight:.4g}, {ratio:.3g} of the other images' RMS distance to its centre "
        f"({other_to_tight:.4g})"
    )
    if aside:
        describe += f"; {aside} outlier images in clusters of fewer than {min_size} set aside"
    if found:
        reason = (
            f"memorized group found: {describe}; at most tightness={tightness:g}; memorized: "
            f"distance to its centre < {threshold:.4g}, the middle of the gap "
            f"[{gap['gap_low']:.4g}, {gap['gap_high']:.4g}]"
        )
        if gap["disagreements"]:
            reason += f" ({gap['disagreements']} images on the other side of it than 2-means)"
    else:
        reason = (
            f"no memorized group: {describe}; above tightness={tightness:g}: the clusters are "
            "two parts of one spread-out population (if every image looks alike they may all be "
            "copies: check the grid, or split with a reference image)"
        )
    base["threshold"] = threshold if found else None
    return MemorizationSplit(
        memorized=(scores < threshold) if found else torch.zeros(n, dtype=torch.bool),
        found=found,
        scores=scores,
        statistics=statistics,
        reason=reason,
        clusters=clusters,
        centres=centres,
        start=start,
        **base,
    )


# --------------------------------------------------------------------------------------------
# From images: features, then one of the rules
# --------------------------------------------------------------------------------------------


def _feature_name(features: Callable[..., Any]) -> str:
    return str(
        getattr(features, "description", None)
        or getattr(features, "__qualname__", None)
        or type(features).__name__
    )


def _apply(features: FeatureMap, images: Tensor, name: str, batch_size: int) -> Tensor:
    parts = []
    with torch.inference_mode():
        for start in range(0, images.shape[0], batch_size):
            batch = images[start : start + batch_size]
            out = features(batch)
            if not isinstance(out, Tensor) or out.ndim != 2 or out.shape[0] != batch.shape[0]:
                shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise ValueError(
                    f"`features` must map {name} ({batch.shape[0]} images) to a (N, F) tensor, "
                    f"got {shape}"
                )
            parts.append(out.detach().to("cpu", torch.float64))
    result = torch.cat(parts)
    if not bool(torch.isfinite(result).all()):
        raise ValueError(f"`features` of `{name}` hold NaN or inf values")
    return result


def memorization_split(
    images: Tensor,
    *,
    features: FeatureMap | None = None,
    reference: Tensor | None = None,
    threshold: float | None = None,
    metric: str = "euclidean",
    tightness: float = DEFAULT_TIGHTNESS,
    min_size: int = 2,
    seed: int = 0,
    data_range: tuple[float, float] = (-1.0, 1.0),
    batch_size: int = 64,
) -> MemorizationSplit:
    """Split generated images into memorized and not, by one rule: an image is memorized when
    its feature distance to the memorized centre is below a threshold.

    The centre is ``reference`` when given, else the tight cluster's centre of the 2-means rule.
    The threshold is ``threshold`` when given (then the reference alone decides, no clustering),
    else it comes from the images themselves: the 2-means rule decides whether a memorized group
    exists (``split_by_clustering``'s tightness test) and the threshold is the middle of the gap
    between that group's and the other images' distances to the centre. A group that is not
    nearer the reference than the other images is "not found".

    Args:
        images: ``(N, *S)`` generated images in ``data_range`` (e.g. ``(N, 3, H, W)`` in
            ``[-1, 1]``); ``N >= 2`` unless a ``threshold`` is given.
        features: ``features(images (B, *S)) -> (B, F)``; ``None`` for
            ``siss.audit.generation.pixel_features`` (pixels mapped to ``[0, 1]``). Called
            in batches of ``batch_size`` under ``torch.inference_mode``.
        reference: the training image to remove, ``(*S)`` or ``(R, *S)`` (several views), in
            the same range as ``images``; the centre of the rule.
        threshold: with ``reference``, the threshold of ``split_by_reference`` (a distance, or a
            cosine similarity); ``None``: the gap's middle.
        metric: the reference rule's ``"euclidean"`` or ``"cosine"``.
        tightness, min_size, seed: the 2-means rule's (see ``split_by_clustering``).
        data_range: ``(lo, hi)`` of the images, for the default pixel features.
        batch_size: images per ``features`` call.

    Returns:
        A ``MemorizationSplit`` whose ``features`` names the feature map; ``rule`` is
        ``"reference"`` with a reference (``statistics`` then also hold the 2-means ones when
        the threshold came from the gap).

    Raises:
        TypeError, ValueError: naming the argument, before any feature is computed where the
            inputs allow (shapes, ``threshold`` without ``reference``).

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> memorized = torch.rand(1, 3, 8, 8, generator=g) * 2 - 1
        >>> copies = (memorized + 0.02 * torch.randn(5, 3, 8, 8, generator=g)).clamp(-1, 1)
        >>> images = torch.cat([copies, torch.rand(11, 3, 8, 8, generator=g) * 2 - 1])
        >>> memorization_split(images).counts  # 2-means: the 5 near-copies are the tight cluster
        (5, 11)
        >>> split = memorization_split(images, reference=memorized)  # distance to the reference
        >>> low, high = split.statistics["gap_low"], split.statistics["gap_high"]
        >>> split.counts, low < split.threshold < high
        ((5, 11), True)
    """
    metric = _check_metric(metric)
    rows = 1 if reference is not None and threshold is not None else 2
    images = check_images(images, "images", rows=rows)
    batch_size = check_int(batch_size, "batch_size")
    if reference is not None:
        if isinstance(reference, Tensor) and reference.ndim == images.ndim - 1:
            reference = reference.unsqueeze(0)
        reference = check_images(reference, "reference", like=images, like_name="images")
    elif threshold is not None:
        raise ValueError(
            "`threshold` applies to the reference rule: give `reference` (the training image), "
            "or leave `threshold` out for the 2-means rule"
        )
    if threshold is None:
        tightness = _check_tightness(tightness)
        min_size = check_int(min_size, "min_size", minimum=1)
        seed = check_int(seed, "seed", minimum=0)
    else:
        _check_threshold(threshold, metric)
    if features is None:
        lo, hi = check_range(data_range)
        description = f"pixels mapped from [{lo:g}, {hi:g}] to [0, 1]"

        def feature_map(batch: Tensor) -> Tensor:
            return pixel_features(batch, (lo, hi))

    else:
        if not callable(features):
            raise TypeError(f"`features` must be callable, got {type(features).__name__}")
        description = _feature_name(features)
        feature_map = features
    values = _apply(feature_map, images, "images", batch_size)
    if reference is not None and threshold is not None:
        split = split_by_reference(
            values,
            _apply(feature_map, reference, "reference", batch_size),
            threshold=float(threshold),
            metric=metric,
        )
    else:
        split = split_by_clustering(values, tightness=tightness, min_size=min_size, seed=seed)
        if reference is not None:
            reference_values = _apply(feature_map, reference, "reference", batch_size)
            split = _centred_on_reference(split, values, reference_values, metric)
    split.features = description
    return split


def _centred_on_reference(
    clustering: MemorizationSplit, features: Tensor, reference: Tensor, metric: str
) -> MemorizationSplit:
    """The 2-means split ``clustering`` of ``features`` ``(N, F)`` re-centred on the reference
    ``(R, F)``: the same memorized group, now the images within the gap's middle of the
    reference (``memorization_split``)."""
    reference = _check_features(reference, "reference_features", rows=1)
    if reference.shape[1] != features.shape[1]:
        raise ValueError(
            f"the reference has {reference.shape[1]} features but the images "
            f"{features.shape[1]}: compute both with the same feature map"
        )
    scores = _reference_scores(features, reference, metric)
    statistics = dict(clustering.statistics)
    common = {
        "rule": "reference",
        "scores": scores,
        "metric": metric,
        "tightness": clustering.tightness,
        "min_size": clustering.min_size,
        "seed": clustering.seed,
        "start": clustering.start,
        "clusters": clustering.clusters,
        "centres": clustering.centres,
        "reference_features": reference,
    }
    n = features.shape[0]
    if not clustering.found or clustering.clusters is None:
        return MemorizationSplit(
            memorized=torch.zeros(n, dtype=torch.bool),
            found=False,
            threshold=None,
            statistics=statistics,
            reason=clustering.reason + "; give `threshold` to decide by the reference alone",
            **common,
        )
    grouped = clustering.clusters != 2
    tight = clustering.clusters[grouped] == 0
    grouped_scores = scores[grouped]
    sign = -1.0 if metric == "cosine" else 1.0
    nearer = sign * grouped_scores[tight].median() < sign * grouped_scores[~tight].median()
    threshold, gap = _gap_threshold(grouped_scores, tight, metric)
    statistics.update(gap)
    statistics.update(nearest=float(scores.max() if metric == "cosine" else scores.min()))
    if not nearer:
        return MemorizationSplit(
            memorized=torch.zeros(n, dtype=torch.bool),
            found=False,
            threshold=None,
            statistics=statistics,
            reason=(
                "the tight group of near-duplicates is not nearer the reference than the other "
                "images (median score "
                f"{float(grouped_scores[tight].median()):.4g} vs "
                f"{float(grouped_scores[~tight].median()):.4g}): it is not copies of the "
                "reference; give `threshold` to decide by the reference alone"
            ),
            **common,
        )
    memorized = _below(scores, threshold, metric)
    word = "similarity to the reference >" if metric == "cosine" else "distance to the reference <"
    reason = (
        f"{int(memorized.sum())} of {n} images have {word} {threshold:.4g}, the middle of the gap "
        f"[{gap['gap_low']:.4g}, {gap['gap_high']:.4g}] between the 2-means memorized group and "
        f"the others (its ratio {statistics['ratio']:.3g} <= tightness {clustering.tightness:g})"
    )
    if gap["disagreements"]:
        reason += (
            f"; {gap['disagreements']} images fall on the other side of it than 2-means put them"
        )
    return MemorizationSplit(
        memorized=memorized,
        found=True,
        threshold=threshold,
        statistics=statistics,
        reason=reason,
        **common,
    )


# --------------------------------------------------------------------------------------------
# Feature maps
# --------------------------------------------------------------------------------------------


def vae_features(vae: Any) -> FeatureMap:
    """A feature map through the pipeline's VAE: posterior means in the model's latent space.

    ``((vae.encode(x).latent_dist.mean - shift_factor) * scaling_factor)``, flattened: the
    latents ``siss.adapters.encode_latents`` would give without the posterior noise, so the
    features are deterministic. No download beyond the pipeline itself.

    Args:
        vae: an ``AutoencoderKL``-like model (``encode`` returning ``latent_dist`` or
            ``latents``; ``config.scaling_factor``). Not moved: images go to its device.

    Returns:
        ``features(images (N, C, H, W) in [-1, 1]) -> (N, C_lat * h * w)`` float64 on the CPU.

    Raises:
        TypeError: naming ``vae`` when it is not an autoencoder.

    Examples:
        An untrained one-block ``AutoencoderKL`` (no downsampling: 4 latent channels at 8x8):

        >>> from diffusers import AutoencoderKL
        >>> _ = torch.manual_seed(0)
        >>> vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, layers_per_block=1)
        >>> features = vae_features(vae)
        >>> images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
        >>> latents = features(images)
        >>> latents.shape, latents.dtype, torch.equal(latents, features(images))  # posterior mean
        (torch.Size([2, 256]), torch.float64, True)
    """
    if not (
        isinstance(vae, torch.nn.Module)
        and callable(getattr(vae, "encode", None))
        and getattr(vae, "config", None) is not None
    ):
        raise TypeError(
            "`vae` must be an AutoencoderKL-like model (an nn.Module with `encode` and `config`), "
            f"got {type(vae).__name__}"
        )
    config = vae.config
    scaling = getattr(config, "scaling_factor", None)
    shift = getattr(config, "shift_factor", None) or 0.0
    scaling = 1.0 if scaling is None else float(scaling)

    def features(images: Tensor) -> Tensor:
        parameter = next(p for p in vae.parameters() if p.is_floating_point())
        with torch.no_grad():
            encoded = vae.encode(images.to(parameter.device, parameter.dtype))
            if hasattr(encoded, "latent_dist"):
                latents = encoded.latent_dist.mean
            elif hasattr(encoded, "latents"):
                latents = encoded.latents
            else:
                raise TypeError(
                    f"`vae`: {type(vae).__name__}.encode returned {type(encoded).__name__} with "
                    "neither `latent_dist` nor `latents`"
                )
        return ((latents.double() - shift) * scaling).flatten(1).cpu()

    features.description = f"VAE posterior means ({type(vae).__name__}, scaled latents)"  # type: ignore[attr-defined]
    return features


# CLIP's and ImageNet's normalisation, for models whose folder has no preprocessor_config.json
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _processor_settings(folder: Path | None) -> dict[str, Any]:
    """``image_mean``, ``image_std`` and the input size from a folder's preprocessor config."""
    if folder is None or not (folder / "preprocessor_config.json").is_file():
        return {}
    config = json.loads((folder / "preprocessor_config.json").read_text())
    size = None
    for key in ("crop_size", "size"):
        value = config.get(key)
        if isinstance(value, Mapping):
            value = value.get("height") or value.get("shortest_edge")
        if isinstance(value, int):
            size = value
            break
    return {"mean": config.get("image_mean"), "std": config.get("image_std"), "size": size}


def _model_image_size(model: Any) -> int | None:
    config = getattr(model, "config", None)
    for holder in (config, getattr(config, "vision_config", None)):
        size = getattr(holder, "image_size", None)
        if isinstance(size, int):
            return size
    return None


def _embedding(model: Any, pixels: Tensor) -> Tensor:
    """One embedding per image from a transformers image model's output (projected embeddings
    first, then the pooled output, then the first token)."""
    if callable(getattr(model, "get_image_features", None)):
        out = model.get_image_features(pixel_values=pixels)
    else:
        out = model(pixel_values=pixels)
    if isinstance(out, Tensor):
        return out
    for key in ("image_embeds", "pooler_output"):
        value = getattr(out, key, None)
        if isinstance(value, Tensor):
            return value
    hidden = getattr(out, "last_hidden_state", None)
    if isinstance(hidden, Tensor):
        return hidden[:, 0]
    raise TypeError(
        f"`path_or_model`: {type(model).__name__} returned {type(out).__name__} with no "
        "image_embeds, pooler_output or last_hidden_state"
    )


def image_encoder_features(
    path_or_model: str | Path | Callable[[Tensor], Any],
    *,
    device: torch.device | str | None = None,
    image_size: int | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
) -> FeatureMap:
    """A feature map through an image encoder: L2-normalised embeddings.

    Images ``[-1, 1]`` are mapped to ``[0, 1]``, resized (bicubic, antialiased) to the model's
    square input size and normalised with its mean and std, all batched in torch on the model's
    device; the embedding is the model's projected image embedding (``CLIPModel``,
    ``CLIPVisionModelWithProjection``), else its pooled output (``CLIPVisionModel``, DINOv2), else
    its first token. For cosine similarities use ``split_by_reference`` with
    ``metric="cosine"`` (on unit vectors the Euclidean distance is ``sqrt(2 - 2 cos)``).

    Args:
        path_or_model: a LOCAL folder of a transformers image model (``config.json`` and
            weights; its ``architectures`` entry picks the class, else ``AutoModel``; read with
            ``local_files_only``: never a download), a loaded transformers model, or any callable
            ``pixels (N, 3, size, size) -> (N, F)`` such as an SSCD torchscript module.
        device: where a model loaded from a folder runs (default: CUDA when available, else
            CPU). A given model is not moved and runs where its weights are; ``device`` is
            where a callable without parameters gets its pixels (default CPU).
        image_size: the square input size; default: the folder's ``preprocessor_config.json``
            (``crop_size``/``size``), else the model config's ``image_size``, else no resize
            (give it for SSCD: 288 in its paper's evaluation).
        mean, std: the normalisation; default: the preprocessor config's, else CLIP's for CLIP
            models and ImageNet's otherwise (SSCD's).

    Returns:
        ``features(images (N, 3, H, W) in [-1, 1]) -> (N, F)`` float64 unit rows on the CPU.

    Raises:
        ValueError: naming ``path_or_model`` for a folder that does not exist or holds no
            ``config.json``; TypeError for something that is neither a path nor callable.

    Examples:
        Any callable from pixels to embeddings works (here a linear map on 8x8 inputs; a CLIP
        or DINOv2 folder is used the same way, by its path):

        >>> _ = torch.manual_seed(0)
        >>> encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 16))
        >>> features = image_encoder_features(encoder, image_size=8)
        >>> images = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
        >>> embeddings = features(images)  # resized to 8x8, normalised, embedded
        >>> embeddings.shape, embeddings.dtype
        (torch.Size([5, 16]), torch.float64)
        >>> bool(torch.allclose(embeddings.norm(dim=1), torch.ones(5, dtype=torch.float64)))
        True
    """
    folder: Path | None = None
    if isinstance(path_or_model, str | Path):
        folder = Path(path_or_model)
        if not (folder / "config.json").is_file():
            raise ValueError(
                f"`path_or_model` {folder}: not a local model folder with config.json (image "
                "encoders are loaded from disk only; save one with save_pretrained)"
            )
        with needs("siss.audit.split"):
            import transformers

        config = json.loads((folder / "config.json").read_text())
        architectures = config.get("architectures") or []
        cls = getattr(transformers, architectures[0], None) if architectures else None
        cls = cls if cls is not None else transformers.AutoModel
        target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model: Any = cls.from_pretrained(str(folder), local_files_only=True).to(target).eval()
    elif callable(path_or_model):
        model = path_or_model
    else:
        raise TypeError(
            "`path_or_model` must be a local model folder, a transformers model or a callable, "
            f"got {type(path_or_model).__name__}"
        )
    settings = _processor_settings(folder)
    try:
        with needs("siss.audit.split"):
            from transformers import PreTrainedModel

        is_transformers = isinstance(model, PreTrainedModel)
    except ImportError:  # pragma: no cover - transformers comes with the diffusers extra
        is_transformers = False
    size = (
        image_size
        or settings.get("size")
        or (_model_image_size(model) if is_transformers else None)
    )
    model_type = str(getattr(getattr(model, "config", None), "model_type", ""))
    default_mean, default_std = (
        (CLIP_MEAN, CLIP_STD) if "clip" in model_type else (IMAGENET_MEAN, IMAGENET_STD)
    )
    mean_t = torch.tensor(mean or settings.get("mean") or default_mean, dtype=torch.float32)
    std_t = torch.tensor(std or settings.get("std") or default_std, dtype=torch.float32)
    if isinstance(model, torch.nn.Module):
        parameter = next((p for p in model.parameters() if p.is_floating_point()), None)
    else:
        parameter = None
    # a model runs where its weights are; `device` places a folder's model (above) or the
    # pixels of a callable without parameters
    run_device = parameter.device if parameter is not None else torch.device(device or "cpu")
    dtype = parameter.dtype if parameter is not None else torch.float32

    def features(images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"image encoder features take RGB images (N, 3, H, W), got {tuple(images.shape)}"
            )
        pixels = ((images.float() + 1) / 2).clamp(0, 1).to(run_device)
        if size is not None and tuple(pixels.shape[-2:]) != (size, size):
            pixels = torch.nn.functional.interpolate(
                pixels, size=(size, size), mode="bicubic", align_corners=False, antialias=True
            )
        pixels = (pixels - mean_t.to(run_device).view(1, 3, 1, 1)) / std_t.to(run_device).view(
            1, 3, 1, 1
        )
        with torch.no_grad():
            pixels = pixels.to(dtype)
            if is_transformers:
                out = _embedding(model, pixels)
            else:
                out = model(pixels)
                out = out[0] if isinstance(out, tuple | list) else out
        out = out.float().flatten(1)
        return torch.nn.functional.normalize(out, dim=1).double().cpu()

    name = folder.name if folder is not None else type(model).__name__
    features.description = f"image encoder {name}, L2-normalised embeddings"  # type: ignore[attr-defined]
    return features
