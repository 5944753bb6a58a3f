"""reconstruction_check / reconstruction_sweep: exact denoisers as known answers."""

import math

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from siss.audit.reconstruction import reconstruction_check, reconstruction_sweep, ssim

pytestmark = pytest.mark.usefixtures("one_thread")

S = 0.4


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def images(count, seed):
    return S * torch.randn(count, 1, 8, 8, generator=seeded(seed))


def memorizer(audit_models, kind, target):
    if kind == "vp":
        scheduler = DDPMScheduler(clip_sample=False)
        return audit_models.exact_model(audit_models.vp_scales(scheduler), target, 0.0), scheduler
    scheduler = FlowMatchEulerDiscreteScheduler()
    model = audit_models.exact_model(audit_models.flow_scales(), target, 0.0, prediction="flow")
    return model, scheduler


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_a_memorizing_model_reconstructs_its_image_and_pulls_others_onto_it(audit_models, kind):
    """A point mass at the forget image a denoises every x_t to a exactly: the forget image's
    similarity is perfect, a reference image x scores -mean(((x - a) / 2)^2) whatever the noise."""
    forget, reference = images(1, 1), images(100, 2)
    model, scheduler = memorizer(audit_models, kind, forget)
    (result,) = reconstruction_check(
        model,
        scheduler,
        forget,
        reference,
        similarity="neg_mse",
        generator=seeded(),
        progress=False,
    )
    similarity, rank = result.statistics["similarity"], result.statistics["percentile"]
    assert similarity.value == pytest.approx(0.0, abs=1e-9) and similarity.n == 4
    assert (rank.value, rank.high, rank.n) == (1.0, 1.0, 100)
    assert result.held is True
    expected = -(((reference - forget) / 2) ** 2).flatten(1).mean(1).double()
    assert result.details["reference_median"] == pytest.approx(float(expected.median()), abs=1e-6)
    (by_ssim,) = reconstruction_check(model, scheduler, forget, reference, progress=False)
    assert by_ssim.statistics["similarity"].value == pytest.approx(1.0, abs=1e-6)
    assert by_ssim.held is True


def test_members_and_non_members_of_one_gaussian_are_not_held(audit_models):
    scheduler = DDPMScheduler(clip_sample=False)
    model = audit_models.exact_model(audit_models.vp_scales(scheduler), 0.0, S)
    forget, reference = images(10, 3), images(100, 4)
    results = reconstruction_check(
        model, scheduler, forget, reference, noise_draws=2, generator=seeded(), progress=False
    )
    percentiles = torch.tensor([r.statistics["percentile"].value for r in results])
    assert abs(float(percentiles.mean()) - 0.5) < 3 * math.sqrt(1 / 12 / len(results))
    assert not any(r.held is True for r in results)
    for result in results:
        similarity = result.statistics["similarity"]
        assert similarity.measured and similarity.low <= similarity.value <= similarity.high


def test_results_are_seeded_and_independent_of_batch_size(audit_models):
    unet = audit_models.tiny_unet()
    scheduler = DDPMScheduler()
    config = dict(scheduler.config)
    forget, reference = images(1, 5), images(3, 6)
    kwargs = dict(t=100, noise_draws=2, progress=False)
    first = reconstruction_check(
        unet, scheduler, forget, reference, batch_size=3, generator=seeded(7), **kwargs
    )
    second = reconstruction_check(
        unet, scheduler, forget, reference, batch_size=8, generator=seeded(7), **kwargs
    )
    assert first[0].details["draws"] == pytest.approx(second[0].details["draws"], abs=1e-5)
    assert first[0].details["steps"] == 5  # DDIM stride 1000 // 50 = 20: 100, 80, ..., 20
    assert dict(scheduler.config) == config


def test_a_custom_similarity_is_used_and_checked(audit_models):
    forget, reference = images(1, 1), images(5, 2)
    model, scheduler = memorizer(audit_models, "vp", forget)
    calls = []

    def cosine(a, b):
        calls.append(a.shape[0])
        return torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1))

    (result,) = reconstruction_check(
        model, scheduler, forget, reference, similarity=cosine, progress=False
    )
    assert calls and result.details["similarity"] == "cosine"
    assert result.statistics["similarity"].value == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="similarity"):
        reconstruction_check(
            model, scheduler, forget, reference, similarity=lambda a, b: a.mean(), progress=False
        )


def test_nan_reconstructions_are_non_finite_and_an_empty_reference_is_not_measured():
    def diverged(x, t):
        return torch.full_like(x, math.nan)

    (result,) = reconstruction_check(
        diverged, DDPMScheduler(clip_sample=False), images(1, 1), images(3, 2), progress=False
    )
    assert result.statistics["similarity"].status == "non-finite" and result.held is None
    model = lambda x, t: torch.zeros_like(x)  # noqa: E731
    (empty,) = reconstruction_check(
        model, DDPMScheduler(), images(1, 1), images(0, 2), progress=False
    )
    assert empty.statistics["similarity"].measured
    assert empty.statistics["percentile"].status == "not measured" and empty.held is None
    assert "no reference images" in empty.statistics["percentile"].note


def test_the_sweep_corrects_its_level_and_combines_verdicts(audit_models):
    forget, reference = images(1, 1), images(100, 2)
    model, scheduler = memorizer(audit_models, "vp", forget)
    (result,) = reconstruction_sweep(
        model, scheduler, forget, reference, ts=(100, 500), noise_draws=1, progress=False
    )
    assert set(result.statistics) == {
        "similarity@t=100",
        "percentile@t=100",
        "similarity@t=500",
        "percentile@t=500",
    }
    assert result.statistics["percentile@t=100"].confidence == pytest.approx(0.975)
    assert result.held is True
    with pytest.raises(ValueError, match="ts"):
        reconstruction_sweep(model, scheduler, forget, reference, ts=())


def test_ssim_of_identical_images_is_one_and_works_below_the_default_window():
    x = images(2, 1)
    torch.testing.assert_close(ssim(x, x), torch.ones(2, dtype=torch.float64))
    assert ssim(x[:, :, :4, :4], -x[:, :, :4, :4]).shape == (2,)


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"t": 0}, ValueError, "`t`"),
        ({"t": 1000}, ValueError, "`t`"),
        ({"t": 2.5}, TypeError, "`t`"),
        ({"similarity": "l1"}, ValueError, "similarity"),
        ({"noise_draws": 0}, ValueError, "noise_draws"),
        ({"percentile": 0.0}, ValueError, "percentile"),
        ({"forget": torch.zeros(2, 1, 8, 8, dtype=torch.long)}, TypeError, "forget"),
        ({"reference": torch.zeros(2, 1, 4, 4)}, ValueError, "reference"),
        ({"generator": 1}, TypeError, "generator"),
    ],
)
def test_bad_arguments_are_named_before_any_model_call(kwargs, error, name):
    calls = []

    def model(x, t):
        calls.append(1)
        return x

    arguments = {
        "model": model,
        "scheduler": DDPMScheduler(),
        "forget": images(1, 1),
        "reference": images(2, 2),
        "progress": False,
        **kwargs,
    }
    with pytest.raises(error, match=name):
        reconstruction_check(**arguments)
    assert not calls
