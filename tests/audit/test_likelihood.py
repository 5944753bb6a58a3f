"""likelihood_check: exact NLLs of Gaussian models (VP and flow), percentiles, verdicts."""

import json
import math
import types

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from siss.audit.likelihood import flow_log_likelihood, likelihood_check

pytestmark = pytest.mark.usefixtures("one_thread")

MU, S, T_EPS = 0.1, 0.5, 1e-5


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def gaussian_images(count, seed):
    return MU + S * torch.randn(count, 1, 2, 2, generator=seeded(seed), dtype=torch.float64)


def gaussian_logp(x, gamma, sigma):
    """log N(x; gamma MU, (gamma^2 S^2 + sigma^2) I): the exact density of x_{t_eps}."""
    var = gamma**2 * S**2 + sigma**2
    flat = (x - gamma * MU).flatten(1)
    return -0.5 * flat.shape[1] * math.log(2 * math.pi * var) - 0.5 * (flat**2).sum(1) / var


def test_vp_nll_of_a_gaussian_model_is_the_closed_form(audit_models):
    scheduler = DDPMScheduler()
    model = audit_models.exact_model(audit_models.vp_scales(scheduler, continuous=True), MU, S)
    forget = gaussian_images(3, 1)
    results = likelihood_check(
        model,
        scheduler,
        forget,
        None,
        num_bins=None,
        repeats=2,
        t_eps=T_EPS,
        rtol=1e-7,
        atol=1e-7,
        progress=False,
    )
    scales = audit_models.vp_scales(scheduler, True)
    gamma, sigma = (float(v) for v in scales(torch.tensor([T_EPS * 999])))
    gamma1, sigma1 = (float(v) for v in scales(torch.tensor([999.0])))
    # The PF-ODE of a Gaussian maps x affinely onto x(1) ~ N(gamma1 MU, var1), and the metric
    # scores x(1) under the prior N(0, I), not under N(gamma1 MU, var1) (Song et al.'s choice).
    var, var1 = gamma**2 * S**2 + sigma**2, gamma1**2 * S**2 + sigma1**2
    x1 = gamma1 * MU + math.sqrt(var1 / var) * (forget - gamma * MU)
    prior = -0.5 * 4 * math.log(2 * math.pi) - 0.5 * (x1**2).flatten(1).sum(1)
    logp = gaussian_logp(forget, gamma, sigma) - gaussian_logp(x1, gamma1, sigma1) + prior
    expected = -logp / (4 * math.log(2))
    for result, value in zip(results, expected, strict=True):
        nll = result.statistics["nll_bpd"]
        assert nll.value == pytest.approx(float(value), abs=1e-4)
        # The Jacobian is diagonal: Hutchinson is exact, the repeats agree.
        assert nll.high - nll.low == pytest.approx(0.0, abs=1e-6) and nll.n == 2
        assert result.statistics["percentile"].status == "not measured"
        assert "no reference images" in result.statistics["percentile"].note
        assert result.held is None


def test_flow_matching_nll_of_a_gaussian_model_is_the_closed_form(audit_models):
    model = audit_models.exact_model(audit_models.flow_scales(), MU, S, prediction="flow")
    x = gaussian_images(3, 2)
    logp = flow_log_likelihood(model, x, t_eps=T_EPS, rtol=1e-7, atol=1e-7)
    # At s = 1 the flow's marginal is the prior N(0, I) exactly: no prior mismatch.
    torch.testing.assert_close(logp, gaussian_logp(x, 1 - T_EPS, T_EPS), atol=1e-4, rtol=0)
    (result,) = likelihood_check(
        model,
        FlowMatchEulerDiscreteScheduler(shift=3.0),
        x[:1],
        x[1:],
        repeats=1,
        rtol=1e-7,
        atol=1e-7,
        progress=False,
        num_bins=256,
    )
    expected = -float(gaussian_logp(x[:1], 1 - T_EPS, T_EPS)[0]) / (4 * math.log(2)) + 7
    assert result.statistics["nll_bpd"].value == pytest.approx(expected, abs=1e-4)
    assert math.isnan(result.statistics["nll_bpd"].low)  # one repeat: no interval, said so
    assert "no interval" in result.statistics["nll_bpd"].note


def test_the_flow_likelihood_is_the_one_of_siss_metrics():
    """One integrator: ``siss.audit.likelihood`` re-exports the metrics' flow entry points."""
    import siss.audit.likelihood as audit_likelihood
    import siss.metrics

    assert audit_likelihood.flow_log_likelihood is siss.metrics.flow_log_likelihood
    assert audit_likelihood.flow_bits_per_dim is siss.metrics.flow_bits_per_dim


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_members_and_non_members_of_one_gaussian_rank_uniformly(audit_models, kind):
    """Exchangeable forget and reference images: percentiles ~ U(0, 1); nothing held."""
    if kind == "vp":
        scheduler = DDPMScheduler()
        model = audit_models.exact_model(audit_models.vp_scales(scheduler, True), MU, S)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler()
        model = audit_models.exact_model(audit_models.flow_scales(), MU, S, prediction="flow")
    forget, reference = gaussian_images(12, 3), gaussian_images(100, 4)
    results = likelihood_check(
        model, scheduler, forget, reference, repeats=1, rtol=1e-4, atol=1e-4, progress=False
    )
    percentiles = torch.tensor([r.statistics["percentile"].value for r in results])
    assert abs(float(percentiles.mean()) - 0.5) < 3 * math.sqrt(1 / 12 / len(results))
    assert not any(r.held is True for r in results)
    assert all(r.statistics["percentile"].n == 100 for r in results)


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_a_memorizing_model_holds_its_image(audit_models, kind):
    forget = gaussian_images(1, 5)
    if kind == "vp":
        scheduler = DDPMScheduler()
        model = audit_models.exact_model(audit_models.vp_scales(scheduler, True), forget, 0.0)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler()
        model = audit_models.exact_model(audit_models.flow_scales(), forget, 0.0, prediction="flow")
    reference = gaussian_images(80, 6)
    (result,) = likelihood_check(model, scheduler, forget, reference, repeats=2, progress=False)
    nll, rank = result.statistics["nll_bpd"], result.statistics["percentile"]
    assert nll.value < result.details["reference_quantile"] - 100
    assert (rank.value, rank.low) == (0.0, 0.0)
    assert rank.high == pytest.approx(1 - 0.025 ** (1 / 80))  # < 0.05 with 80 references
    assert result.held is True and "held" in result.reason
    (small,) = likelihood_check(model, scheduler, forget, reference[:20], progress=False)
    assert small.held is None and "undecided" in small.reason  # 20 references cannot tell


def test_a_diverged_model_is_non_finite_not_not_held():
    def diverged(x, t):
        return torch.full_like(x, math.nan)

    (result,) = likelihood_check(
        diverged, DDPMScheduler(), gaussian_images(1, 7), gaussian_images(5, 8), progress=False
    )
    assert result.statistics["nll_bpd"].status == "non-finite"
    assert result.statistics["percentile"].status == "non-finite"
    assert result.held is None


def test_a_tiny_unet_goes_through_the_adapter(audit_models):
    unet = audit_models.tiny_unet()
    forget = torch.randn(1, 1, 8, 8, generator=seeded())
    reference = torch.randn(2, 1, 8, 8, generator=seeded(1))
    (result,) = likelihood_check(
        unet,
        DDPMScheduler(),
        forget,
        reference,
        repeats=1,
        rtol=1e-2,
        atol=1e-2,
        generator=seeded(),
        progress=False,
    )
    assert result.statistics["nll_bpd"].measured
    assert result.statistics["percentile"].n == 2


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"forget": torch.zeros(1, 1, 2, 2, dtype=torch.int64)}, TypeError, "forget"),
        ({"forget": torch.full((1, 1, 2, 2), math.nan)}, ValueError, "forget"),
        ({"reference": torch.zeros(3, 1, 2, 3, dtype=torch.float64)}, ValueError, "reference"),
        ({"percentile": 1.5}, ValueError, "percentile"),
        ({"repeats": 0}, ValueError, "repeats"),
        ({"method": "euler"}, ValueError, "method"),
        ({"t_eps": 0.0}, ValueError, "t_eps"),
        ({"conditioning": {"class_labels": torch.tensor([0, 1])}}, ValueError, "conditioning"),
        ({"scheduler": types.SimpleNamespace(config={})}, ValueError, "scheduler"),
    ],
)
def test_bad_arguments_are_named_before_any_solve(kwargs, error, name):
    calls = []

    def model(x, t):
        calls.append(1)
        return x

    arguments = {
        "model": model,
        "scheduler": DDPMScheduler(),
        "forget": torch.zeros(1, 1, 2, 2, dtype=torch.float64),
        "reference": torch.zeros(3, 1, 2, 2, dtype=torch.float64),
        "progress": False,
        **kwargs,
    }
    with pytest.raises(error, match=name):
        likelihood_check(**arguments)
    assert not calls


def test_a_zero_terminal_snr_schedule_is_measured():
    """``rescale_betas_zero_snr`` ends ``alphas_cumprod`` at 0, which the continuous VP-SDE
    cannot take: the default audit stopped at its likelihood check, after the cheaper checks
    had run, with an error naming an argument the user never passed."""
    scheduler = DDPMScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                              timestep_spacing="trailing")  # fmt: skip

    def model(x, timesteps):  # any finite v-prediction
        return torch.zeros_like(x)

    (result,) = likelihood_check(model, scheduler, gaussian_images(1, 7), gaussian_images(5, 8),
                                 repeats=1, rtol=1e-3, atol=1e-3, progress=False)  # fmt: skip
    assert result.statistics["nll_bpd"].measured
    assert math.isfinite(result.statistics["nll_bpd"].value)
    assert "zero terminal SNR" in json.dumps(result.details)
