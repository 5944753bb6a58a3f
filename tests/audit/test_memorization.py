"""Wen et al.'s noise-magnitude memorization score: known answers and a tiny SD UNet."""

import math

import pytest
import torch
from conftest import tiny_conditional_unet

from siss import NoiseSchedule
from siss.audit._models import resolve_schedule
from siss.audit.memorization import (
    _inference_indices,
    memorization_check,
    noise_magnitude_score,
)

LATENT = (2, 4, 4)


def ddpm_schedule() -> NoiseSchedule:
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    return NoiseSchedule.from_alphas_cumprod(torch.cumprod(1 - betas, 0))


def shifted_model(shift: torch.Tensor, base=lambda x, t: 0.3 * x):
    """Prediction = base(x, t) + m * shift, m = the mean of the embeddings (1 for the prompt,
    0 for the empty prompt): conditional minus unconditional is exactly ``shift``."""

    def model(x, t, encoder_hidden_states):
        m = encoder_hidden_states.mean((1, 2)).view(-1, 1, 1, 1)
        return base(x, t) + m * shift

    return model


PROMPT, NULL = torch.ones(1, 3, 8), torch.zeros(1, 3, 8)


def test_score_is_the_norm_of_a_known_conditional_shift():
    shift = torch.randn(LATENT, generator=torch.Generator().manual_seed(0))
    tracks = noise_magnitude_score(
        shifted_model(shift),
        ddpm_schedule(),
        (5, *LATENT),
        PROMPT,
        NULL,
        num_inference_steps=20,
        num_steps=20,
        return_steps=True,
        generator=torch.Generator().manual_seed(1),
    )
    assert tracks.shape == (5, 20)
    torch.testing.assert_close(
        tracks, torch.full((5, 20), float(shift.norm()), dtype=torch.float64), rtol=1e-5, atol=0
    )


def test_prompt_equal_to_null_scores_exactly_zero():
    """Identical conditional and unconditional rows: a measured 0, with a [0, 0] interval."""
    [result] = memorization_check(
        shifted_model(torch.ones(LATENT)),
        ddpm_schedule(),
        (4, *LATENT),
        PROMPT,
        PROMPT.clone(),
        num_inference_steps=10,
        num_steps=10,
        threshold=0.5,
        generator=torch.Generator().manual_seed(2),
    )
    estimate = result.statistics["noise_magnitude"]
    assert estimate.measured and estimate.value == 0.0 and (estimate.low, estimate.high) == (0, 0)
    assert estimate.n == 4 and estimate.held_when == "higher"
    assert result.held is False and "threshold" in result.reason


def test_v_prediction_is_scored_on_the_noise_scale():
    """A v-model whose prompt shifts v by V shifts eps by gamma V / (gamma^2 + sigma^2)."""
    schedule = ddpm_schedule()
    shift = torch.randn(LATENT, generator=torch.Generator().manual_seed(3))
    tracks = noise_magnitude_score(
        shifted_model(shift),
        schedule,
        (2, *LATENT),
        PROMPT,
        NULL,
        num_inference_steps=10,
        num_steps=4,
        prediction_type="v_prediction",
        return_steps=True,
        generator=torch.Generator().manual_seed(4),
    )
    sched = resolve_schedule(schedule, "v_prediction", torch.device("cpu"))
    index = _inference_indices(sched, 10)[:4]
    g, s = sched.gamma[index], sched.sigma[index]
    expected = (g / (g * g + s * s) * float(shift.norm())).expand(2, 4)
    torch.testing.assert_close(tracks, expected, rtol=1e-5, atol=1e-7)


def test_inference_grid_matches_diffusers_ddim():
    from diffusers import DDIMScheduler

    sd = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        clip_sample=False,
        set_alpha_to_one=False,
    )
    sched = resolve_schedule(sd, None, torch.device("cpu"))
    assert _inference_indices(sched, 50) == list(range(981, 0, -20))  # SD's DDIM, as Wen et al.
    assert len(sd.timesteps) == 1000  # the scheduler itself was not touched
    plain = resolve_schedule(ddpm_schedule(), None, torch.device("cpu"))
    assert _inference_indices(plain, 50) == list(range(980, -1, -20))


@pytest.mark.usefixtures("one_thread")
def test_tiny_stable_diffusion_unet():
    from diffusers import DDIMScheduler

    unet, scheduler = tiny_conditional_unet().eval(), DDIMScheduler(steps_offset=1)
    g = torch.Generator().manual_seed(5)
    prompt, null = torch.randn(1, 5, 8, generator=g), torch.randn(1, 5, 8, generator=g)
    latents = torch.randn(3, 4, 8, 8, generator=g)
    scores = noise_magnitude_score(
        unet, scheduler, latents, prompt, null, num_inference_steps=5, num_steps=3
    )
    assert scores.shape == (3,) and bool(torch.isfinite(scores).all()) and bool((scores > 0).all())
    again = noise_magnitude_score(
        unet, scheduler, latents, prompt, null, num_inference_steps=5, num_steps=3
    )
    assert torch.equal(scores, again)
    # The first step's norm, by hand: eps(x_T, c) - eps(x_T, null) at timestep 801 (5 DDIM steps).
    first = noise_magnitude_score(
        unet, scheduler, latents, prompt, null, num_inference_steps=5, num_steps=1
    )
    with torch.no_grad():
        t = torch.full((3,), 801)
        diff = (
            unet(latents, t, encoder_hidden_states=prompt.expand(3, 5, 8)).sample
            - unet(latents, t, encoder_hidden_states=null.expand(3, 5, 8)).sample
        )
    torch.testing.assert_close(first, diff.flatten(1).norm(dim=1).double(), rtol=1e-4, atol=1e-6)
    [result] = memorization_check(
        unet, scheduler, latents, prompt, prompt.clone(), num_inference_steps=5, num_steps=2
    )
    assert result.statistics["noise_magnitude"].value == pytest.approx(0.0, abs=1e-6)


def test_reference_prompts_give_a_percentile_and_a_verdict():
    shift = torch.full(LATENT, 0.5)  # norm 2
    reference = torch.linspace(0.1, 1.5, 40, dtype=torch.float64)
    kwargs = {
        "num_inference_steps": 5,
        "num_steps": 5,
        "generator": torch.Generator().manual_seed(6),
    }
    [result] = memorization_check(
        shifted_model(shift),
        ddpm_schedule(),
        (2, *LATENT),
        PROMPT,
        NULL,
        reference_scores=reference,
        image=3,
        **kwargs,
    )
    assert result.image == 3 and result.held is True
    percentile = result.statistics["percentile"]
    assert percentile.value == 1.0 and percentile.n == 40 and percentile.high == 1.0
    assert result.details["p_value"] == pytest.approx(1 / 41)
    [few] = memorization_check(
        shifted_model(shift),
        ddpm_schedule(),
        (2, *LATENT),
        PROMPT,
        NULL,
        reference_scores=reference[:5],
        **kwargs,
    )
    assert few.held is None and "at least 19" in few.reason
    [low] = memorization_check(
        shifted_model(0.01 * shift),
        ddpm_schedule(),
        (2, *LATENT),
        PROMPT,
        NULL,
        reference_scores=reference,
        **kwargs,
    )
    assert low.held is False and low.statistics["percentile"].value == 0.0
    bad = reference.clone()
    bad[0] = math.nan
    [nan] = memorization_check(
        shifted_model(shift),
        ddpm_schedule(),
        (2, *LATENT),
        PROMPT,
        NULL,
        reference_scores=bad,
        **kwargs,
    )
    assert nan.statistics["percentile"].status == "non-finite" and nan.held is None


def test_one_generation_has_no_interval_and_no_verdict_without_reference():
    [result] = memorization_check(
        shifted_model(torch.ones(LATENT)),
        ddpm_schedule(),
        (1, *LATENT),
        PROMPT,
        NULL,
        num_inference_steps=3,
        num_steps=1,
    )
    estimate = result.statistics["noise_magnitude"]
    assert estimate.measured and math.isnan(estimate.low) and "one generation" in estimate.note
    assert result.held is None


def test_nan_model_is_non_finite_never_a_pass():
    model = lambda x, t, encoder_hidden_states: torch.full_like(x, math.nan)  # noqa: E731
    [result] = memorization_check(
        model,
        ddpm_schedule(),
        (2, *LATENT),
        PROMPT,
        NULL,
        num_inference_steps=3,
        num_steps=2,
        reference_scores=torch.zeros(30),
        threshold=1.0,
    )
    assert result.statistics["noise_magnitude"].status == "non-finite"
    assert result.statistics["percentile"].status == "non-finite"
    assert result.held is None


def _never(x, t, **kwargs):
    raise AssertionError("the model was called before the arguments were checked")


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"num_steps": 6}, ValueError, "`num_steps`"),
        ({"num_inference_steps": 0}, ValueError, "`num_inference_steps`"),
        ({"num_inference_steps": 2000, "num_steps": 1}, ValueError, "`num_inference_steps`"),
        ({"null_embeds": torch.zeros(1, 4, 8)}, ValueError, "`null_embeds`"),
        ({"prompt_embeds": torch.ones(1, 3, 8, dtype=torch.long)}, TypeError, "`prompt_embeds`"),
        ({"prompt_embeds": torch.full((1, 3, 8), math.nan)}, ValueError, "`prompt_embeds`"),
        ({"prompt_embeds": torch.ones(3, 3, 8)}, ValueError, "`prompt_embeds`"),
        ({"latents": (2, 0, 4)}, TypeError, "`latents`"),
        ({"latents": torch.ones(2, 2, 4, 4, dtype=torch.int32)}, ValueError, "`latents`"),
        ({"guidance_scale": math.inf}, ValueError, "`guidance_scale`"),
        ({"level": 0.0}, ValueError, "`level`"),
        ({"threshold": math.nan}, ValueError, "`threshold`"),
        ({"reference_scores": [1.0, 2.0]}, TypeError, "`reference_scores`"),
        ({"reference_scores": torch.zeros(0)}, ValueError, "`reference_scores`"),
        ({"image": 1.5}, TypeError, "`image`"),
        ({"eps_model": "unet"}, TypeError, "`eps_model`"),
        ({"schedule": object()}, TypeError, "`schedule`"),
        ({"generator": 1}, TypeError, "`generator`"),
    ],
)
def test_bad_arguments_raise_named_errors(change, error, match):
    arguments = {
        "eps_model": _never,
        "schedule": ddpm_schedule(),
        "latents": (2, *LATENT),
        "prompt_embeds": PROMPT,
        "null_embeds": NULL,
        "num_inference_steps": 5,
        "num_steps": 5,
    }
    arguments.update(change)
    positional = [
        arguments.pop(k)
        for k in ("eps_model", "schedule", "latents", "prompt_embeds", "null_embeds")
    ]
    with pytest.raises(error, match=match):
        memorization_check(*positional, **arguments)
