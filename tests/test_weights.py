"""Importance weights against a float64 log-space reference, their bounds and identities."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from siss.functional import importance_weights, log_density_ratio, mixture_sample

TOLERANCE = 1e-4  # the bar, on (1-λ)|w_x - ref| and λ|w_a - ref|
IMAGE = (3, 256, 256)


def reference_weights(noisy, x0, a0, gamma, sigma, lam):
    """Eq. 8's weights from the Gaussian log densities, all in float64."""
    m, x, a = (t.double().flatten(1) for t in (noisy, x0, a0))
    g, s = gamma.double()[:, None], sigma.double()
    log_qx = -((m - g * x) ** 2).sum(1) / (2 * s**2)
    log_qa = -((m - g * a) ** 2).sum(1) / (2 * s**2)
    log_mix = torch.logaddexp(math.log1p(-lam) + log_qx, math.log(lam) + log_qa)
    return (log_qx - log_mix).exp(), (log_qa - log_mix).exp()


def image_batch(alphas_cumprod, t, dtype, closeness):
    """Keep/forget pairs at image scale; `closeness` scales a - x so weights are not saturated."""
    g = torch.Generator().manual_seed(t)
    x0 = torch.rand((4, *IMAGE), generator=g) * 2 - 1
    a0 = (x0 + closeness * torch.randn(x0.shape, generator=g)).clamp(-1, 1)
    idx = torch.full((4,), t)
    gamma = alphas_cumprod[idx].sqrt().float()
    sigma = (1 - alphas_cumprod[idx]).sqrt().float()
    x0, a0 = x0.to(dtype), a0.to(dtype)
    noisy, _ = mixture_sample(x0, a0, gamma, sigma, 0.5, g)
    return noisy, x0, a0, gamma, sigma


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("t", [999, 950, 800, 500, 100, 0])
@pytest.mark.parametrize("closeness", [2.0, 1e-2, 1e-4])
def test_matches_float64_reference_at_image_scale(alphas_cumprod, dtype, t, closeness):
    noisy, x0, a0, gamma, sigma = image_batch(alphas_cumprod, t, dtype, closeness)
    for lam in (0.1, 0.5, 0.9):
        w_x, w_a = importance_weights(noisy, x0, a0, gamma, sigma, lam)
        ref_x, ref_a = reference_weights(noisy, x0, a0, gamma, sigma, lam)
        assert w_x.dtype == w_a.dtype == torch.float32
        assert ((1 - lam) * (w_x.double() - ref_x)).abs().max() <= TOLERANCE
        assert (lam * (w_a.double() - ref_a)).abs().max() <= TOLERANCE


def test_reference_comparison_catches_the_difference_of_sums(alphas_cumprod):
    """The 1e-4 bar is not vacuous: the authors' fp32 difference of two pixel sums misses it."""
    noisy, x0, a0, gamma, sigma = image_batch(alphas_cumprod, 999, torch.float32, 2.0)
    g, s = gamma[:, None], sigma
    dist_x = ((noisy - g[..., None, None] * x0) ** 2).flatten(1).sum(1) / (2 * s**2)
    dist_a = ((noisy - g[..., None, None] * a0) ** 2).flatten(1).sum(1) / (2 * s**2)
    naive_r = dist_a - dist_x
    exact_r = log_density_ratio(noisy.double(), x0.double(), a0.double(), gamma, sigma)
    ours = log_density_ratio(noisy, x0, a0, gamma, sigma)
    assert (naive_r.double() - exact_r).abs().max() > 1e-3
    assert (ours.double() - exact_r).abs().max() < 1e-4


def test_float64_inputs_give_float64_weights(alphas_cumprod):
    noisy, x0, a0, gamma, sigma = image_batch(alphas_cumprod, 990, torch.float64, 1e-2)
    w_x, w_a = importance_weights(noisy, x0, a0, gamma, sigma, 0.5)
    ref_x, ref_a = reference_weights(noisy, x0, a0, gamma, sigma, 0.5)
    assert w_x.dtype == torch.float64
    torch.testing.assert_close(w_x, ref_x, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(w_a, ref_a, rtol=1e-9, atol=1e-12)


def test_float32_under_autocast(alphas_cumprod):
    noisy, x0, a0, gamma, sigma = image_batch(alphas_cumprod, 990, torch.float32, 1e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w_x, w_a = importance_weights(noisy, x0, a0, gamma, sigma, 0.5)
    ref_x, ref_a = reference_weights(noisy, x0, a0, gamma, sigma, 0.5)
    assert w_x.dtype == w_a.dtype == torch.float32
    assert (0.5 * (w_x.double() - ref_x)).abs().max() <= TOLERANCE
    assert (0.5 * (w_a.double() - ref_a)).abs().max() <= TOLERANCE


def test_weights_are_detached():
    x0 = torch.randn(2, 5, requires_grad=True)
    a0 = torch.randn(2, 5)
    w_x, w_a = importance_weights(x0 * 1.0, x0, a0, torch.ones(2), torch.ones(2), 0.5)
    assert not w_x.requires_grad and not w_a.requires_grad


@st.composite
def weight_inputs(draw):
    rows = draw(st.integers(1, 6))
    dims = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.floats(1e-3, 10.0))
    x0 = torch.randn(rows, dims, generator=g, dtype=torch.float64) * scale
    a0 = torch.randn(rows, dims, generator=g, dtype=torch.float64) * scale
    gamma = torch.rand(rows, generator=g, dtype=torch.float64)
    sigma = torch.rand(rows, generator=g, dtype=torch.float64) * 2 + 1e-3
    lam = draw(st.floats(0.0, 1.0))
    noisy, _ = mixture_sample(x0, a0, gamma, sigma, lam, g)
    return noisy, x0, a0, gamma, sigma, lam


@given(weight_inputs())
def test_bounds_and_identity(inputs):
    """Eqs. 9–10 and (1-λ) w_x + λ w_a = 1, for every λ in [0, 1]."""
    noisy, x0, a0, gamma, sigma, lam = inputs
    w_x, w_a = importance_weights(noisy, x0, a0, gamma, sigma, lam, max_weight=1e300)
    assert torch.isfinite(w_x).all() and torch.isfinite(w_a).all()
    assert (w_x >= 0).all() and (w_a >= 0).all()
    if lam < 1:
        assert (w_x <= 1 / (1 - lam) * (1 + 1e-12)).all()
    if lam > 0:
        assert (w_a <= 1 / lam * (1 + 1e-12)).all()
    identity = (1 - lam) * w_x + lam * w_a
    torch.testing.assert_close(identity, torch.ones_like(identity), rtol=1e-12, atol=1e-12)


@given(weight_inputs())
def test_symmetry_of_swapping_x_and_a(inputs):
    """Swapping x and a and λ -> 1-λ swaps the two weights."""
    noisy, x0, a0, gamma, sigma, lam = inputs
    w_x, w_a = importance_weights(noisy, x0, a0, gamma, sigma, lam)
    v_a, v_x = importance_weights(noisy, a0, x0, gamma, sigma, 1 - lam)
    torch.testing.assert_close(w_x, v_x, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w_a, v_a, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t", [999, 500, 0])
def test_lambda_zero_and_one_never_nan(alphas_cumprod, dtype, t):
    noisy, x0, a0, gamma, sigma = image_batch(alphas_cumprod, t, dtype, 2.0)
    for lam, clamped in ((0.0, 1), (1.0, 0)):
        weights = importance_weights(noisy, x0, a0, gamma, sigma, lam, max_weight=50.0)
        for w in weights:
            assert torch.isfinite(w).all()
        # the exact weight of the sampled component is 1; the other is capped at max_weight
        torch.testing.assert_close(weights[1 - clamped], torch.ones(4))
        assert (weights[clamped] <= 50.0 * (1 + 1e-6)).all()


def test_cap_binds_exactly_at_lambda_zero():
    """At λ=0 with m drawn from x but far from it, w_a = q(m|a)/q(m|x) is huge: capped."""
    x0, a0 = torch.zeros(1, 4), torch.ones(1, 4)
    noisy = torch.full((1, 4), 3.0)  # closer to a than to x
    w_x, w_a = importance_weights(noisy, x0, a0, torch.ones(1), torch.ones(1), 0.0, max_weight=7.0)
    assert w_x.item() == pytest.approx(1.0)
    assert w_a.item() == pytest.approx(7.0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"lam": 1.5}, ValueError, "`lam`"),
        ({"lam": -0.1}, ValueError, "`lam`"),
        ({"max_weight": 0.5}, ValueError, "`max_weight`"),
        ({"max_weight": float("inf")}, ValueError, "`max_weight`"),
        ({"a0": torch.zeros(2, 4)}, ValueError, "`a0` must have the shape"),
        ({"a0": torch.zeros(2, 3, dtype=torch.float64)}, TypeError, "`a0` must have the dtype"),
        ({"x0": torch.zeros(2, 3, dtype=torch.long)}, TypeError, "`x0` must be a floating"),
        ({"gamma": torch.ones(3)}, ValueError, "`gamma` must have shape"),
        ({"sigma": torch.ones(2, 1)}, ValueError, "`sigma` must have shape"),
        ({"noisy": torch.zeros(2, 4)}, ValueError, "`noisy`"),
    ],
)
def test_bad_inputs_raise(kwargs, error, match):
    args = {
        "noisy": torch.zeros(2, 3),
        "x0": torch.zeros(2, 3),
        "a0": torch.ones(2, 3),
        "gamma": torch.ones(2),
        "sigma": torch.ones(2),
        "lam": 0.5,
    }
    args.update(kwargs)
    with pytest.raises(error, match=match):
        importance_weights(**args)


# --- Reliability review ---


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"sigma": torch.tensor([1.0, 0.0])}, ValueError, "`sigma`"),
        ({"sigma": torch.tensor([1.0, -1.0])}, ValueError, "`sigma`"),
        ({"gamma": torch.tensor([1, 1])}, TypeError, "`gamma`"),
        ({"sigma": torch.tensor([1, 1])}, TypeError, "`sigma`"),
        ({"noisy": torch.zeros(2, 3, dtype=torch.long)}, TypeError, "`noisy`"),
        ({"noisy": [[0.0] * 3] * 2}, TypeError, "`noisy`"),
        ({"x0": torch.zeros(2), "a0": torch.ones(2), "noisy": torch.zeros(2)}, ValueError, "`x0`"),
        (
            {"x0": torch.zeros(0, 3), "a0": torch.ones(0, 3), "noisy": torch.zeros(0, 3)},
            ValueError,
            "`x0`",
        ),
    ],
)
def test_bad_inputs_named_by_the_review(kwargs, error, match):
    args = {
        "noisy": torch.zeros(2, 3),
        "x0": torch.zeros(2, 3),
        "a0": torch.ones(2, 3),
        "gamma": torch.ones(2),
        "sigma": torch.ones(2),
        "lam": 0.5,
    }
    args.update(kwargs)
    if args["x0"].shape[0] == 0:
        args["gamma"], args["sigma"] = torch.ones(0), torch.ones(0)
    with pytest.raises(error, match=match):
        importance_weights(**args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("magnitude", [1e18, 1e30, 3e38])
def test_huge_finite_inputs_give_finite_exact_weights(dtype, magnitude):
    """Finite inputs never give NaN weights: the log-ratio may overflow to ±inf, which is exact."""
    if dtype == torch.float32 and magnitude > 3.4e38:
        pytest.skip("not representable")
    x0 = torch.full((3, 8), magnitude, dtype=dtype)
    a0 = -x0
    alternating = x0[0] * torch.tensor([1.0, -1.0] * 4, dtype=dtype)
    noisy = torch.stack([x0[0], a0[0], alternating])
    gamma, sigma = torch.ones(3, dtype=dtype), torch.ones(3, dtype=dtype)
    w_x, w_a = importance_weights(noisy, x0, a0, gamma, sigma, 0.25)
    assert torch.isfinite(w_x).all() and torch.isfinite(w_a).all()
    # row 0 sits on x: w_x = 1/(1-λ); row 1 on a: w_a = 1/λ; row 2 is as far from both (r = 0,
    # a sum of terms ±4 magnitude² that overflow float32 one by one): both weights 1
    expected_x = torch.tensor([1 / 0.75, 0.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(w_x.double(), expected_x)
    torch.testing.assert_close(w_a.double(), torch.tensor([0.0, 4.0, 1.0], dtype=torch.float64))


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_extreme_lambda_with_infinite_log_ratio_is_not_nan(lam):
    """Found by the fuzz test: at λ = 1, log(1-λ) + r was -inf + inf = NaN for r = +inf."""
    x0 = torch.full((2, 4), 1.5)
    a0 = torch.full((2, 4), 1e30)
    noisy = torch.stack([x0[0], a0[0]])
    w_x, w_a = importance_weights(noisy, x0, a0, torch.ones(2), torch.ones(2), lam)
    assert torch.isfinite(w_x).all() and torch.isfinite(w_a).all()
    if lam == 1.0:
        assert w_a.tolist() == [1.0, 1.0]
    else:
        assert w_x.tolist() == [1.0, 1.0]
