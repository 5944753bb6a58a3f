"""generate: DDIM / flow-matching sampling, seeded, with exact-score models as known answers."""

import math
import types

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from siss.audit.sampling import generate, prediction_fn, to_epsilon

pytestmark = pytest.mark.usefixtures("one_thread")

MU, S = 0.2, 0.4


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def check_moments(samples, steps_bias):
    """Sample mean and std against N(MU, S^2): 4 standard errors plus the sampler's known bias."""
    values = samples.double().flatten()
    se_mean = S / math.sqrt(values.numel())
    se_std = S / math.sqrt(2 * values.numel())
    assert abs(float(values.mean()) - MU) < 4 * se_mean
    assert abs(float(values.std()) - S) < 4 * se_std + steps_bias * S


def test_ddim_samples_the_gaussian_an_exact_model_defines(audit_models):
    scheduler = DDPMScheduler(clip_sample=False)
    model = audit_models.exact_model(audit_models.vp_scales(scheduler), MU, S)
    samples = generate(
        model,
        scheduler,
        256,
        sample_shape=(1, 8, 8),
        num_inference_steps=200,
        generator=seeded(),
        progress=False,
    )
    assert samples.shape == (256, 1, 8, 8) and samples.dtype == torch.float32
    # Deterministic DDIM underdisperses slightly: measured -0.7% of S at 200 steps (-5% at 50).
    check_moments(samples, steps_bias=0.015)


def test_v_prediction_schedulers_are_sampled_in_their_own_parameterisation(audit_models):
    scheduler = DDPMScheduler(clip_sample=False, prediction_type="v_prediction")
    scales = audit_models.vp_scales(scheduler)
    eps_model = audit_models.exact_model(scales, MU, S)

    def v_model(x, t):  # v = gamma eps - sigma x0, x0 = (x - sigma eps) / gamma
        gamma, sigma = (v.reshape(-1, 1, 1, 1).float() for v in scales(t))
        eps = eps_model(x, t)
        return gamma * eps - sigma * (x - sigma * eps) / gamma

    samples = generate(
        v_model,
        scheduler,
        256,
        sample_shape=(1, 8, 8),
        num_inference_steps=200,
        generator=seeded(),
        progress=False,
    )
    check_moments(samples, steps_bias=0.015)


def test_flow_matching_samples_the_gaussian_and_a_point_mass_exactly(audit_models):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scales = audit_models.flow_scales()
    model = audit_models.exact_model(scales, MU, S, prediction="flow")
    samples = generate(
        model,
        scheduler,
        256,
        sample_shape=(1, 8, 8),
        num_inference_steps=200,
        generator=seeded(),
        progress=False,
    )
    check_moments(samples, steps_bias=0.015)
    target = torch.rand(1, 1, 8, 8, generator=seeded(1)) * 2 - 1
    memorizer = audit_models.exact_model(scales, target, 0.0, prediction="flow")
    samples = generate(memorizer, scheduler, 8, sample_shape=(1, 8, 8), progress=False)
    torch.testing.assert_close(samples, target.expand(8, -1, -1, -1), atol=1e-4, rtol=0)


def test_a_point_mass_model_generates_its_image_exactly(audit_models):
    scheduler = DDPMScheduler(clip_sample=False)
    target = torch.rand(1, 1, 8, 8, generator=seeded(1)) * 2 - 1
    model = audit_models.exact_model(audit_models.vp_scales(scheduler), target, 0.0)
    samples = generate(model, scheduler, 8, sample_shape=(1, 8, 8), progress=False)
    torch.testing.assert_close(samples, target.expand(8, -1, -1, -1), atol=1e-4, rtol=0)


def test_unet_samples_are_seeded_independent_of_batch_size_and_leave_the_scheduler(audit_models):
    unet = audit_models.tiny_unet()
    unet.train()
    scheduler = DDPMScheduler()
    before = (dict(scheduler.config), scheduler.timesteps.clone())
    first = generate(
        unet, scheduler, 6, num_inference_steps=4, batch_size=4, generator=seeded(3), progress=False
    )
    second = generate(
        unet, scheduler, 6, num_inference_steps=4, batch_size=6, generator=seeded(3), progress=False
    )
    other = generate(unet, scheduler, 6, num_inference_steps=4, generator=seeded(4), progress=False)
    assert first.shape == (6, 1, 8, 8)
    torch.testing.assert_close(first, second, atol=1e-5, rtol=0)
    assert not torch.allclose(first, other)
    assert unet.training  # the mode is restored
    assert dict(scheduler.config) == before[0] and torch.equal(scheduler.timesteps, before[1])
    # clip_sample=True (the config's default): DDIM clips its x0 prediction, so samples lie in range
    assert float(first.abs().max()) <= 1.0


def test_class_conditional_unet_takes_per_sample_or_shared_labels(audit_models):
    unet = audit_models.tiny_unet(num_class_embeds=3)
    scheduler = DDPMScheduler()
    kwargs = dict(num_inference_steps=2, batch_size=3, progress=False)
    per_sample = generate(
        unet,
        scheduler,
        4,
        generator=seeded(),
        **kwargs,
        conditioning={"class_labels": torch.tensor([1, 1, 1, 1])},
    )
    shared = generate(
        unet,
        scheduler,
        4,
        generator=seeded(),
        **kwargs,
        conditioning={"class_labels": torch.tensor([1])},
    )
    torch.testing.assert_close(per_sample, shared)
    with pytest.raises(ValueError, match="class_labels"):
        generate(unet, scheduler, 4, conditioning={"class_labels": torch.tensor([0, 1])}, **kwargs)
    calls = []
    unet.register_forward_pre_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match=r"class-conditional UNet2DModel .* needs `class_labels`"):
        generate(unet, scheduler, 4, **kwargs)  # no labels: refused before the model is called
    assert calls == []


def test_progress_bar_is_shown_on_request(audit_models, capfd):
    generate(audit_models.tiny_unet(), DDPMScheduler(), 2, num_inference_steps=1, progress=True)
    assert "sampling (ddim)" in capfd.readouterr().err


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"num_samples": 0}, ValueError, "num_samples"),
        ({"num_samples": 2.0}, TypeError, "num_samples"),
        ({"num_inference_steps": 0}, ValueError, "num_inference_steps"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"generator": 3}, TypeError, "generator"),
        ({"sample_shape": (1, 0, 8)}, ValueError, "sample_shape"),
        ({"clip_sample": 1}, TypeError, "clip_sample"),
        ({"scheduler": types.SimpleNamespace(config={})}, ValueError, "scheduler"),
        (
            {"scheduler": FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)},
            ValueError,
            "scheduler",
        ),
    ],
)
def test_bad_arguments_are_named_before_any_model_call(audit_models, kwargs, error, name):
    calls = []
    unet = audit_models.tiny_unet()
    unet.register_forward_hook(lambda *args: calls.append(1))
    arguments = {
        "model": unet,
        "scheduler": DDPMScheduler(),
        "num_samples": 2,
        "progress": False,
        **kwargs,
    }
    with pytest.raises(error, match=name):
        generate(**arguments)
    assert not calls


def test_a_callable_needs_a_sample_shape_and_must_return_a_tensor():
    with pytest.raises(ValueError, match="sample_shape"):
        generate(lambda x, t: x, DDPMScheduler(), 2, progress=False)
    with pytest.raises(TypeError, match="model"):
        generate(lambda x, t: None, DDPMScheduler(), 2, sample_shape=(1, 2, 2), progress=False)
    with pytest.raises(ValueError, match="model"):
        prediction_fn(lambda x, t: x[:1])(torch.zeros(2, 1), torch.zeros(2))


def test_to_epsilon_inverts_each_parameterisation():
    x0, eps = torch.randn(3, 4, generator=seeded()), torch.randn(3, 4, generator=seeded(1))
    gamma, sigma = torch.tensor(0.6), torch.tensor(0.8)
    x_t = gamma * x0 + sigma * eps
    for kind, prediction in [
        ("epsilon", eps),
        ("v_prediction", gamma * eps - sigma * x0),
        ("sample", x0),
    ]:
        torch.testing.assert_close(to_epsilon(prediction, x_t, gamma, sigma, kind), eps)
    s = torch.tensor(0.3)
    x_s = (1 - s) * x0 + s * eps
    torch.testing.assert_close(to_epsilon(eps - x0, x_s, 1 - s, s, "flow_prediction"), eps)


def test_a_continuous_timestep_model_gets_its_own_timesteps():
    """``EulerDiscreteScheduler(timestep_type="continuous")`` models take ``0.25 log σ`` (about
    -3 ... 3), as its pipelines feed them; generation, reconstruction and the likelihood ODE
    gave them the grid indices (0 ... 999), far outside what they learned."""
    from diffusers import EulerDiscreteScheduler

    from siss.adapters import model_timesteps, schedule_from_scheduler
    from siss.audit.likelihood import likelihood_check
    from siss.audit.reconstruction import reconstruct

    scheduler = EulerDiscreteScheduler(prediction_type="v_prediction", timestep_type="continuous")
    seen = []

    def model(x, timesteps):
        seen.append(timesteps.detach().double().flatten())
        return torch.zeros_like(x)

    images = torch.zeros(2, 1, 4, 4)
    generate(model, scheduler, 2, sample_shape=(1, 4, 4), num_inference_steps=3, progress=False)
    reconstruct(model, scheduler, images, t=250, num_inference_steps=5, generator=seeded())
    likelihood_check(model, scheduler, images[:1], images, repeats=1, rtol=1e-2, atol=1e-2,
                     generator=seeded(), progress=False)  # fmt: skip
    grid = schedule_from_scheduler(scheduler).timesteps.double()
    low, high = float(grid.min()), float(grid.max())
    values = torch.cat(seen)
    assert values.numel() > 0 and bool(((values >= low - 1e-6) & (values <= high + 1e-6)).all())
    to_model = model_timesteps(scheduler)
    torch.testing.assert_close(to_model(torch.arange(1000)).double(), grid, rtol=0, atol=0)
    assert model_timesteps(DDPMScheduler()) is None
