"""Exact likelihood by the probability-flow ODE, checked against closed-form Gaussian answers.

Gaussian data ``N(mu, Sigma)`` under the VP-SDE has Gaussian marginals
``p_t = N(gamma_t mu, gamma_t^2 Sigma + sigma_t^2 I)`` with ``gamma_t^2 = alpha_bar(t)``, so the
exact noise prediction is ``eps(x, t) = sigma_t Sigma_t^{-1} (x - gamma_t mu)`` and the
probability-flow ODE is affine: in the eigenbasis of Sigma every coordinate keeps its
standardised value ``(x - m_t) / s_t``. Hence the ODE's end point ``x(1)`` and the value the
method computes, ``log N(x(1); 0, I) + log p_eps(x) - log p_1(x(1))`` (the standard-normal prior
replaces the true ``p_1``), are both closed form.

The rectified-flow entry points (``flow_log_likelihood``, ``flow_bits_per_dim``) share the VP
ones' integrator: they are checked against the closed form of ``N(0, I)`` data, whose flow ends
at the prior exactly, and against the VP entry point on one drift written both ways.
"""

import math

import pytest
import torch

from siss.metrics import (
    VPSchedule,
    bits_per_dim,
    flow_bits_per_dim,
    flow_log_likelihood,
    log_likelihood,
)
from siss.metrics import nll as nll_module
from siss.metrics.nll import _dequantize

T_EPS = 1e-5
TOL = 1e-7  # ODE rtol = atol used where the answer is compared tightly


pytestmark = pytest.mark.usefixtures("one_thread")


def _gaussian_problem(alphas_cumprod, eigvals, rotation, mu):
    """Exact eps-model and exact expected log-likelihood for N(mu, Q diag(eigvals) Q^T)."""
    vp = VPSchedule(alphas_cumprod)
    q = rotation

    def moments(t):
        t = torch.as_tensor(t, dtype=torch.float64)
        gamma = torch.exp(0.5 * vp.log_alpha_cumprod(t))
        sigma = vp.sigma(t)
        return gamma, sigma, gamma**2 * eigvals + sigma**2  # variances in the eigenbasis

    def eps_model(x, timesteps):
        gamma, sigma, var = moments(timesteps[0] / (alphas_cumprod.numel() - 1))
        y = (x.reshape(x.shape[0], -1) - gamma * mu) @ q  # eigenbasis coordinates
        return (sigma * (y / var) @ q.T).reshape(x.shape)

    def log_normal(y, var):
        return (-0.5 * torch.log(2 * math.pi * var) - 0.5 * y**2 / var).sum(-1)

    def expected(x):
        x = x.reshape(x.shape[0], -1)
        g0, _, v0 = moments(T_EPS)
        g1, _, v1 = moments(1.0)
        z = (x - g0 * mu) @ q / v0.sqrt()  # invariant along the flow
        y1 = v1.sqrt() * z  # x(1) - g1 mu in the eigenbasis
        x1 = g1 * mu + y1 @ q.T
        log_p0 = log_normal((x - g0 * mu) @ q, v0)
        return log_p0 + log_normal(x1, torch.ones_like(x1)) - log_normal(y1, v1)

    return eps_model, expected


def test_schedule_is_song_vp_sde_for_linear_betas(alphas_cumprod):
    vp = VPSchedule(alphas_cumprod)
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    song = -(0.5 * t**2 * (20.0 - 0.1) + 0.1 * t)  # log alpha_bar of beta(t) = 0.1 + 19.9 t
    # The interpolation of a linear beta is exact; what is left is the round-off of recovering
    # betas as 1 - a_i / a_{i-1} (1e-16 each, times T = 1000: observed 1.5e-13). A float32
    # step anywhere in the evaluation would show as ~1e-8.
    assert torch.allclose(vp.log_alpha_cumprod(t), song, rtol=0, atol=1e-11)
    assert torch.allclose(vp.beta(t), 0.1 + 19.9 * t, rtol=0, atol=1e-11)
    # The continuous schedule tracks the discrete one; they differ by sum(beta_i^2)/2 ~ 0.07
    # in log alpha_bar at the end, the second-order term of log(1 - beta).
    nodes = torch.arange(1000, dtype=torch.float64) / 999
    gap = (vp.log_alpha_cumprod(nodes) - alphas_cumprod.log()).abs().max()
    assert gap < 0.1


def test_diagonal_gaussian_matches_closed_form(alphas_cumprod):
    gen = torch.Generator().manual_seed(0)
    shape = (2, 3, 3)
    dims = math.prod(shape)
    mu = 0.5 * torch.randn(dims, generator=gen, dtype=torch.float64)
    eigvals = (0.2 + 0.5 * torch.rand(dims, generator=gen, dtype=torch.float64)) ** 2
    eps_model, expected = _gaussian_problem(
        alphas_cumprod, eigvals, torch.eye(dims, dtype=torch.float64), mu
    )
    x = mu + 2 * eigvals.sqrt() * torch.randn(4, dims, generator=gen, dtype=torch.float64)
    x = x.reshape(4, *shape)
    ll = log_likelihood(eps_model, x, alphas_cumprod, rtol=TOL, atol=TOL, t_eps=T_EPS)
    # The Jacobian of the drift is diagonal here, so one Rademacher probe gives the exact
    # trace (v_i^2 = 1): the only error is the ODE solver's, observed ~2e-5 nats at 1e-7.
    assert torch.allclose(ll, expected(x), rtol=0, atol=1e-3)
    bpd = bits_per_dim(eps_model, x, alphas_cumprod, rtol=TOL, atol=TOL, t_eps=T_EPS)
    # Song et al.'s offset for [-1, 1] data and 256 levels is log2(128) = 7 bits.
    assert torch.allclose(bpd, -expected(x) / (dims * math.log(2)) + 7.0, rtol=0, atol=1e-4)
    bpd01 = bits_per_dim(
        eps_model, x, alphas_cumprod, rtol=TOL, atol=TOL, t_eps=T_EPS, data_range=(0.0, 1.0)
    )
    assert torch.allclose(bpd01 - bpd, torch.ones_like(bpd), atol=1e-6)  # 8 - 7 bits


def test_default_tolerance_is_close_to_closed_form(alphas_cumprod):
    """The paper's settings (rtol = atol = 1e-5, one probe) on an isotropic Gaussian."""
    gen = torch.Generator().manual_seed(1)
    dims = 16
    mu = torch.randn(dims, generator=gen, dtype=torch.float64)
    eigvals = torch.full((dims,), 0.3, dtype=torch.float64)
    eps_model, expected = _gaussian_problem(
        alphas_cumprod, eigvals, torch.eye(dims, dtype=torch.float64), mu
    )
    x = torch.randn(3, 1, 4, 4, generator=gen, dtype=torch.float64)
    bpd = bits_per_dim(eps_model, x, alphas_cumprod, generator=gen)
    ref = -expected(x) / (dims * math.log(2)) + 7.0
    # Observed error 1e-4 bits/dim at tolerance 1e-5; 1e-3 leaves a 10x margin.
    assert torch.allclose(bpd, ref, rtol=0, atol=1e-3)


def test_hutchinson_estimate_is_unbiased_for_a_dense_jacobian(alphas_cumprod):
    gen = torch.Generator().manual_seed(2)
    dims, copies = 6, 256
    q, _ = torch.linalg.qr(torch.randn(dims, dims, generator=gen, dtype=torch.float64))
    eigvals = torch.tensor([0.01, 0.05, 0.2, 0.5, 1.0, 2.0], dtype=torch.float64)
    mu = torch.randn(dims, generator=gen, dtype=torch.float64)
    eps_model, expected = _gaussian_problem(alphas_cumprod, eigvals, q, mu)
    x = (mu + torch.randn(dims, generator=gen, dtype=torch.float64)).expand(copies, dims)
    # Every row draws its own probe, so the rows are independent one-probe estimates.
    ll = log_likelihood(eps_model, x.clone(), alphas_cumprod, rtol=1e-6, atol=1e-6, generator=gen)
    exact = expected(x[:1])
    se = ll.std() / math.sqrt(copies)
    assert ll.std() > 1e-3  # the rotated Jacobian is dense: single probes do vary
    # Unbiased: the mean is within 4 standard errors (plus the ODE error, < 1e-3).
    assert (ll.mean() - exact).abs() < 4 * se + 1e-3
    four = log_likelihood(
        eps_model,
        x[:64].clone(),
        alphas_cumprod,
        num_probes=4,
        rtol=1e-6,
        atol=1e-6,
        generator=gen,
    )
    # Averaging 4 probes divides the variance by 4 (sd by 2); 0.75 allows for the sampling
    # error of two 64/256-sample standard deviations (relative sd error ~ 1/sqrt(2n) < 9%).
    assert four.std() < 0.75 * ll.std()


def test_tiny_network_float32_and_no_parameter_gradients(alphas_cumprod):
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 1, 3, padding=1)
    )

    def eps_model(x, timesteps):
        assert timesteps.shape == (x.shape[0],)
        assert float(timesteps.min()) >= 0 and float(timesteps.max()) <= 999
        return net(x) * (1 + timesteps.view(-1, 1, 1, 1) / 1000)

    x = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    bpd = bits_per_dim(eps_model, x, alphas_cumprod.float(), rtol=1e-3, atol=1e-3)
    assert bpd.shape == (3,) and bpd.dtype == torch.float64
    assert torch.isfinite(bpd).all()
    assert all(p.grad is None for p in net.parameters())


def test_seeded_calls_are_reproducible(alphas_cumprod):
    net = torch.nn.Linear(4, 4, dtype=torch.float64)
    torch.nn.init.normal_(net.weight, std=0.3, generator=torch.Generator().manual_seed(0))

    def eps_model(x, timesteps):
        return net(x.reshape(x.shape[0], -1)).reshape(x.shape)

    x = torch.zeros(2, 1, 2, 2, dtype=torch.float64)
    kw = {"rtol": 1e-4, "atol": 1e-4, "dequantize": True}
    a = bits_per_dim(eps_model, x, alphas_cumprod, generator=torch.Generator().manual_seed(5), **kw)
    b = bits_per_dim(eps_model, x, alphas_cumprod, generator=torch.Generator().manual_seed(5), **kw)
    c = bits_per_dim(eps_model, x, alphas_cumprod, generator=torch.Generator().manual_seed(6), **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_dequantize_keeps_the_intensity_level():
    levels = torch.arange(256, dtype=torch.float64)
    x = levels / 255 * 2 - 1  # 8-bit images scaled to [-1, 1]
    deq = _dequantize(x, -1.0, 1.0, 256, torch.Generator().manual_seed(0))
    # Song et al.: (k + u) / 256 in [0, 1], so floor(256 * (deq + 1) / 2) recovers k.
    assert torch.equal(torch.floor((deq + 1) / 2 * 256), levels)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_probes": 0}, "num_probes"),
        ({"t_eps": 1.0}, "t_eps"),
        ({"data_range": (1.0, -1.0)}, "data_range"),
        ({"num_bins": 1}, "num_bins"),
        ({"num_bins": None, "dequantize": True}, "dequantize"),
    ],
)
def test_invalid_arguments_raise(alphas_cumprod, kwargs, match):
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match=match):
        bits_per_dim(lambda x, t: x, x, alphas_cumprod, **kwargs)


def test_invalid_schedule_raises():
    with pytest.raises(ValueError, match="alphas_cumprod"):
        VPSchedule(torch.tensor([0.5, 0.9]))
    with pytest.raises(ValueError, match="alphas_cumprod"):
        VPSchedule(torch.tensor([0.9]))


# --- Non-finite inputs and outputs, bad dtypes, solvers and arguments --------------------------


def _standard_normal_eps(alphas_cumprod):
    """The exact noise prediction of N(0, I) data: the flow is constant, the ODE trivial."""
    vp = VPSchedule(alphas_cumprod)

    def eps_model(x, timesteps):
        return vp.sigma(timesteps[:1] / (alphas_cumprod.numel() - 1)).to(x.dtype) * x

    return eps_model


FAST = {"rtol": 1e-3, "atol": 1e-3}


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool])
def test_integer_images_raise_type_error_naming_x(alphas_cumprod, dtype):
    """Used to raise ``TypeError: `t` must be a floating point Tensor`` from torchdiffeq."""
    x = torch.zeros(2, 1, 2, 2, dtype=dtype)
    with pytest.raises(TypeError, match="`x`"):
        bits_per_dim(_standard_normal_eps(alphas_cumprod), x, alphas_cumprod, **FAST)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_images_raise_type_error_naming_x(alphas_cumprod, dtype):
    """float16 used to fail with torchdiffeq's ``AssertionError: underflow in dt``."""
    x = torch.zeros(2, 1, 2, 2, dtype=dtype)
    with pytest.raises(TypeError, match="`x`"):
        log_likelihood(_standard_normal_eps(alphas_cumprod), x, alphas_cumprod, **FAST)


def test_nonfinite_images_raise_with_the_count(alphas_cumprod):
    """Used to raise ``IndexError: index -9223372036854775807 is out of bounds``."""
    x = torch.zeros(3, 1, 2, 2)
    x[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"`x`.*1 of 3"):
        bits_per_dim(_standard_normal_eps(alphas_cumprod), x, alphas_cumprod, **FAST)


def test_a_diverged_model_raises_naming_eps_model(alphas_cumprod):
    """A model that outputs NaN (diverged NegGrad) used to fail with ``underflow in dt``."""
    x = torch.zeros(2, 1, 2, 2)
    with pytest.raises(ValueError, match="`eps_model`"):
        bits_per_dim(lambda x, t: x * math.nan, x, alphas_cumprod, **FAST)
    with pytest.raises(ValueError, match="`eps_model`"):
        bits_per_dim(lambda x, t: x + 1e38, x, alphas_cumprod, **FAST)


def test_a_model_output_of_the_wrong_shape_raises(alphas_cumprod):
    """A ``(1, *S)`` output used to broadcast over the batch: a finite, wrong answer."""
    x = torch.zeros(2, 1, 2, 2)
    with pytest.raises(ValueError, match="`eps_model`"):
        bits_per_dim(lambda x, t: x[:1], x, alphas_cumprod, **FAST)
    with pytest.raises(TypeError, match="`eps_model`"):
        bits_per_dim(lambda x, t: x.tolist(), x, alphas_cumprod, **FAST)


def test_fixed_grid_solvers_are_rejected(alphas_cumprod):
    """``method="euler"`` used to take one step from t_eps to 1: 95 bits/dim instead of 12."""
    x = torch.zeros(2, 1, 2, 2)
    for method in ("euler", "rk4", "nope"):
        with pytest.raises(ValueError, match="`method`"):
            bits_per_dim(lambda x, t: x, x, alphas_cumprod, method=method)


def test_t_eps_zero_is_rejected(alphas_cumprod):
    """sigma(0) = 0 divides the score: used to fail with ``underflow in dt``."""
    with pytest.raises(ValueError, match="`t_eps`"):
        bits_per_dim(lambda x, t: x, torch.zeros(2, 1, 2, 2), alphas_cumprod, t_eps=0.0)


def test_empty_and_meta_images_raise(alphas_cumprod):
    eps_model = _standard_normal_eps(alphas_cumprod)
    with pytest.raises(ValueError, match="`x`"):  # used to raise an IndexError
        bits_per_dim(eps_model, torch.zeros(2, 0), alphas_cumprod, **FAST)
    with pytest.raises(ValueError, match="`x`"):
        bits_per_dim(eps_model, torch.zeros(2, 1, 2, 2, device="meta"), alphas_cumprod, **FAST)
    with pytest.raises(ValueError, match="`alphas_cumprod`"):
        VPSchedule(alphas_cumprod.to("meta"))


def test_schedule_rejects_nonfinite_times(alphas_cumprod):
    """``beta(nan)`` used to raise an IndexError from the interpolation table."""
    with pytest.raises(ValueError, match="`t`"):
        VPSchedule(alphas_cumprod).beta(torch.tensor(math.nan))


def test_numpy_scalars_are_accepted(alphas_cumprod):
    np = pytest.importorskip("numpy")
    x = torch.zeros(2, 1, 2, 2, dtype=torch.float64)
    bpd = bits_per_dim(
        _standard_normal_eps(alphas_cumprod),
        x,
        alphas_cumprod,
        num_probes=np.int64(2),
        rtol=np.float64(1e-3),
        atol=np.float32(1e-3),
        t_eps=np.float64(1e-5),
        num_bins=np.int64(256),
        data_range=(np.float64(-1), np.int64(1)),
    )
    assert torch.isfinite(bpd).all()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_probes": True}, TypeError, "`num_probes`"),
        ({"num_probes": 1.0}, TypeError, "`num_probes`"),
        ({"rtol": -1.0}, ValueError, "`rtol`"),
        ({"atol": math.nan}, ValueError, "`atol`"),
        ({"t_eps": math.nan}, ValueError, "`t_eps`"),
        ({"num_bins": 2.5}, TypeError, "`num_bins`"),
        ({"num_bins": True}, TypeError, "`num_bins`"),
        ({"data_range": (0.0, math.inf)}, ValueError, "`data_range`"),
        ({"data_range": (0.0,)}, ValueError, "`data_range`"),
        ({"method": 3}, TypeError, "`method`"),
    ],
)
def test_bad_scalar_arguments_name_the_argument(alphas_cumprod, kwargs, error, match):
    with pytest.raises(error, match=match):
        bits_per_dim(lambda x, t: x, torch.zeros(1, 1, 2, 2), alphas_cumprod, **kwargs)


# --------------------------------------------------------------------------------------------
# Rectified flow: the same integrator with the model's velocity as the drift
# --------------------------------------------------------------------------------------------


def _standard_normal_velocity(num_train_timesteps=1000):
    """The exact velocity ``E[eps - x_0 | x_s]`` of N(0, I) data: ``x_s ~ N(0, var_s I)`` with
    ``var_s = (1 - s)^2 + s^2``, ``v = (2 s - 1) / var_s * x_s``, linear and diagonal."""

    def velocity_model(x, timesteps):
        s = timesteps[:1] / num_train_timesteps
        return ((2 * s - 1) / ((1 - s) ** 2 + s**2)).to(x.dtype) * x

    return velocity_model


def test_flow_matches_the_closed_form_of_standard_normal_data():
    """The flow of N(0, I) data ends at the prior exactly: log p = log N(x; 0, var_eps I)."""
    t_eps, steps = 1e-3, 500
    x = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    var = (1 - t_eps) ** 2 + t_eps**2
    exact = -0.5 * 8 * math.log(2 * math.pi * var) - 0.5 * (x**2).flatten(1).sum(1) / var
    model = _standard_normal_velocity(steps)
    kw = {"num_train_timesteps": steps, "t_eps": t_eps, "rtol": TOL, "atol": TOL}
    ll = flow_log_likelihood(model, x, **kw)
    assert ll.shape == (3,) and ll.dtype == torch.float64
    # A diagonal Jacobian: Hutchinson is exact, the only error is the solver's.
    torch.testing.assert_close(ll, exact, rtol=0, atol=1e-5)
    bpd = flow_bits_per_dim(model, x, data_range=(0.0, 1.0), **kw)
    torch.testing.assert_close(bpd, -exact / (8 * math.log(2)) + 8.0, rtol=0, atol=1e-6)


def test_vp_and_flow_entry_points_share_the_integrator(alphas_cumprod, monkeypatch):
    calls = []
    core = nll_module._ode_log_likelihood

    def spy(model, name, *args, **kwargs):
        calls.append(name)
        return core(model, name, *args, **kwargs)

    monkeypatch.setattr(nll_module, "_ode_log_likelihood", spy)
    x = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    bits_per_dim(_standard_normal_eps(alphas_cumprod), x, alphas_cumprod, **FAST)
    flow_bits_per_dim(_standard_normal_velocity(), x, **FAST)
    assert calls == ["eps_model", "velocity_model"]


def test_one_drift_as_eps_and_as_velocity_gives_one_likelihood(alphas_cumprod):
    """A dense, nonlinear drift ``g`` given once as a velocity and once as the eps that makes
    the VP drift ``-beta / 2 (x - eps / sigma)`` equal to ``g``: the same ODE, the same probes
    (one seed) and the same prior term give the same log-likelihood, while each entry point
    queries its model on its own timestep scale (``s * T`` and ``t * (T - 1)``)."""
    vp = VPSchedule(alphas_cumprod)
    weight = 0.5 * torch.randn(
        4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )

    def g(x, t):
        return torch.tanh(x.reshape(x.shape[0], -1) @ weight).reshape(x.shape) * (1 + t) - x

    def velocity_model(x, timesteps):
        return g(x, timesteps[:1] / 1000)

    def eps_model(x, timesteps):
        t = timesteps[:1] / 999
        return vp.sigma(t) * (x + 2 * g(x, t) / vp.beta(t))

    x = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    kw = {"num_probes": 2, "rtol": 1e-6, "atol": 1e-6}
    flow = flow_log_likelihood(velocity_model, x, generator=torch.Generator().manual_seed(3), **kw)
    ddpm = log_likelihood(
        eps_model, x, alphas_cumprod, generator=torch.Generator().manual_seed(3), **kw
    )
    torch.testing.assert_close(flow, ddpm, rtol=0, atol=1e-8)
    other = flow_log_likelihood(velocity_model, x, generator=torch.Generator().manual_seed(4), **kw)
    assert not torch.allclose(flow, other, rtol=0, atol=1e-6)  # the Jacobian is dense


def test_flow_timesteps_are_s_times_num_train_timesteps():
    seen = []
    model = _standard_normal_velocity(250)

    def velocity_model(x, timesteps):
        assert timesteps.shape == (x.shape[0],) and timesteps.dtype == x.dtype
        seen.append(float(timesteps[0]))
        return model(x, timesteps)

    x = torch.zeros(2, 1, 2, 2, dtype=torch.float64)
    flow_log_likelihood(velocity_model, x, num_train_timesteps=250, t_eps=1e-3, **FAST)
    assert min(seen) == pytest.approx(1e-3 * 250) and max(seen) == 250.0


def test_flow_seeded_dequantized_calls_are_reproducible():
    net = torch.nn.Linear(4, 4, dtype=torch.float64)
    torch.nn.init.normal_(net.weight, std=0.3, generator=torch.Generator().manual_seed(0))

    def velocity_model(x, timesteps):
        return net(x.reshape(x.shape[0], -1)).reshape(x.shape)

    x = torch.zeros(2, 1, 2, 2, dtype=torch.float64)
    kw = {"rtol": 1e-4, "atol": 1e-4, "dequantize": True}
    a = flow_bits_per_dim(velocity_model, x, generator=torch.Generator().manual_seed(5), **kw)
    b = flow_bits_per_dim(velocity_model, x, generator=torch.Generator().manual_seed(5), **kw)
    c = flow_bits_per_dim(velocity_model, x, generator=torch.Generator().manual_seed(6), **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_a_diverged_or_misshapen_velocity_model_raises_naming_it():
    x = torch.zeros(2, 1, 2, 2)
    with pytest.raises(ValueError, match=r"`velocity_model`.*NaN or inf"):
        flow_bits_per_dim(lambda x, t: x * math.nan, x, **FAST)
    with pytest.raises(ValueError, match=r"underflowed.*`velocity_model`"):  # it explodes
        flow_bits_per_dim(lambda x, t: x + 3e38, x, **FAST)
    with pytest.raises(ValueError, match="`velocity_model`"):
        flow_bits_per_dim(lambda x, t: x[:1], x, **FAST)
    with pytest.raises(TypeError, match="`velocity_model`"):
        flow_bits_per_dim(lambda x, t: x.tolist(), x, **FAST)
    with pytest.raises(TypeError, match="`velocity_model`"):
        flow_log_likelihood(None, x, **FAST)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_train_timesteps": 0}, ValueError, "`num_train_timesteps`"),
        ({"num_train_timesteps": True}, TypeError, "`num_train_timesteps`"),
        ({"num_probes": 0}, ValueError, "`num_probes`"),
        ({"method": "euler"}, ValueError, "`method`"),
        ({"t_eps": 0.0}, ValueError, "`t_eps`"),
        ({"data_range": (1.0, -1.0)}, ValueError, "`data_range`"),
        ({"num_bins": None, "dequantize": True}, ValueError, "`dequantize`"),
        ({"x": torch.zeros(0, 1, 2, 2)}, ValueError, "`x`"),
        ({"x": torch.zeros(1, 1, 2, 2, dtype=torch.float16)}, TypeError, "`x`"),
    ],
)
def test_bad_flow_arguments_name_the_argument(kwargs, error, match):
    calls = []

    def velocity_model(x, t):
        calls.append(1)
        return x

    arguments = {"x": torch.zeros(1, 1, 2, 2), **kwargs}
    with pytest.raises(error, match=match):
        flow_bits_per_dim(velocity_model, **arguments)
    assert not calls
