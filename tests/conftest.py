"""Shared test set-up: deterministic hypothesis runs, a DDPM schedule, tiny seeded models.

Statistical tests draw everything from seeded generators and hypothesis runs derandomized, so a
pass or a fail is reproducible: no flaky statistics.

Test modules import plain helpers with ``from conftest import fuzz_settings, tiny_unet``. That
resolves to this file only while it is the only ``conftest.py`` under ``tests/``: pytest imports
every ``conftest.py`` as the module ``conftest``, so one in a subfolder would replace this one
for every test module collected after it. Put shared fixtures and helpers here instead.
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


# --------------------------------------------------------------------------------------------
# Tiny diffusers models (random weights, seeded, CPU): build them from config, never download
# --------------------------------------------------------------------------------------------


def tiny_unet(seed: int | None = 0, **overrides):
    """A ``UNet2DModel`` of ~10k parameters on 1x8x8 images, built after ``manual_seed(seed)``
    (``seed=None``: from the global generator's current state).

    ``overrides`` replace or add config entries (e.g. ``sample_size=16``, ``in_channels=3``).
    """
    from diffusers import UNet2DModel

    config = {
        "sample_size": 8,
        "in_channels": 1,
        "out_channels": 1,
        "block_out_channels": (8, 16),
        "norm_num_groups": 4,
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "UpBlock2D"),
    }
    if seed is not None:
        torch.manual_seed(seed)
    return UNet2DModel(**{**config, **overrides})


def tiny_conditional_unet(seed: int | None = 0, **overrides):
    """A text-conditional ``UNet2DConditionModel`` on 4x8x8 latents (cross-attention dim 8, one
    cross-attention block each way); ``seed`` and ``overrides`` as in :func:`tiny_unet` (e.g.
    ``cross_attention_dim=16``)."""
    from diffusers import UNet2DConditionModel

    config = {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (8, 16),
        "norm_num_groups": 4,
        "layers_per_block": 1,
        "cross_attention_dim": 8,
        "attention_head_dim": 2,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    }
    if seed is not None:
        torch.manual_seed(seed)
    return UNet2DConditionModel(**{**config, **overrides})


# --------------------------------------------------------------------------------------------
# Audit: exact-score models with known answers
# --------------------------------------------------------------------------------------------


def vp_scales(scheduler, continuous=False):
    """``timesteps -> (gamma, sigma)`` of a VP scheduler: at the integer timestep (what DDIM feeds
    the model) or on ``siss.metrics.VPSchedule``'s continuous schedule (what the NLL's ODE feeds,
    ``t * (T - 1)``)."""
    from siss.metrics.nll import VPSchedule

    ac = torch.cumprod(1 - scheduler.betas.double(), 0)
    vp = VPSchedule(ac)

    def scales(timesteps):
        if continuous:
            t = timesteps[:1].detach().double() / (len(ac) - 1)
            return torch.exp(0.5 * vp.log_alpha_cumprod(t)), vp.sigma(t)
        a = ac[timesteps.detach().round().long().cpu()]
        return a.sqrt(), (1 - a).sqrt()

    return scales


def flow_scales(num_train_timesteps=1000):
    """``timesteps -> (gamma, sigma) = (1 - s, s)`` with ``s = timesteps / T`` (rectified flow)."""

    def scales(timesteps):
        s = timesteps.detach().double().cpu() / num_train_timesteps
        return 1 - s, s

    return scales


def exact_model(scales, mu, s, prediction="epsilon"):
    """The exact denoiser of data ``N(mu, s^2 I)``; ``s = 0`` is a point mass at ``mu`` (a model
    that memorised one image). With ``x_t = gamma x_0 + sigma eps`` and ``var = gamma^2 s^2 +
    sigma^2``: ``E[eps | x_t] = sigma (x_t - gamma mu) / var`` and ``E[x_0 | x_t] = mu +
    gamma s^2 (x_t - gamma mu) / var``. ``prediction``: ``"epsilon"`` or ``"flow"`` (velocity
    ``E[eps - x_0 | x_t]``)."""

    def model(x, timesteps):
        gamma, sigma = scales(timesteps)
        shape = (-1,) + (1,) * (x.dim() - 1)
        gamma = gamma.reshape(shape).to(x.device, torch.float64)
        sigma = sigma.reshape(shape).to(x.device, torch.float64)
        m = mu.to(x.device, torch.float64) if isinstance(mu, torch.Tensor) else mu
        centred = x.double() - gamma * m
        var = gamma**2 * s**2 + sigma**2
        eps = sigma * centred / var
        if prediction == "epsilon":
            return eps.to(x.dtype)
        x0 = m + gamma * s**2 * centred / var
        return (eps - x0).to(x.dtype)

    return model


@pytest.fixture
def audit_models():
    """The helpers above, as a namespace: ``audit_models.exact_model(...)`` etc."""
    import types

    return types.SimpleNamespace(
        tiny_unet=tiny_unet, vp_scales=vp_scales, flow_scales=flow_scales, exact_model=exact_model
    )
