"""Targets per prediction type, checked against their definitions in float64."""

import pytest
import torch

from siss.functional import prediction_target


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
