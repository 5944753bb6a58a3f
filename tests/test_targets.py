"""Targets per prediction type, checked against their definitions in float64."""

import pytest
import torch

from siss.functional import prediction_target
from siss.targets import PREDICTION_TYPES


def inputs():
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    noise = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    gamma = torch.rand(4, generator=g, dtype=torch.float64)
    sigma = (1 - gamma**2).sqrt()
    return clean, noise, gamma, sigma


def test_epsilon_sample_and_flow():
    clean, noise, gamma, sigma = inputs()
    assert torch.equal(prediction_target("epsilon", clean, noise, gamma, sigma), noise)
    assert torch.equal(prediction_target("sample", clean, noise, gamma, sigma), clean)
    assert torch.equal(
        prediction_target("flow_prediction", clean, noise, gamma, sigma), noise - clean
    )


def test_v_prediction_matches_its_definition():
    """v = gamma eps - sigma x0 (Salimans & Ho 2022; diffusers' get_velocity)."""
    clean, noise, gamma, sigma = inputs()
    expected = gamma[:, None, None] * noise - sigma[:, None, None] * clean
    torch.testing.assert_close(
        prediction_target("v_prediction", clean, noise, gamma, sigma), expected
    )


def test_unknown_prediction_type_names_the_supported_ones():
    clean, noise, gamma, sigma = inputs()
    with pytest.raises(ValueError, match="epsilon, v_prediction, sample, flow_prediction"):
        prediction_target("score", clean, noise, gamma, sigma)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_eps_error_scale_turns_a_target_error_into_the_noise_error(prediction_type):
    """``eps_from_prediction`` is affine in the prediction, so for any two predictions the
    implied noises differ by ``sqrt(scale)`` times their difference: the squared error against
    the target, times the scale, is the squared error of the implied noise (float64)."""
    from siss.targets import eps_error_scale, eps_from_prediction

    generator = torch.Generator().manual_seed(0)
    x0, noise = (torch.randn(6, 3, 4, 4, generator=generator, dtype=torch.float64) for _ in "ab")
    if prediction_type == "flow_prediction":
        sigma = torch.rand(6, generator=generator, dtype=torch.float64) * 0.98 + 0.01
        gamma = 1 - sigma
    else:
        gamma = torch.rand(6, generator=generator, dtype=torch.float64) * 0.98 + 0.01
        sigma = (1 - gamma**2).sqrt()
    g, s = gamma.view(-1, 1, 1, 1), sigma.view(-1, 1, 1, 1)
    noisy = g * x0 + s * noise
    target = prediction_target(prediction_type, x0, noise, gamma, sigma)
    output = target + 0.3 * torch.randn(target.shape, generator=generator, dtype=torch.float64)
    eps_hat = eps_from_prediction(output, noisy, gamma, sigma, prediction_type)
    noise_error = (eps_hat - noise).square().flatten(1).mean(1)
    target_error = (output - target).square().flatten(1).mean(1)
    scale = eps_error_scale(prediction_type, gamma, sigma)
    torch.testing.assert_close(scale * target_error, noise_error, rtol=1e-10, atol=1e-12)
