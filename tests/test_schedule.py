"""NoiseSchedule: construction from DDPM and flow schedules, timestep sampling, errors."""

import pytest
import torch

from siss import NoiseSchedule


def test_from_alphas_cumprod(alphas_cumprod):
    schedule = NoiseSchedule.from_alphas_cumprod(alphas_cumprod)
    assert len(schedule) == 1000
    assert schedule.gamma.dtype == schedule.sigma.dtype == torch.float32
    torch.testing.assert_close(
        schedule.gamma.double() ** 2 + schedule.sigma.double() ** 2,
        torch.ones(1000, dtype=torch.float64),
        rtol=0,
        atol=1e-6,
    )
    assert torch.equal(schedule.timesteps, torch.arange(1000))


def test_sigma_is_formed_in_float64_even_from_half_precision(alphas_cumprod):
    """1 - ᾱ_0 = 1e-4 would round to 0 in fp16 arithmetic; it must not."""
    schedule = NoiseSchedule.from_alphas_cumprod(alphas_cumprod.float())
    assert schedule.sigma[0].item() == pytest.approx(0.01, rel=1e-3)


def test_from_flow_sigmas():
    sigmas = torch.linspace(1.0, 1e-3, 1000)
    schedule = NoiseSchedule.from_flow_sigmas(sigmas)
    torch.testing.assert_close(schedule.gamma + schedule.sigma, torch.ones(1000))
    torch.testing.assert_close(schedule.timesteps, sigmas * 1000)


def test_sample_indices_specs(alphas_cumprod):
    schedule = NoiseSchedule.from_alphas_cumprod(alphas_cumprod)
    g = torch.Generator().manual_seed(0)
    uniform = schedule.sample_indices(10_000, generator=g)
    assert uniform.dtype == torch.long and uniform.min() >= 0 and uniform.max() <= 999
    assert uniform.unique().numel() > 990
    assert torch.equal(schedule.sample_indices(4, 999), torch.full((4,), 999))
    window = schedule.sample_indices(1000, (250, 260), generator=g)
    assert window.min() == 250 and window.max() == 260
    given = torch.tensor([1, 2, 3])
    assert torch.equal(schedule.sample_indices(3, given), given)
    assert torch.equal(schedule.sample_indices(3, torch.tensor(5)), torch.full((3,), 5))


def test_small_integer_dtypes_are_checked_as_int64(alphas_cumprod):
    """A uint8 index above 231 was refused: `uint8 > 999` wraps 999 to 231 (issue 23 review)."""
    schedule = NoiseSchedule.from_alphas_cumprod(alphas_cumprod)
    index = torch.tensor(240, dtype=torch.uint8)
    assert schedule.sample_indices(2, index).tolist() == [240, 240]


def test_sampling_is_reproducible(alphas_cumprod):
    schedule = NoiseSchedule.from_alphas_cumprod(alphas_cumprod)
    first = schedule.sample_indices(16, generator=torch.Generator().manual_seed(3))
    second = schedule.sample_indices(16, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, second)


@pytest.mark.parametrize(
    ("timesteps", "error", "match"),
    [
        (1000, ValueError, r"\[0, 999\]"),
        (-1, ValueError, r"\[0, 999\]"),
        ((10, 5), ValueError, "window"),
        ((0, 1000), ValueError, "window"),
        ((0.0, 1.0), TypeError, "pair of ints"),
        (torch.tensor([0.5, 1.0]), TypeError, "integer grid indices"),
        (torch.tensor([0, 1000]), ValueError, r"\[0, 999\]"),
        (torch.tensor([0, 1, 2]), ValueError, "shape"),
        (True, TypeError, "`timesteps`"),
        ("999", TypeError, "`timesteps`"),
    ],
)
def test_bad_timesteps_raise(alphas_cumprod, timesteps, error, match):
    schedule = NoiseSchedule.from_alphas_cumprod(alphas_cumprod)
    with pytest.raises(error, match=match):
        schedule.sample_indices(2, timesteps)


@pytest.mark.parametrize(
    ("alphas_cumprod", "match"),
    [
        (torch.tensor([0.5, 1.0]), "strictly inside"),
        (torch.tensor([0.5, float("nan")]), "strictly inside"),
        (torch.tensor([0.0, 0.5]), "strictly inside"),
        (torch.ones(2, 2) * 0.5, "shape"),
    ],
)
def test_bad_schedules_raise(alphas_cumprod, match):
    with pytest.raises(ValueError, match=match):
        NoiseSchedule.from_alphas_cumprod(alphas_cumprod)


def test_bad_flow_sigmas_and_raw_schedules_raise():
    with pytest.raises(ValueError, match="sigmas"):
        NoiseSchedule.from_flow_sigmas(torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="`sigma` must be finite and > 0"):
        NoiseSchedule(torch.ones(2), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="`gamma` must be finite"):
        NoiseSchedule(torch.tensor([1.0, float("inf")]), torch.ones(2))
    with pytest.raises(TypeError, match="`alphas_cumprod` must be a floating"):
        NoiseSchedule.from_alphas_cumprod(torch.tensor([1, 2]))


def test_moves_with_the_module(alphas_cumprod):
    schedule = NoiseSchedule.from_alphas_cumprod(alphas_cumprod)
    names = {name for name, _ in schedule.named_buffers()}
    assert names == {"gamma", "sigma", "timesteps"}
