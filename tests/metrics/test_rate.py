"""Generation rate and its binomial confidence interval.

Coverage is computed exactly, not simulated: for a true rate ``p`` the coverage of an interval
rule is ``sum_k Binom(k; n, p) * [low(k) <= p <= high(k)]`` over all ``n + 1`` outcomes, so the
checks below have no sampling error.
"""

import math

import pytest
import torch
from scipy.stats import binom, binomtest

from siss.metrics import default_threshold, generation_rate, l2_distances, proportion_ci


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
        (lambda: generation_rate(torch.zeros(3, 1, 4, 4), torch.zeros(1, 4, 5)), "target shape"),
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
