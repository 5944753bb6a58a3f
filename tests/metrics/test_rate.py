"""Generation rate and its binomial confidence interval.

Coverage is computed exactly, not simulated: for a true rate ``p`` the coverage of an interval
rule is ``sum_k Binom(k; n, p) * [low(k) <= p <= high(k)]`` over all ``n + 1`` outcomes, so the
checks below have no sampling error.
"""

import math

import pytest
import torch
from scipy.stats import binom, binomtest

from siss.metrics import (
    RateEstimate,
    default_threshold,
    generation_rate,
    l2_distances,
    proportion_ci,
)


def _at_distances(target: torch.Tensor, distances: list[float]) -> torch.Tensor:
    """Samples at given L2 distances from ``target`` along random unit directions."""
    gen = torch.Generator().manual_seed(0)
    directions = torch.randn(len(distances), *target.shape, generator=gen, dtype=torch.float64)
    directions /= directions.flatten(1).norm(dim=1).view(-1, *[1] * target.dim())
    radii = torch.tensor(distances, dtype=torch.float64).view(-1, *[1] * target.dim())
    return target.double() + radii * directions


def test_default_threshold_keeps_the_paper_rms_distance():
    assert default_threshold((1, 28, 28)) == pytest.approx(10.0)
    assert default_threshold((1, 16, 16)) == pytest.approx(10 * 16 / 28)
    assert default_threshold((3, 64, 64)) == pytest.approx(10 * math.sqrt(3 * 64 * 64 / 784))


def test_counts_samples_strictly_below_the_threshold():
    target = torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(1))
    samples = _at_distances(target, [0.0, 1.0, 4.99, 5.0, 5.01, 9.0, 20.0])
    assert torch.allclose(
        l2_distances(samples, target),
        torch.tensor([0.0, 1.0, 4.99, 5.0, 5.01, 9.0, 20.0], dtype=torch.float64),
        atol=1e-12,
    )
    est = generation_rate(samples, target, threshold=5.0)
    assert (est.count, est.total) == (3, 7)
    assert est.rate == pytest.approx(3 / 7)
    assert est.low < est.rate < est.high
    # A leading singleton axis on the target is accepted; the default threshold (5.71 at
    # 16x16) counts the first five.
    assert generation_rate(samples.float(), target.unsqueeze(0)).count == 5


def test_intervals_match_scipy():
    for k, n in [(0, 30), (1, 30), (7, 30), (29, 30), (30, 30), (227, 30720)]:
        ref = binomtest(k, n).proportion_ci(0.95, method="exact")
        assert proportion_ci(k, n, method="exact") == pytest.approx((ref.low, ref.high), abs=1e-12)
        ref = binomtest(k, n).proportion_ci(0.95, method="wilson")
        low, high = proportion_ci(k, n, method="wilson")
        assert low == pytest.approx(ref.low, abs=1e-12)
        assert high == pytest.approx(ref.high, abs=1e-12)


def test_edge_cases_zero_and_all_hits():
    n, alpha = 2000, 0.05
    low, high = proportion_ci(0, n)
    assert low == 0.0
    assert high == pytest.approx(
        1 - (alpha / 2) ** (1 / n), rel=1e-9
    )  # Clopper-Pearson closed form
    low, high = proportion_ci(n, n)
    assert high == 1.0
    assert low == pytest.approx((alpha / 2) ** (1 / n), rel=1e-9)
    for method in ("exact", "wilson"):
        low, high = proportion_ci(0, n, method=method)
        assert low == 0.0 and 0.0 < high < 0.01
        low, high = proportion_ci(n, n, method=method)
        assert high == 1.0 and 0.99 < low < 1.0
    target = torch.zeros(1, 4, 4)
    none = generation_rate(torch.ones(10, 1, 4, 4), target, threshold=1.0)
    every = generation_rate(torch.zeros(10, 1, 4, 4), target, threshold=1.0)
    assert (none.rate, none.low, none.count) == (0.0, 0.0, 0)
    assert (every.rate, every.high, every.count) == (1.0, 1.0, 10)


@pytest.mark.parametrize("n", [50, 500])
def test_exact_coverage_of_the_intervals(n):
    ks = list(range(n + 1))
    exact = [proportion_ci(k, n, method="exact") for k in ks]
    wilson = [proportion_ci(k, n, method="wilson") for k in ks]
    for p in [0.001, 0.0074, 0.02, 0.1, 0.3, 0.5, 0.9, 0.999]:
        pmf = binom.pmf(ks, n, p)
        cover_exact = sum(w for w, (lo, hi) in zip(pmf, exact, strict=True) if lo <= p <= hi)
        cover_wilson = sum(w for w, (lo, hi) in zip(pmf, wilson, strict=True) if lo <= p <= hi)
        # Clopper-Pearson guarantees at least the nominal level for every p.
        assert cover_exact >= 0.95 - 1e-12, (p, cover_exact)
        # Wilson is near nominal on average but dips below it for some p (known oscillation,
        # Brown, Cai & DasGupta 2001); its minimum over these p and n stays above 0.85.
        assert cover_wilson >= 0.85, (p, cover_wilson)


def test_simulated_detection_rate_is_inside_its_interval():
    """End to end: samples that are the target with probability p, else far from it."""
    gen = torch.Generator().manual_seed(3)
    target = torch.rand(1, 8, 8, generator=gen)
    n, p = 4000, 0.0074
    hits = torch.rand(n, generator=gen) < p
    noise = torch.rand(n, 1, 8, 8, generator=gen)
    samples = torch.where(hits.view(-1, 1, 1, 1), target + 0.01 * noise, 1 - target)
    est = generation_rate(samples, target)
    assert est.count == int(hits.sum())
    # The seeded draw holds 30 hits (p_hat = 0.75%); the 95% interval contains the true p.
    assert est.low <= p <= est.high


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: generation_rate(torch.zeros(0, 1, 4, 4), torch.zeros(1, 4, 4)), "samples"),
        (lambda: generation_rate(torch.zeros(3, 1, 4, 4), torch.zeros(1, 4, 5)), "`target` shape"),
        (lambda: generation_rate(torch.zeros(3, 1, 4, 4), torch.zeros(2, 1, 4, 4)), "target"),
        (lambda: generation_rate(torch.zeros(3, 1, 4, 4), torch.zeros(1, 4, 4), 0.0), "threshold"),
        (lambda: proportion_ci(3, 0), "total"),
        (lambda: proportion_ci(4, 3), "count"),
        (lambda: proportion_ci(1, 3, confidence=1.0), "confidence"),
        (lambda: proportion_ci(1, 3, method="normal"), "method"),
    ],
)
def test_invalid_arguments_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --- Non-finite samples, bad dtypes and devices: never a rate that reads as unlearning ---------


def _with_nan_rows(n: int, bad: list[int], size: int = 4) -> torch.Tensor:
    """``n`` copies of a zero image (the target below) with NaN in the rows ``bad``."""
    samples = torch.zeros(n, 1, size, size)
    samples[bad, 0, 0, 0] = float("nan")
    return samples


def test_all_nan_samples_give_a_nan_rate_and_their_count():
    """A diverged model (NegGrad) samples NaN: that is not 0% generation of the target."""
    est = generation_rate(torch.full((5, 1, 4, 4), float("nan")), torch.zeros(1, 4, 4))
    assert math.isnan(est.rate) and math.isnan(est.low) and math.isnan(est.high)
    assert (est.count, est.total, est.nonfinite) == (0, 0, 5)


def test_some_nonfinite_samples_make_the_rate_nan_by_default():
    samples = _with_nan_rows(10, [2, 7])
    samples[4, 0, 1, 1] = float("inf")
    samples[5, 0, 3, 3] = -float("inf")
    est = generation_rate(samples, torch.zeros(1, 4, 4), threshold=1.0)
    assert math.isnan(est.rate) and math.isnan(est.low) and math.isnan(est.high)
    # The tallies are still reported: 6 finite samples, all of them hits.
    assert (est.count, est.total, est.nonfinite) == (6, 6, 4)


def test_nonfinite_samples_can_be_excluded_and_reported_or_raise():
    samples = _with_nan_rows(10, [2, 7])
    target = torch.zeros(1, 4, 4)
    est = generation_rate(samples, target, threshold=1.0, on_nonfinite="exclude")
    assert (est.rate, est.count, est.total, est.nonfinite) == (1.0, 8, 8, 2)
    assert (est.low, est.high) == pytest.approx(proportion_ci(8, 8))
    # Excluding every sample leaves nothing to measure: NaN, not 0.
    none = generation_rate(_with_nan_rows(3, [0, 1, 2]), target, on_nonfinite="exclude")
    assert math.isnan(none.rate) and (none.total, none.nonfinite) == (0, 3)
    with pytest.raises(ValueError, match=r"`samples`.*2 of 10"):
        generation_rate(samples, target, on_nonfinite="raise")
    with pytest.raises(ValueError, match="`on_nonfinite`"):
        generation_rate(samples, target, on_nonfinite="ignore")


def test_finite_samples_report_no_nonfinite_and_keep_positional_construction():
    est = generation_rate(torch.zeros(4, 1, 4, 4), torch.zeros(1, 4, 4), threshold=1.0)
    assert est.nonfinite == 0 and est.total == 4
    assert RateEstimate(0.5, 0.1, 0.9, 1, 2).nonfinite == 0


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool])
def test_integer_and_bool_images_raise_type_error(dtype):
    """uint8 images in [0, 255] would be ~255x too far from the target: a rate of 0."""
    images = torch.zeros(3, 1, 4, 4, dtype=dtype)
    with pytest.raises(TypeError, match="`samples`"):
        generation_rate(images, torch.zeros(1, 4, 4))
    with pytest.raises(TypeError, match="`target`"):
        generation_rate(torch.zeros(3, 1, 4, 4), images[0])
    with pytest.raises(TypeError, match="`samples`"):
        l2_distances(images, torch.zeros(1, 4, 4))


def test_half_precision_samples_are_accepted():
    for dtype in (torch.float16, torch.bfloat16):
        est = generation_rate(torch.zeros(3, 1, 4, 4, dtype=dtype), torch.zeros(1, 4, 4))
        assert (est.count, est.total, est.nonfinite) == (3, 3, 0)


def test_nonfinite_target_raises():
    with pytest.raises(ValueError, match="`target`"):
        generation_rate(torch.zeros(3, 1, 4, 4), torch.full((1, 4, 4), float("nan")))


def test_meta_tensors_raise_value_error():
    with pytest.raises(ValueError, match="`samples`"):
        generation_rate(torch.zeros(3, 1, 4, 4, device="meta"), torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="`target`"):
        l2_distances(torch.zeros(3, 1, 4, 4), torch.zeros(1, 4, 4, device="meta"))


def test_huge_finite_distances_do_not_overflow():
    samples = torch.full((2, 1, 2, 2), 1e200, dtype=torch.float64)
    samples[1] = 0.0
    dist = l2_distances(samples, torch.zeros(1, 2, 2, dtype=torch.float64))
    assert dist.tolist() == pytest.approx([2e200, 0.0], rel=1e-12)


def test_numpy_scalars_are_accepted():
    np = pytest.importorskip("numpy")
    samples, target = torch.zeros(4, 1, 4, 4), torch.zeros(1, 4, 4)
    est = generation_rate(samples, target, np.float32(1.0), confidence=np.float64(0.9))
    assert (est.count, est.total) == (4, 4)
    assert proportion_ci(np.int64(3), np.int32(10)) == pytest.approx(proportion_ci(3, 10))
    assert default_threshold((np.int64(1), 16, 16)) == pytest.approx(default_threshold((1, 16, 16)))


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (
            lambda: generation_rate(torch.zeros(3, 1, 4, 4), torch.zeros(1, 4, 4), math.inf),
            ValueError,
            "`threshold`",
        ),
        (
            lambda: generation_rate(torch.zeros(3, 1, 4, 4), torch.zeros(1, 4, 4), True),
            TypeError,
            "`threshold`",
        ),
        (
            lambda: generation_rate(torch.zeros(3, 1, 4, 4), torch.zeros(1, 4, 4), "1"),
            TypeError,
            "`threshold`",
        ),
        (lambda: generation_rate(torch.zeros(3, 0), torch.zeros(0)), ValueError, "`samples`"),
        (lambda: generation_rate(torch.zeros(3), torch.zeros(())), ValueError, "`samples`"),
        (lambda: generation_rate([[0.0]], torch.zeros(1)), TypeError, "`samples`"),
        (lambda: proportion_ci(True, 10), TypeError, "`count`"),
        (lambda: proportion_ci(2.5, 10), TypeError, "`count`"),
        (lambda: proportion_ci(2, 10.0), TypeError, "`total`"),
        (lambda: proportion_ci(2, 10, confidence=True), TypeError, "`confidence`"),
        (lambda: proportion_ci(2, 10, confidence=math.nan), ValueError, "`confidence`"),
        (lambda: default_threshold((-1, -2)), ValueError, "`image_shape`"),
        (lambda: default_threshold((1, 0, 4)), ValueError, "`image_shape`"),
        (lambda: default_threshold(784), TypeError, "`image_shape`"),
        (lambda: default_threshold((1.5, 2)), TypeError, "`image_shape`"),
    ],
)
def test_bad_scalar_and_shape_arguments_name_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()
