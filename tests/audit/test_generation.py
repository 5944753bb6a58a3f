"""generation_check: counts, exact intervals, the paper's threshold, galleries, NaN samples."""

import math

import pytest
import torch
from diffusers import DDPMScheduler
from scipy.stats import ncx2

from siss.audit.generation import generation_check
from siss.audit.sampling import generate
from siss.metrics import default_threshold, proportion_ci


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def test_planted_copies_give_the_exact_count_interval_and_gallery():
    forget = torch.zeros(2, 1, 8, 8)
    forget[1] = 1.0
    samples = torch.full((100, 1, 8, 8), -1.0)  # far from both
    samples[[7, 42, 90]] = 0.01  # three near-copies of image 0
    result, other = generation_check(samples, forget, gallery=4)
    rate = result.statistics["rate"]
    assert (rate.value, rate.n, rate.status) == (0.03, 100, "measured")
    assert (rate.low, rate.high) == pytest.approx(proportion_ci(3, 100))
    assert result.held is True and "3 of 100" in result.reason
    assert sorted(result.details["gallery"][:3]) == [7, 42, 90]
    # distance in [0, 1] units: 0.005 per pixel over 64 pixels
    assert result.statistics["nearest_distance"].value == pytest.approx(0.005 * 8)
    assert other.held is False and other.statistics["rate"].value == 0.0
    assert other.statistics["rate"].high == pytest.approx(1 - 0.025 ** (1 / 100))


def test_default_threshold_is_the_papers_in_unit_range_pixels():
    """tau = 10 sqrt(D / 784) in [0, 1] units, i.e. an L2 of 2 tau on [-1, 1] data."""
    tau = default_threshold((1, 8, 8))
    forget = torch.zeros(1, 1, 8, 8)
    step = 2 * tau / 8  # uniform offset giving a raw L2 distance of exactly 2 tau
    samples = torch.stack([forget[0] + 0.999 * step, forget[0] + 1.001 * step])
    (result,) = generation_check(samples, forget)
    assert result.details["threshold"] == pytest.approx(tau)
    assert result.details["count"] == 1 and result.details["gallery"] == [0, 1]
    (same,) = generation_check((samples + 1) / 2, (forget + 1) / 2, data_range=(0.0, 1.0))
    assert same.details["count"] == 1


def test_rate_under_a_gaussian_matches_the_noncentral_chi_square():
    """Samples of N(mu, s^2 I): ||x - a||^2 / s^2 is noncentral chi-square (D, ||a - mu||^2/s^2)."""
    mu, s, n = 0.0, 0.15, 2000
    forget = mu + s * torch.randn(1, 1, 8, 8, generator=seeded(1), dtype=torch.float64)
    samples = mu + s * torch.randn(n, 1, 8, 8, generator=seeded(2), dtype=torch.float64)
    threshold = 0.85  # in [0, 1] units: raw distance 1.7, about the median distance
    expected = ncx2.cdf((2 * threshold / s) ** 2, 64, float(((forget - mu) ** 2).sum()) / s**2)
    (result,) = generation_check(samples, forget, threshold=threshold)
    se = math.sqrt(expected * (1 - expected) / n)
    assert 0.1 < expected < 0.9
    assert abs(result.statistics["rate"].value - expected) < 4 * se


def test_a_memorizing_model_generates_its_image_and_a_gaussian_one_does_not(audit_models):
    scheduler = DDPMScheduler(clip_sample=False)
    scales = audit_models.vp_scales(scheduler)
    forget = (torch.arange(64).reshape(1, 1, 8, 8) % 2).float() * 2 - 1  # a +-1 pattern
    memorizer = audit_models.exact_model(scales, forget, 0.0)
    samples = generate(memorizer, scheduler, 50, sample_shape=(1, 8, 8), progress=False)
    (held,) = generation_check(samples, forget)
    assert held.held is True and held.statistics["rate"].value == 1.0
    gaussian = audit_models.exact_model(scales, 0.0, 0.3)
    samples = generate(gaussian, scheduler, 50, sample_shape=(1, 8, 8), progress=False)
    (free,) = generation_check(samples, forget)
    assert free.held is False and free.statistics["rate"].value == 0.0


def test_nan_samples_make_the_rate_non_finite_never_zero():
    forget = torch.zeros(1, 1, 8, 8)
    samples = torch.full((10, 1, 8, 8), -1.0)
    samples[3, 0, 0, 0] = float("nan")
    (result,) = generation_check(samples, forget)
    rate = result.statistics["rate"]
    assert rate.status == "non-finite" and math.isnan(rate.value) and rate.n == 9
    assert result.statistics["nearest_distance"].status == "non-finite"
    assert result.held is None and "1 of 10" in result.reason
    assert result.details["nonfinite_samples"] == 1
    (all_bad,) = generation_check(torch.full((4, 1, 8, 8), float("inf")), forget)
    assert all_bad.statistics["rate"].status == "non-finite" and all_bad.held is None


def test_custom_features_need_a_threshold_and_are_used():
    forget = torch.zeros(1, 1, 8, 8)
    samples = torch.randn(20, 1, 8, 8, generator=seeded())

    def mean_pixel(images):
        return images.mean(dim=(1, 2, 3)).unsqueeze(1)

    with pytest.raises(ValueError, match="threshold"):
        generation_check(samples, forget, features=mean_pixel)
    (result,) = generation_check(samples, forget, features=mean_pixel, threshold=0.1)
    expected = int((samples.mean(dim=(1, 2, 3)).abs() < 0.1).sum())
    assert result.details["count"] == expected
    assert result.details["feature_map"] == "mean_pixel"
    with pytest.raises(ValueError, match="features"):
        generation_check(samples, forget, features=lambda x: x.mean(), threshold=1.0)


def test_a_single_image_forget_is_accepted():
    (result,) = generation_check(torch.zeros(3, 1, 4, 4), torch.zeros(1, 4, 4))
    assert result.statistics["rate"].value == 1.0


@pytest.mark.parametrize(
    ("samples", "forget", "kwargs", "error", "name"),
    [
        (torch.zeros(0, 1, 4, 4), torch.zeros(1, 1, 4, 4), {}, ValueError, "samples"),
        (
            torch.zeros(3, 1, 4, 4, dtype=torch.uint8),
            torch.zeros(1, 1, 4, 4),
            {},
            TypeError,
            "samples",
        ),
        (torch.zeros(3, 1, 4, 4), torch.zeros(1, 1, 4, 5), {}, ValueError, "forget"),
        (torch.zeros(3, 1, 4, 4), torch.full((1, 1, 4, 4), math.nan), {}, ValueError, "forget"),
        (
            torch.zeros(3, 1, 4, 4),
            torch.zeros(1, 1, 4, 4),
            {"threshold": -1.0},
            ValueError,
            "threshold",
        ),
        (torch.zeros(3, 1, 4, 4), torch.zeros(1, 1, 4, 4), {"gallery": -1}, ValueError, "gallery"),
        (
            torch.zeros(3, 1, 4, 4),
            torch.zeros(1, 1, 4, 4),
            {"confidence": 1.0},
            ValueError,
            "confidence",
        ),
        (
            torch.zeros(3, 1, 4, 4),
            torch.zeros(1, 1, 4, 4),
            {"data_range": (1, 1)},
            ValueError,
            "data_range",
        ),
    ],
)
def test_bad_arguments_are_named(samples, forget, kwargs, error, name):
    with pytest.raises(error, match=name):
        generation_check(samples, forget, **kwargs)
