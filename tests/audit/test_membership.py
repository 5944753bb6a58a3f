"""Membership inference: known answers (exact Gaussian score: chance; point masses: members found).

Every statistical assertion rests on a seeded generator, with its tolerance from a standard error.
"""

import math

import pytest
import torch
from conftest import tiny_conditional_unet, tiny_unet
from scipy.stats import binom

from siss import NoiseSchedule
from siss.audit.membership import (
    denoising_errors,
    eps_from_prediction,
    membership_check,
    pia_errors,
    tpr_at_fpr,
)
from siss.targets import prediction_target, x0_from_prediction

SHAPE = (1, 4, 4)  # D = 16


def ddpm_schedule() -> NoiseSchedule:
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    return NoiseSchedule.from_alphas_cumprod(torch.cumprod(1 - betas, 0))


def flow_schedule() -> NoiseSchedule:
    """Rectified flow on diffusers' descending grid; model timestep = grid index, for indexing."""
    sigmas = torch.arange(1000, 0, -1, dtype=torch.float64) / 1000
    return NoiseSchedule.from_flow_sigmas(sigmas, torch.arange(1000))


def gaussian_model(schedule: NoiseSchedule, mu: float, s: float):
    """The exact noise prediction for data N(mu, s^2 I): E[eps | x_t]."""

    def model(x_t, t):
        g = schedule.gamma[t].view(-1, 1, 1, 1)
        sg = schedule.sigma[t].view(-1, 1, 1, 1)
        return sg * (x_t - g * mu) / (g * g * s * s + sg * sg)

    return model


def point_mass_model(schedule: NoiseSchedule, points: torch.Tensor):
    """The exact noise prediction for data uniform on ``points``: a model that memorized them."""
    flat = points.flatten(1)

    def model(x_t, t):
        g = schedule.gamma[t].view(-1, 1)
        sg = schedule.sigma[t].view(-1, 1)
        x = x_t.flatten(1)
        logits = -((x[:, None, :] - g[:, :, None] * flat[None]) ** 2).sum(-1) / (2 * sg**2)
        x0 = torch.softmax(logits, dim=1) @ flat
        return ((x - g * x0) / sg).view_as(x_t)

    return model


def draw(n: int, generator: torch.Generator, mu: float = 0.3, s: float = 0.8) -> torch.Tensor:
    return mu + s * torch.randn(n, *SHAPE, generator=generator)


# ---------------------------------------------------------------------------------------------
# Prediction types
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample", "flow_prediction"])
@pytest.mark.parametrize("make", [ddpm_schedule, flow_schedule])
def test_eps_and_x0_invert_the_targets(kind, make):
    schedule = make()
    g = torch.Generator().manual_seed(0)
    clean, noise = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g)
    index = torch.tensor([0, 1, 100, 500, 900, 999])
    gamma, sigma = schedule.gamma[index], schedule.sigma[index]
    noisy = gamma[:, None] * clean + sigma[:, None] * noise
    target = prediction_target(kind, clean, noise, gamma, sigma)
    torch.testing.assert_close(
        eps_from_prediction(target, noisy, gamma, sigma, kind), noise, atol=2e-4, rtol=1e-4
    )
    # x0 from an epsilon prediction divides by gamma: loose where gamma is tiny.
    keep = gamma > 0.05 if kind == "epsilon" else gamma >= 0
    torch.testing.assert_close(
        x0_from_prediction(target, noisy, gamma, sigma, kind)[keep],
        clean[keep],
        atol=1e-3,
        rtol=1e-3,
    )


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (ddpm_schedule, "v_prediction"),
        (ddpm_schedule, "sample"),
        (flow_schedule, "flow_prediction"),
    ],
)
def test_every_prediction_type_scores_like_its_epsilon_model(make, kind):
    schedule = make()
    eps_model = gaussian_model(schedule, 0.3, 0.8)

    def other(x_t, t):  # the same model, predicting `kind`
        eps = eps_model(x_t, t)
        g, s = schedule.gamma[t].view(-1, 1, 1, 1), schedule.sigma[t].view(-1, 1, 1, 1)
        x0 = (x_t - s * eps) / g
        return prediction_target(kind, x0, eps, schedule.gamma[t], schedule.sigma[t])

    images = draw(5, torch.Generator().manual_seed(1))
    steps = (50, 100) if make is ddpm_schedule else (949, 899)
    kwargs = {"timesteps": steps, "noise_draws": 4}
    want = denoising_errors(
        eps_model, schedule, images, generator=torch.Generator().manual_seed(2), **kwargs
    )
    got = denoising_errors(
        other,
        schedule,
        images,
        generator=torch.Generator().manual_seed(2),
        prediction_type=kind,
        **kwargs,
    )
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_default_timesteps_are_the_least_noisy_ranks_on_either_grid():
    """(50, 100) on DDPM's ascending grid, (949, 899) on diffusers' descending flow grid."""
    images = draw(3, torch.Generator().manual_seed(0))
    for schedule, steps in ((ddpm_schedule(), (50, 100)), (flow_schedule(), (949, 899))):
        model = gaussian_model(schedule, 0.3, 0.8)
        default = denoising_errors(
            model, schedule, images, generator=torch.Generator().manual_seed(3)
        )
        explicit = denoising_errors(
            model, schedule, images, timesteps=steps, generator=torch.Generator().manual_seed(3)
        )
        torch.testing.assert_close(default, explicit)


# ---------------------------------------------------------------------------------------------
# Known answers
# ---------------------------------------------------------------------------------------------


def test_denoising_error_of_the_gaussian_score_is_its_posterior_variance():
    """E||eps - E[eps | x_t]||^2 / D = gamma^2 s^2 / (gamma^2 s^2 + sigma^2), averaged over t."""
    schedule, mu, s = ddpm_schedule(), 0.3, 0.8
    g = torch.Generator().manual_seed(4)
    images = draw(400, g, mu, s)
    errors = denoising_errors(
        gaussian_model(schedule, mu, s),
        schedule,
        images,
        timesteps=(50, 100),
        generator=g,
        batch_size=1024,
    )
    gam, sig = schedule.gamma[[50, 100]].double(), schedule.sigma[[50, 100]].double()
    expected = float((gam**2 * s**2 / (gam**2 * s**2 + sig**2)).mean())
    standard_error = float(errors.std()) / math.sqrt(len(errors))
    assert abs(float(errors.mean()) - expected) < 4 * standard_error


def test_pia_error_of_the_standard_gaussian_score_is_closed_form():
    """For N(0, I) data eps(x, t) = sigma_t x, so eps_0 - eps_t = c x_0 exactly."""
    schedule = ddpm_schedule()
    model = lambda x_t, t: schedule.sigma[t].view(-1, 1, 1, 1) * x_t  # noqa: E731
    images = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(5))
    s0, g, s = (
        schedule.sigma[0].double(),
        schedule.gamma[200].double(),
        schedule.sigma[200].double(),
    )
    c = s0 - s * (g + s * s0)
    expected = (c * images.double()).abs().pow(4).flatten(1).mean(1)
    torch.testing.assert_close(pia_errors(model, schedule, images), expected, rtol=1e-4, atol=0)


@pytest.mark.parametrize("score", ["loss", "pia"])
def test_exact_gaussian_score_gives_chance_membership(score):
    """Members and non-members from the same Gaussian, model = the Gaussian's exact score: the
    score cannot tell them apart, so the AUC is 0.5 up to its standard error and an image is
    'held' with probability at most `level` (the conformal p-value's guarantee). Both attacks:
    the loss (Carlini et al.) and PIA's deterministic t-error."""
    schedule, g = ddpm_schedule(), torch.Generator().manual_seed(6)
    forget, reference = draw(30, g), draw(200, g)
    results = membership_check(
        gaussian_model(schedule, 0.3, 0.8),
        schedule,
        forget,
        reference,
        score=score,
        generator=g,
        noise_draws=4,
        batch_size=512,
    )
    per_image, overall = results[:-1], results[-1]
    assert len(per_image) == 30 and overall.image is None
    auc = overall.statistics["auc"]
    assert auc.measured and auc.low <= 0.5 <= auc.high
    null_se = math.sqrt((30 + 200 + 1) / (12 * 30 * 200))  # AUC's standard error under H0
    assert abs(auc.value - 0.5) < 4 * null_se
    assert auc.n == 230 and overall.details["n_members"] == 30
    assert overall.held is False
    tpr = overall.statistics["tpr_at_fpr"]
    assert tpr.measured and tpr.low <= tpr.value <= tpr.high
    held = sum(r.held for r in per_image)
    assert held <= binom.ppf(0.999, 30, 0.05)
    for result in per_image:
        assert result.statistics["error"].measured and result.statistics["percentile"].n == 200
        assert result.statistics["percentile"].held_when == "lower"


def test_memorizing_model_finds_its_members():
    """Model = exact score of point masses at the forget images: members are denoised perfectly,
    non-members are pulled to the nearest member."""
    schedule, g = ddpm_schedule(), torch.Generator().manual_seed(7)
    forget, reference = draw(12, g), draw(150, g)
    results = membership_check(
        point_mass_model(schedule, forget),
        schedule,
        forget,
        reference,
        generator=g,
        noise_draws=2,
    )
    per_image, overall = results[:-1], results[-1]
    assert all(r.held is True for r in per_image)
    assert all(r.statistics["percentile"].value == 0.0 for r in per_image)
    assert overall.statistics["auc"].value > 0.99 and overall.statistics["auc"].low > 0.5
    assert overall.statistics["tpr_at_fpr"].value > 0.9
    assert overall.held is True


def test_separate_member_set_and_pia_score():
    schedule, g = ddpm_schedule(), torch.Generator().manual_seed(8)
    members, reference = draw(20, g), draw(100, g)
    results = membership_check(
        point_mass_model(schedule, members),
        schedule,
        members[:3],
        reference,
        members=members,
        score="pia",
    )
    assert len(results) == 4
    overall = results[-1]
    assert overall.details["n_members"] == 20 and overall.details["members"] == "the `members` set"
    assert overall.statistics["auc"].value > 0.95
    error = results[0].statistics["error"]
    assert error.measured and math.isnan(error.low) and "deterministic" in error.note


def test_bootstrap_is_seeded():
    schedule = ddpm_schedule()
    forget, reference = (
        draw(5, torch.Generator().manual_seed(9)),
        draw(100, torch.Generator().manual_seed(10)),
    )
    model = gaussian_model(schedule, 0.3, 0.8)
    first, second = (
        membership_check(
            model, schedule, forget, reference, generator=torch.Generator().manual_seed(11)
        )
        for _ in range(2)
    )
    assert first == second


# ---------------------------------------------------------------------------------------------
# AUC and TPR against a reference implementation
# ---------------------------------------------------------------------------------------------


def test_auc_and_tpr_match_scikit_learn_with_ties():
    from sklearn.metrics import roc_auc_score, roc_curve

    from siss.audit.membership import _auroc, _bootstrap

    g = torch.Generator().manual_seed(12)
    members = torch.randint(0, 20, (40,), generator=g).double()
    nonmembers = torch.randint(5, 30, (300,), generator=g).double()
    labels = [1] * 40 + [0] * 300
    scores = (-torch.cat([members, nonmembers])).numpy()
    assert _auroc(members, nonmembers) == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
    fpr, tpr, _ = roc_curve(labels, scores)
    assert tpr_at_fpr(members, nonmembers, 0.01) == pytest.approx(tpr[fpr <= 0.01].max())
    assert tpr_at_fpr(members, nonmembers, 0.2) == pytest.approx(tpr[fpr <= 0.2].max())
    # The vectorised bootstrap statistic on the identity resample is the same number.
    aucs, _ = _bootstrap(members, nonmembers, 0.01, 200, g)
    assert abs(float(aucs.mean()) - _auroc(members, nonmembers)) < 4 * float(aucs.std())


# ---------------------------------------------------------------------------------------------
# Honest failures: NaN, too little data
# ---------------------------------------------------------------------------------------------


def test_nan_predictions_are_non_finite_never_a_pass():
    schedule, g = ddpm_schedule(), torch.Generator().manual_seed(13)
    forget, reference = draw(3, g), draw(30, g)
    forget[1] += 1e3  # the model below returns NaN on this image only
    exact = gaussian_model(schedule, 0.3, 0.8)

    def model(x_t, t):
        eps = exact(x_t, t)
        big = x_t.flatten(1).abs().amax(1) > 100
        return torch.where(big.view(-1, 1, 1, 1), torch.full_like(eps, math.nan), eps)

    results = membership_check(model, schedule, forget, reference, generator=g)
    assert results[0].statistics["error"].measured
    assert results[1].statistics["error"].status == "non-finite"
    assert results[1].statistics["percentile"].status == "non-finite"
    assert results[1].held is None
    overall = results[-1]
    assert overall.statistics["auc"].status == "non-finite" and overall.held is None
    assert math.isnan(overall.statistics["auc"].value)

    nan_model = lambda x_t, t: torch.full_like(x_t, math.nan)  # noqa: E731
    results = membership_check(nan_model, schedule, forget[:2], reference, generator=g)
    assert all(e.status == "non-finite" for r in results for e in r.statistics.values())
    assert all(r.held is None for r in results)


def test_too_few_non_members_are_reported_as_missing():
    schedule, g = ddpm_schedule(), torch.Generator().manual_seed(14)
    model = gaussian_model(schedule, 0.3, 0.8)
    forget = draw(3, g)
    one = membership_check(model, schedule, forget, draw(1, g), generator=g)
    assert one[-1].statistics["auc"].status == "not measured"
    assert "at least 2" in one[-1].statistics["auc"].note
    assert one[0].held is None and "at least 19" in one[0].reason
    fifty = membership_check(model, schedule, forget, draw(50, g), generator=g)
    assert fifty[-1].statistics["auc"].measured
    tpr = fifty[-1].statistics["tpr_at_fpr"]
    assert tpr.status == "not measured" and "at least 100 non-members" in tpr.note
    assert math.isnan(tpr.value)
    lone = membership_check(model, schedule, forget[:1], draw(30, g), generator=g)
    assert lone[-1].statistics["auc"].status == "not measured"  # one member


# ---------------------------------------------------------------------------------------------
# Conditioning, determinism, diffusers
# ---------------------------------------------------------------------------------------------


def test_per_row_conditioning_reaches_its_rows():
    """A model that knows each image from its label denoises it exactly: error ~ 0 only if every
    noisy row got its own image's label."""
    schedule = ddpm_schedule()
    images = torch.arange(5.0).view(5, 1, 1, 1).expand(5, *SHAPE).contiguous()

    def model(x_t, t, class_labels):
        g, s = schedule.gamma[t].view(-1, 1, 1, 1), schedule.sigma[t].view(-1, 1, 1, 1)
        return (x_t - g * images[class_labels]) / s

    errors = denoising_errors(
        model,
        schedule,
        images,
        conditioning={"class_labels": torch.arange(5)},
        batch_size=7,
        generator=torch.Generator().manual_seed(15),
    )
    assert float(errors.max()) < 1e-8
    shuffled = denoising_errors(
        model,
        schedule,
        images,
        conditioning={"class_labels": torch.arange(5).roll(1)},
        generator=torch.Generator().manual_seed(15),
    )
    assert float(shuffled.min()) > 1.0


def test_errors_are_seeded():
    schedule = ddpm_schedule()
    images = draw(4, torch.Generator().manual_seed(16))
    model = gaussian_model(schedule, 0.3, 0.8)
    a, b, c = (
        denoising_errors(model, schedule, images, generator=torch.Generator().manual_seed(seed))
        for seed in (1, 1, 2)
    )
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.usefixtures("one_thread")
def test_diffusers_unet_through_the_adapter():
    from diffusers import DDPMScheduler

    unet = tiny_unet().eval()
    scheduler = DDPMScheduler()
    images = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(17))
    via_adapter = denoising_errors(
        unet, scheduler, images, noise_draws=2, generator=torch.Generator().manual_seed(18)
    )
    with torch.no_grad():
        via_callable = denoising_errors(
            lambda x, t: unet(x, t).sample,
            ddpm_schedule(),
            images,
            noise_draws=2,
            generator=torch.Generator().manual_seed(18),
        )
    assert via_adapter.shape == (3,) and bool(torch.isfinite(via_adapter).all())
    torch.testing.assert_close(via_adapter, via_callable, rtol=1e-5, atol=1e-7)
    # The prediction type comes from the scheduler.
    v = denoising_errors(
        unet,
        DDPMScheduler(prediction_type="v_prediction"),
        images,
        noise_draws=2,
        generator=torch.Generator().manual_seed(18),
    )
    explicit = denoising_errors(
        unet,
        scheduler,
        images,
        noise_draws=2,
        prediction_type="v_prediction",
        generator=torch.Generator().manual_seed(18),
    )
    torch.testing.assert_close(v, explicit)
    results = membership_check(
        unet, scheduler, images[:2], images[1:], noise_draws=1, bootstrap=100
    )
    assert len(results) == 3


# ---------------------------------------------------------------------------------------------
# Bad arguments: named errors before any model call
# ---------------------------------------------------------------------------------------------


def _never(x_t, t, **kwargs):
    raise AssertionError("the model was called before the arguments were checked")


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"forget": [1.0]}, TypeError, "`forget`"),
        ({"forget": torch.ones(2, 1, 4, 4, dtype=torch.int64)}, TypeError, "`forget`"),
        ({"reference": torch.ones(5, 1, 3, 3)}, ValueError, "`reference`"),
        ({"reference": torch.full((5, *SHAPE), math.nan)}, ValueError, "`reference`"),
        ({"members": torch.ones(5, 2, 4, 4)}, ValueError, "`members`"),
        ({"score": "lira"}, ValueError, "`score`"),
        ({"fpr": 0.0}, ValueError, "`fpr`"),
        ({"level": 1.5}, ValueError, "`level`"),
        ({"confidence": True}, TypeError, "`confidence`"),
        ({"bootstrap": 10}, ValueError, "`bootstrap`"),
        ({"noise_draws": 0}, ValueError, "`noise_draws`"),
        ({"batch_size": 2.5}, TypeError, "`batch_size`"),
        ({"timesteps": (50, 1000)}, ValueError, "`timesteps`"),
        ({"timesteps": (50.0,)}, TypeError, "`timesteps`"),
        ({"pia_timestep": -1, "score": "pia"}, ValueError, "`pia_timestep`"),
        ({"generator": 0}, TypeError, "`generator`"),
        ({"schedule": "ddpm"}, TypeError, "`schedule`"),
        ({"eps_model": 3}, TypeError, "`eps_model`"),
        ({"prediction_type": "x0"}, ValueError, "`prediction_type`"),
        ({"conditioning": {"class_labels": torch.zeros(3, dtype=torch.long)}}, ValueError, "rows"),
        (
            {"conditioning": {"class_labels": torch.zeros(2, dtype=torch.long)}},
            ValueError,
            "`reference_conditioning`",
        ),
        ({"conditioning": [1]}, TypeError, "`conditioning`"),
    ],
)
def test_bad_arguments_raise_named_errors(change, error, match):
    arguments = {
        "eps_model": _never,
        "schedule": ddpm_schedule(),
        "forget": torch.zeros(2, *SHAPE),
        "reference": torch.zeros(5, *SHAPE),
    }
    arguments.update(change)
    positional = [arguments.pop(k) for k in ("eps_model", "schedule", "forget", "reference")]
    with pytest.raises(error, match=match):
        membership_check(*positional, **arguments)


@pytest.mark.usefixtures("one_thread")
def test_text_conditional_unet_with_a_shared_prompt_and_a_progress_bar():
    from diffusers import DDIMScheduler

    unet = tiny_conditional_unet().eval()
    g = torch.Generator().manual_seed(19)
    latents, prompt = torch.randn(4, 4, 8, 8, generator=g), torch.randn(1, 5, 8, generator=g)
    results = membership_check(
        unet,
        DDIMScheduler(),
        latents[:2],
        latents[2:],
        noise_draws=1,
        bootstrap=100,
        conditioning={"encoder_hidden_states": prompt},
        generator=g,
        progress=True,
    )
    assert [r.image for r in results] == [0, 1, None]
    assert all(r.statistics["error"].measured for r in results[:2])


@pytest.mark.parametrize(
    ("steps", "loss", "pia"),
    [(1000, [50, 100], [0, 200]), (100, [5, 10], [0, 20]), (40, [2, 4], [0, 8])],
)
def test_the_default_timesteps_are_the_same_fraction_of_any_schedule(steps, loss, pia):
    """The defaults (loss at t = 50, 100; PIA at 200, of 1000) were clamped to the noisiest
    index on shorter schedules: at T = 100 the loss attack ran at 50 and 99, at T = 40 at 39
    alone, the opposite of the small noise they are there for."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=steps)
    seen: list[int] = []

    def spy(x, t):
        seen.extend(t.flatten().tolist())
        return torch.zeros_like(x)

    images = torch.zeros(4, 1, 4, 4)
    for score, expected in (("loss", loss), ("pia", pia)):
        seen.clear()
        membership_check(spy, scheduler, images[:1], images[1:], score=score, noise_draws=1,
                         bootstrap=100)  # fmt: skip
        assert sorted({int(t) for t in seen}) == expected
