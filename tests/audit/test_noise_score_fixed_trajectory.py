"""Wen et al.'s score on fixed latents: ``guided_trajectory`` and ``trajectory=`` (issue 22)."""

import pytest
import torch

from siss import NoiseSchedule
from siss.audit.memorization import guided_trajectory, noise_magnitude_score

LATENT = (2, 4, 4)
PROMPT, NULL = torch.ones(1, 3, 8), torch.zeros(1, 3, 8)
STEPS = {"num_inference_steps": 12, "num_steps": 12}


def schedule() -> NoiseSchedule:
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    return NoiseSchedule.from_alphas_cumprod(torch.cumprod(1 - betas, 0))


def model_with(weight: float, pull: torch.Tensor):
    """eps = 0.3 x + m * weight * (x - pull): the prompt (m = 1) pulls towards ``pull``, more
    with ``weight``; the empty prompt (m = 0) does not depend on ``weight``."""

    def model(x, t, encoder_hidden_states):
        m = encoder_hidden_states.mean((1, 2)).view(-1, 1, 1, 1)
        return 0.3 * x + m * weight * (x - pull)

    return model


def noise(seed: int = 0) -> torch.Tensor:
    return torch.randn(5, *LATENT, generator=torch.Generator().manual_seed(seed))


def test_fixed_trajectory_of_the_same_model_gives_its_own_score_exactly():
    model = model_with(0.5, torch.randn(LATENT, generator=torch.Generator().manual_seed(1)))
    xs = guided_trajectory(model, schedule(), noise(), PROMPT, NULL, **STEPS)
    assert xs.shape == (12, 5, *LATENT)
    torch.testing.assert_close(xs[0], noise(), rtol=0, atol=0)
    own = noise_magnitude_score(
        model, schedule(), noise(), PROMPT, NULL, return_steps=True, **STEPS
    )
    fixed = noise_magnitude_score(
        model, schedule(), None, PROMPT, NULL, trajectory=xs, return_steps=True, **STEPS
    )
    assert torch.equal(own, fixed)


def test_fixed_trajectory_separates_the_model_from_its_trajectory():
    """Another model scored on the first one's x_t: each step's norm is the second model's
    ``||eps(x_t, c) - eps(x_t, null)||`` at exactly those x_t (known in closed form), which
    differs from its score on its own guided run."""
    pull = torch.randn(LATENT, generator=torch.Generator().manual_seed(2))
    first, second = model_with(0.5, pull), model_with(2.0, pull)
    xs = guided_trajectory(first, schedule(), noise(), PROMPT, NULL, **STEPS)
    fixed = noise_magnitude_score(
        second, schedule(), None, PROMPT, NULL, trajectory=xs, return_steps=True, **STEPS
    )
    expected = (2.0 * (xs.double() - pull.double())).flatten(2).norm(dim=2).T
    torch.testing.assert_close(fixed, expected, rtol=1e-5, atol=1e-6)
    own = noise_magnitude_score(
        second, schedule(), noise(), PROMPT, NULL, return_steps=True, **STEPS
    )
    assert torch.equal(own[:, 0], fixed[:, 0])  # the same starting noise
    assert not torch.allclose(own[:, 1:], fixed[:, 1:])  # then the trajectories part


def test_a_longer_trajectory_scores_its_first_num_steps():
    model = model_with(0.5, torch.zeros(LATENT))
    xs = guided_trajectory(model, schedule(), noise(), PROMPT, NULL, **STEPS)
    fewer = noise_magnitude_score(
        model, schedule(), None, PROMPT, NULL, trajectory=xs, num_inference_steps=12, num_steps=3
    )
    full = noise_magnitude_score(
        model, schedule(), None, PROMPT, NULL, trajectory=xs, return_steps=True, **STEPS
    )
    torch.testing.assert_close(fewer, full[:, :3].mean(1), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("latents", "trajectory", "match"),
    [
        (noise(), torch.zeros(12, 5, *LATENT), "not both"),
        (None, torch.zeros(4, 5, *LATENT), "fewer than `num_steps`"),
        (None, torch.zeros(12, 5), "num_steps, G"),
        (None, torch.full((12, 5, *LATENT), float("nan")), "NaN"),
        (None, torch.zeros(12, 5, *LATENT, dtype=torch.long), "floating"),
    ],
)
def test_bad_trajectories_are_refused(latents, trajectory, match):
    with pytest.raises(ValueError, match=match):
        noise_magnitude_score(
            model_with(0.5, torch.zeros(LATENT)), schedule(), latents, PROMPT, NULL,
            trajectory=trajectory, **STEPS,
        )  # fmt: skip
