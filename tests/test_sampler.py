"""The defensive-mixture sampler: Bernoulli rate, noise law, reproducibility, errors."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from siss.functional import mixture_sample

Z_MAX = 4.5  # two-sided z bound; false-alarm probability ~7e-6 per check, and runs are seeded


def batch(rows=20_000, dims=(2, 3), dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(rows, *dims, generator=g, dtype=dtype)
    a0 = torch.randn(rows, *dims, generator=g, dtype=dtype) + 3
    gamma = torch.rand(rows, generator=g, dtype=dtype)
    sigma = torch.rand(rows, generator=g, dtype=dtype) + 0.1
    return x0, a0, gamma, sigma


@given(lam=st.floats(1e-3, 1 - 1e-3), seed=st.integers(0, 2**31 - 1))
def test_bernoulli_rate(lam, seed):
    """z-test of the coin rate; λ is kept where λN >= 20 so the normal approximation holds."""
    x0, a0, gamma, sigma = batch()
    _, from_forget = mixture_sample(x0, a0, gamma, sigma, lam, torch.Generator().manual_seed(seed))
    rows = from_forget.numel()
    rate = from_forget.double().mean().item()
    standard_error = math.sqrt(lam * (1 - lam) / rows)
    assert abs(rate - lam) <= Z_MAX * standard_error


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
def test_noise_law_given_the_source(lam):
    """(noisy - gamma * source) / sigma is N(0, I): mean 0, variance 1, uncorrelated coordinates."""
    x0, a0, gamma, sigma = batch()
    noisy, from_forget = mixture_sample(x0, a0, gamma, sigma, lam, torch.Generator().manual_seed(1))
    source = torch.where(from_forget[:, None, None], a0, x0)
    eps = ((noisy - gamma[:, None, None] * source) / sigma[:, None, None]).flatten(1)
    count = eps.shape[0]
    # mean: standard error 1/sqrt(N); variance: var(eps^2) = 2, so standard error sqrt(2/N)
    assert eps.mean(0).abs().max() <= Z_MAX / math.sqrt(count)
    assert (eps.square().mean(0) - 1).abs().max() <= Z_MAX * math.sqrt(2 / count)
    # cross moment of two independent N(0,1): variance 1
    assert (eps[:, 0] * eps[:, 1]).mean().abs() <= Z_MAX / math.sqrt(count)


def test_given_noise_is_used_exactly():
    x0, a0, gamma, sigma = batch(rows=5)
    noise = torch.randn(x0.shape, dtype=x0.dtype)
    noisy, from_forget = mixture_sample(x0, a0, gamma, sigma, 0.5, noise=noise)
    source = torch.where(from_forget[:, None, None], a0, x0)
    expected = gamma[:, None, None] * source + sigma[:, None, None] * noise
    torch.testing.assert_close(noisy, expected, rtol=0, atol=1e-15)


def test_generator_reproducibility():
    x0, a0, gamma, sigma = batch(rows=64)
    first = mixture_sample(x0, a0, gamma, sigma, 0.5, torch.Generator().manual_seed(7))
    second = mixture_sample(x0, a0, gamma, sigma, 0.5, torch.Generator().manual_seed(7))
    other = mixture_sample(x0, a0, gamma, sigma, 0.5, torch.Generator().manual_seed(8))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0], other[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_keeps_the_input_dtype(dtype):
    x0, a0, gamma, sigma = batch(rows=4, dtype=dtype)
    noisy, from_forget = mixture_sample(x0, a0, gamma.float(), sigma.float(), 0.5)
    assert noisy.dtype == dtype and from_forget.dtype == torch.bool


def test_lambda_extremes_pick_one_side():
    x0, a0, gamma, sigma = batch(rows=256)
    assert not mixture_sample(x0, a0, gamma, sigma, 0.0)[1].any()
    assert mixture_sample(x0, a0, gamma, sigma, 1.0)[1].all()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"lam": 2.0}, ValueError, "`lam`"),
        ({"lam": True}, TypeError, "`lam`"),
        ({"a0": torch.zeros(3, 2)}, ValueError, "`a0` must have the shape"),
        ({"x0": [[0.0]]}, TypeError, "`x0` must be a torch.Tensor"),
        ({"gamma": torch.ones(2)}, ValueError, "`gamma` must have shape"),
        ({"sigma": [1.0, 1.0, 1.0]}, TypeError, "`sigma` must be a torch.Tensor"),
        ({"noise": torch.zeros(3, 3)}, ValueError, "`noise`"),
    ],
)
def test_bad_inputs_raise(kwargs, error, match):
    args = {
        "x0": torch.zeros(3, 2),
        "a0": torch.ones(3, 2),
        "gamma": torch.ones(3),
        "sigma": torch.ones(3),
        "lam": 0.5,
    }
    args.update(kwargs)
    if "a0" in kwargs:
        args["x0"] = torch.zeros(3, 4)
        args["a0"] = kwargs["a0"]
    with pytest.raises(error, match=match):
        mixture_sample(**args)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"sigma": torch.tensor([1.0, 0.0, 1.0])}, ValueError, "`sigma`"),
        ({"gamma": torch.tensor([1, 1, 1])}, TypeError, "`gamma`"),
        ({"x0": torch.zeros(3), "a0": torch.ones(3)}, ValueError, "`x0`"),
        ({"noise": torch.zeros(3, 2, dtype=torch.long)}, TypeError, "`noise`"),
    ],
)
def test_bad_inputs_named_by_the_review(kwargs, error, match):
    args = {
        "x0": torch.zeros(3, 2),
        "a0": torch.ones(3, 2),
        "gamma": torch.ones(3),
        "sigma": torch.ones(3),
        "lam": 0.5,
    }
    args.update(kwargs)
    with pytest.raises(error, match=match):
        mixture_sample(**args)
