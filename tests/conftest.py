"""Shared test set-up: deterministic hypothesis runs and a DDPM schedule.

Statistical tests draw everything from seeded generators and hypothesis runs derandomized, so a
pass or a fail is reproducible: no flaky statistics.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "siss",
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "siss"))

FUZZ_SCALE = float(os.environ.get("SISS_FUZZ_SCALE", "1"))


def fuzz_settings(examples: int) -> settings:
    """``settings`` of a fuzz test: ``examples`` times ``SISS_FUZZ_SCALE``, no deadline.

    The default run is seeded (the "siss" profile) and small. A nightly-style run draws fresh
    examples, many more: ``SISS_FUZZ_SCALE=40 HYPOTHESIS_PROFILE=default python -m pytest -q -k
    fuzz``. Test modules import it with ``from conftest import fuzz_settings``.
    """
    return settings(
        max_examples=max(1, round(examples * FUZZ_SCALE)),
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
        ],
    )


torch.set_num_threads(min(2, torch.get_num_threads()))


def ddpm_alphas_cumprod(num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
    """The linear DDPM schedule of Ho et al. (2020), in float64."""
    betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


@pytest.fixture
def alphas_cumprod():
    return ddpm_alphas_cumprod()


@pytest.fixture
def one_thread():
    """Run a test on one intra-op thread (opt in with ``pytest.mark.usefixtures``).

    Tiny models and ODE solves run thousands of small ops; on a busy 2-core machine two threads
    spin-wait in OpenMP's synchronisation (seen: 8 s instead of 0.05 s for a tiny UNet step).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def device():
    """Tests run on the CPU unless SISS_TEST_DEVICE names another device."""
    return torch.device(os.environ.get("SISS_TEST_DEVICE", "cpu"))
