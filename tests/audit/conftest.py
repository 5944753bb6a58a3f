"""Shared fixtures of the audit tests: tiny models and exact-score models with known answers."""

import pytest
import torch


def tiny_unet(**config):
    """A ~10k-parameter ``UNet2DModel`` on 1x8x8 images (random weights)."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        **config,
    )


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
