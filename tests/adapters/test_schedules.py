"""Schedules and prediction types read from diffusers schedulers, checked against the schedulers.

For every scheduler × prediction type it supports, with λ = 0 (every row noised from ``x``) and
s = 0, the loss is the plain MSE to the target the scheduler itself implies, and the draw's noisy
batch is the scheduler's own forward process for the same noise and timesteps.
"""

from __future__ import annotations

import copy

import diffusers
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    PNDMScheduler,
)

from siss import NoiseSchedule, SISSLoss, UnlearningLoss
from siss.adapters import (
    SUPPORTED_SCHEDULERS,
    loss_from_scheduler,
    prediction_type_from_scheduler,
    schedule_from_scheduler,
)

# diffusers' set_timesteps and some constructors trip NumPy 2 deprecations; not ours to fix.
pytestmark = [
    pytest.mark.filterwarnings("ignore:__array:DeprecationWarning"),
    pytest.mark.usefixtures("one_thread"),
]


VP_CASES = [
    (DDPMScheduler, ("epsilon", "v_prediction", "sample")),
    (DDIMScheduler, ("epsilon", "v_prediction", "sample")),
    (PNDMScheduler, ("epsilon", "v_prediction")),
    (EulerDiscreteScheduler, ("epsilon", "v_prediction", "sample")),
    (DPMSolverMultistepScheduler, ("epsilon", "v_prediction", "sample")),
]
CASES = [
    pytest.param(
        cls, {"prediction_type": p, "beta_schedule": beta}, id=f"{cls.__name__}-{p}-{beta}"
    )
    for cls, types in VP_CASES
    for p in types
    for beta in ("linear", "scaled_linear")
] + [
    pytest.param(FlowMatchEulerDiscreteScheduler, {"shift": shift}, id=f"FlowMatch-shift{shift}")
    for shift in (1.0, 3.0)
]


def _batch(seed: int = 0, batch: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 4, 4, generator=g), torch.randn(batch, 3, 4, 4, generator=g)


def _scheduler_noisy(scheduler, x0, noise, draw) -> torch.Tensor:
    """The scheduler's own forward process at the draw's timesteps (its model input)."""
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return scheduler.scale_noise(x0, draw.timesteps, noise)
    if isinstance(scheduler, EulerDiscreteScheduler):
        # Variance-exploding form x0 + s eps, scaled by `scale_model_input`'s 1/sqrt(s^2 + 1).
        ac = scheduler.alphas_cumprod[draw.indices].to(torch.float64)
        s = ((1 - ac) / ac).sqrt().float().view(-1, 1, 1, 1)
        return scheduler.add_noise(x0, noise, draw.timesteps.float()) / (s**2 + 1).sqrt()
    if isinstance(scheduler, DPMSolverMultistepScheduler):
        # Its `add_noise` looks up the descending timesteps in the ascending `sigmas` until
        # `set_timesteps` runs (t and T-1-t swapped), so use its own conversion directly.
        alpha_t, sigma_t = scheduler._sigma_to_alpha_sigma_t(scheduler.sigmas[draw.indices])
        return alpha_t.view(-1, 1, 1, 1) * x0 + sigma_t.view(-1, 1, 1, 1) * noise
    return scheduler.add_noise(x0, noise, draw.timesteps)


def _scheduler_target(scheduler, prediction_type, x0, noise, draw) -> torch.Tensor:
    """The regression target, in float64, from the scheduler's own ``alphas_cumprod``."""
    if prediction_type == "epsilon":
        return noise.double()
    if prediction_type == "sample":
        return x0.double()
    if prediction_type == "flow_prediction":
        return noise.double() - x0.double()
    if isinstance(scheduler, DDPMScheduler | DDIMScheduler):
        return scheduler.get_velocity(x0.double(), noise.double(), draw.timesteps)
    ac = scheduler.alphas_cumprod.to(torch.float64)[draw.indices].view(-1, 1, 1, 1)
    return ac.sqrt() * noise.double() - (1 - ac).sqrt() * x0.double()


@pytest.mark.parametrize(("cls", "config"), CASES)
def test_true_target_gives_zero_and_random_output_gives_plain_mse(cls, config):
    scheduler = cls(**config)
    loss_fn = loss_from_scheduler(SISSLoss, scheduler, lam=0.0, superfactor=0.0)
    x0, a0 = _batch()
    draw = loss_fn.sample(x0, a0, generator=torch.Generator().manual_seed(1))
    assert not draw.from_forget.any()
    target = _scheduler_target(scheduler, loss_fn.prediction_type, x0, draw.noise, draw)

    assert loss_fn(target.float(), draw).item() == pytest.approx(0.0, abs=1e-10)
    output = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    expected = (output.double() - target).square().mean()
    assert loss_fn(output, draw).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize(("cls", "config"), CASES)
def test_noisy_batch_matches_the_scheduler_forward_process(cls, config):
    scheduler = cls(**config)
    loss_fn = loss_from_scheduler(SISSLoss, scheduler, lam=0.0, superfactor=0.0)
    x0, a0 = _batch(3)
    draw = loss_fn.sample(x0, a0, generator=torch.Generator().manual_seed(4))
    expected = _scheduler_noisy(scheduler, x0, draw.noise, draw)
    torch.testing.assert_close(draw.noisy, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("cls", "config"), CASES)
def test_extremes_of_the_grid_match_the_scheduler(cls, config):
    scheduler = cls(**config)
    loss_fn = loss_from_scheduler(SISSLoss, scheduler, lam=0.0, superfactor=0.0)
    x0, a0 = _batch(5, batch=2)
    for index in (0, len(loss_fn.schedule) - 1):
        draw = loss_fn.sample(x0, a0, timesteps=index, generator=torch.Generator().manual_seed(6))
        expected = _scheduler_noisy(scheduler, x0, draw.noise, draw)
        torch.testing.assert_close(draw.noisy, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("cls", "config"), CASES)
def test_reading_does_not_mutate_and_ignores_set_timesteps(cls, config):
    scheduler = cls(**config)
    before = copy.deepcopy(scheduler.__dict__)
    schedule = schedule_from_scheduler(scheduler)
    prediction_type_from_scheduler(scheduler)
    for key, value in before.items():
        now = scheduler.__dict__[key]
        if isinstance(value, torch.Tensor):
            assert now.device == value.device and torch.equal(now, value), key
        elif key != "_internal_dict":
            assert type(now) is type(value), key
    assert dict(scheduler.config) == dict(before["_internal_dict"])

    inference = copy.deepcopy(scheduler)
    inference.set_timesteps(10)
    after = schedule_from_scheduler(inference)
    for name in ("gamma", "sigma", "timesteps"):
        assert torch.equal(getattr(after, name), getattr(schedule, name)), name


@pytest.mark.parametrize("cls", [c for c, _ in VP_CASES])
def test_vp_schedule_is_alphas_cumprod_with_integer_timesteps(cls):
    scheduler = cls(num_train_timesteps=500)
    schedule = schedule_from_scheduler(scheduler)
    assert len(schedule) == 500
    assert torch.equal(schedule.timesteps, torch.arange(500))
    torch.testing.assert_close(
        schedule.gamma.double().square(), scheduler.alphas_cumprod.double(), rtol=1e-6, atol=1e-6
    )
    torch.testing.assert_close(schedule.gamma.square() + schedule.sigma.square(), torch.ones(500))


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("shift", [1.0, 0.5, 3.0, 7.25])
@pytest.mark.parametrize("num_train_timesteps", [1000, 37])
def test_flow_grid_index_i_is_the_scheduler_index_i(num_train_timesteps, shift, dynamic):
    """Index i means ``scheduler.sigmas[i]`` / ``scheduler.timesteps[i]``, bit for bit.

    That is diffusers' own order (descending noise: index 0 is sigma = 1), the one its SD3/Flux
    training scripts index with ``noise_scheduler.timesteps[indices]``.
    """
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=num_train_timesteps, shift=shift, use_dynamic_shifting=dynamic
    )
    schedule = schedule_from_scheduler(scheduler)
    assert len(schedule) == num_train_timesteps
    assert schedule.timesteps.dtype == torch.float32
    assert torch.equal(schedule.sigma, scheduler.sigmas)
    assert torch.equal(schedule.timesteps, scheduler.timesteps)
    assert torch.equal(schedule.gamma, (1 - scheduler.sigmas.double()).float())
    assert schedule.sigma[0].item() == 1.0  # index 0: pure noise, as in diffusers
    assert bool((schedule.sigma[1:] < schedule.sigma[:-1]).all())
    assert prediction_type_from_scheduler(scheduler) == "flow_prediction"


def test_flow_schedule_with_dynamic_shifting_is_unshifted_like_the_scheduler():
    # Flux: `shift` is applied per resolution at inference (`set_timesteps(mu=...)`); the training
    # grid the diffusers Flux scripts index into is the unshifted one.
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    schedule = schedule_from_scheduler(scheduler)
    assert torch.equal(schedule.timesteps, scheduler.timesteps)
    torch.testing.assert_close(schedule.sigma, torch.arange(1000, 0, -1) / 1000)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_ported_sd3_timestep_sampling_gets_the_diffusers_sigmas(shift):
    """diffusers' ``train_dreambooth_sd3.py``, ported through ``timesteps=`` grid indices."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    loss_fn = loss_from_scheduler(SISSLoss, scheduler, lam=0.0, superfactor=0.0)
    x0, a0 = _batch(11, batch=6)
    u = torch.rand(6, generator=torch.Generator().manual_seed(12))
    u[0], u[1] = 0.0, 1.0 - 1e-7  # both ends of the grid
    indices = (u * scheduler.config.num_train_timesteps).long()
    draw = loss_fn.sample(x0, a0, timesteps=indices, generator=torch.Generator().manual_seed(13))

    # diffusers: timesteps = scheduler.timesteps[indices]; sigmas looked up by timestep.
    timesteps = scheduler.timesteps[indices]
    step = [(scheduler.timesteps == t).nonzero().item() for t in timesteps]
    sigmas = scheduler.sigmas[step].view(-1, 1, 1, 1)
    assert torch.equal(draw.timesteps, timesteps)
    torch.testing.assert_close(draw.noisy, (1.0 - sigmas) * x0 + sigmas * draw.noise)
    torch.testing.assert_close(draw.noisy, scheduler.scale_noise(x0, timesteps, draw.noise))


def test_flow_index_zero_is_the_highest_noise_as_in_diffusers():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    loss_fn = loss_from_scheduler(SISSLoss, scheduler, lam=0.0, superfactor=0.0)
    x0, a0 = _batch(14, batch=1)
    draw = loss_fn.sample(x0, a0, timesteps=torch.tensor([0]), generator=torch.Generator())
    assert draw.timesteps.item() == scheduler.timesteps.max().item() == 1000.0
    torch.testing.assert_close(draw.noisy, draw.noise, rtol=0, atol=0)  # sigma = 1: pure noise
    last = loss_fn.sample(x0, a0, timesteps=999, generator=torch.Generator())
    assert last.timesteps.item() == scheduler.timesteps.min().item()
    assert (last.noisy - x0).abs().max() < (draw.noisy - x0).abs().max()


def test_zero_terminal_snr_gives_pure_noise_at_the_last_step():
    scheduler = DDPMScheduler(rescale_betas_zero_snr=True, prediction_type="v_prediction")
    loss_fn = loss_from_scheduler(SISSLoss, scheduler, lam=0.5, superfactor=0.1)
    assert loss_fn.schedule.gamma[-1].item() == 0.0
    assert loss_fn.schedule.sigma[-1].item() == 1.0
    x0, a0 = _batch(7, batch=2)
    draw = loss_fn.sample(x0, a0, timesteps=999, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(draw.noisy, scheduler.add_noise(x0, draw.noise, draw.timesteps))
    assert torch.isfinite(loss_fn(torch.zeros_like(x0), draw))


def test_euler_continuous_v_prediction_timesteps_are_the_scheduler_ones():
    scheduler = EulerDiscreteScheduler(prediction_type="v_prediction", timestep_type="continuous")
    schedule = schedule_from_scheduler(scheduler)
    assert schedule.timesteps.dtype == torch.float32
    torch.testing.assert_close(schedule.timesteps, scheduler.timesteps.flip(0))


@pytest.mark.parametrize(
    "name",
    [n for n in SUPPORTED_SCHEDULERS if n not in {c.__name__ for c, _ in VP_CASES}],
)
def test_every_other_supported_scheduler_reads_its_training_schedule(name):
    scheduler = getattr(diffusers, name)()
    schedule = schedule_from_scheduler(scheduler)
    assert len(schedule) == scheduler.config.num_train_timesteps
    if name.startswith("FlowMatch"):
        assert torch.equal(schedule.timesteps, scheduler.timesteps)
    else:
        torch.testing.assert_close(
            schedule.gamma.double().square(),
            scheduler.alphas_cumprod.double(),
            rtol=1e-6,
            atol=1e-6,
        )
    assert prediction_type_from_scheduler(scheduler) in ("epsilon", "flow_prediction")


def test_unsupported_scheduler_names_the_supported_ones():
    with pytest.raises(ValueError, match=r"unsupported scheduler IPNDMScheduler.*DDPMScheduler"):
        schedule_from_scheduler(diffusers.IPNDMScheduler())
    with pytest.raises(ValueError, match="FlowMatchEulerDiscreteScheduler"):
        loss_from_scheduler(SISSLoss, object())


def test_unsupported_prediction_type_names_the_supported_ones():
    with pytest.raises(ValueError, match=r"unsupported prediction_type 'foo'.*epsilon, v_pred"):
        prediction_type_from_scheduler(DDPMScheduler(prediction_type="foo"))
    scheduler = DPMSolverMultistepScheduler(prediction_type="flow_prediction")
    with pytest.raises(ValueError, match="flow_prediction through FlowMatchEulerDiscrete"):
        loss_from_scheduler(SISSLoss, scheduler)


def test_flow_sigmas_on_a_dpm_solver_point_to_flow_matching():
    scheduler = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction")
    with pytest.raises(ValueError, match=r"use_flow_sigmas.*FlowMatchEulerDiscreteScheduler"):
        schedule_from_scheduler(scheduler)


def test_original_sample_is_read_as_sample():
    scheduler = EulerDiscreteScheduler(prediction_type="original_sample")
    assert prediction_type_from_scheduler(scheduler) == "sample"


def test_loss_from_scheduler_passes_options_and_allows_an_explicit_prediction_type():
    scheduler = DDIMScheduler(prediction_type="v_prediction")
    loss_fn = loss_from_scheduler(SISSLoss, scheduler, lam=0.25, superfactor=0.5, n=10, k=2)
    assert (loss_fn.lam, loss_fn.superfactor, loss_fn.n, loss_fn.k) == (0.25, 0.5, 10, 2)
    assert loss_fn.prediction_type == "v_prediction"
    assert isinstance(loss_fn.schedule, NoiseSchedule)
    override = loss_from_scheduler(SISSLoss, scheduler, superfactor=0.1, prediction_type="epsilon")
    assert override.prediction_type == "epsilon"
    with pytest.raises(ValueError, match="`prediction_type` must be one of"):
        loss_from_scheduler(SISSLoss, scheduler, superfactor=0.1, prediction_type="eps")
    with pytest.raises(TypeError, match="UnlearningLoss subclass"):
        loss_from_scheduler(torch.nn.MSELoss, scheduler)


@pytest.mark.parametrize("name", ["siss", "siss-nois", "naive", "neggrad", "erasediff"])
def test_loss_from_scheduler_by_method_name(name):
    scheduler = DDIMScheduler(num_train_timesteps=500, beta_schedule="scaled_linear")
    loss_fn = loss_from_scheduler(name, scheduler, superfactor=0.5)
    assert isinstance(loss_fn, UnlearningLoss)
    assert loss_fn.prediction_type == "epsilon"
    torch.testing.assert_close(
        loss_fn.schedule.gamma.square(), scheduler.alphas_cumprod, rtol=1e-6, atol=1e-6
    )
    x0, a0 = _batch(9, batch=2)
    draw = loss_fn.sample(x0, a0, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss_fn(torch.zeros_like(draw.noisy), draw))
