"""The Gaussian forward process ``q(x_t | x_0) = N(gamma_t x_0, sigma_t^2 I)`` (paper, Eq. 1).

Everything SISS needs from a diffusion model's noise schedule is the pair ``(gamma_t, sigma_t)`` on
a grid of training timesteps, plus the value the model takes as its timestep input there. DDPM-style
schedules give ``gamma = sqrt(alphas_cumprod)``, ``sigma = sqrt(1 - alphas_cumprod)``;
rectified flow (SD3, Flux) gives ``gamma = 1 - s``, ``sigma = s``. Both are Gaussian kernels, so
the importance weights of Eqs. 9–10 hold for either.
"""

from __future__ import annotations

from collections.abc import Callable
from numbers import Integral

import numpy as np
import torch
from torch import Tensor, nn

from siss import _random
from siss._checks import check_floating, check_index, validate_values_enabled

TimestepSpec = int | tuple[int, int] | Tensor | None


class NoiseSchedule(nn.Module):
    """Per-timestep ``gamma_t`` and ``sigma_t`` held as float32 buffers (so ``.to(device)`` works).

    The buffers keep their dtype whatever cast is applied to a module holding the schedule:
    ``loss_fn.half()`` or ``loss_fn.to(torch.bfloat16)`` moves devices but would otherwise round
    ``gamma``, ``sigma`` and so the importance weights to 3 significant digits.

    Args:
        gamma: signal scale ``gamma_t``, shape ``(T,)``, finite and >= 0.
        sigma: noise scale ``sigma_t``, shape ``(T,)``, finite and > 0 (the importance weights
            divide by ``sigma_t^2``).
        timesteps: the value the model receives as its timestep input at each grid index, shape
            ``(T,)``. Defaults to the index itself (``0 .. T-1``, the DDPM convention).

    Examples:
        >>> betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
        >>> schedule = NoiseSchedule.from_alphas_cumprod(torch.cumprod(1 - betas, 0))
        >>> len(schedule), schedule.timesteps[-1].item()
        (1000, 999)
    """

    gamma: Tensor
    sigma: Tensor
    timesteps: Tensor

    def __init__(self, gamma: Tensor, sigma: Tensor, timesteps: Tensor | None = None) -> None:
        super().__init__()
        check_floating(gamma, "gamma")
        check_floating(sigma, "sigma")
        if gamma.ndim != 1 or sigma.shape != gamma.shape or len(gamma) == 0:
            raise ValueError(
                f"`gamma` and `sigma` must both have shape (T,) with T >= 1, got "
                f"{tuple(gamma.shape)} and {tuple(sigma.shape)}"
            )
        if not (torch.isfinite(gamma).all() and (gamma >= 0).all()):
            raise ValueError("`gamma` must be finite and >= 0 at every timestep")
        if not (torch.isfinite(sigma).all() and (sigma > 0).all()):
            raise ValueError(
                "`sigma` must be finite and > 0 at every timestep (a noiseless timestep has no "
                "density to importance-weight); drop it from the schedule"
            )
        if timesteps is None:
            timesteps = torch.arange(len(gamma), device=gamma.device)
        elif not isinstance(timesteps, Tensor) or timesteps.shape != gamma.shape:
            raise ValueError(f"`timesteps` must be a tensor of shape ({len(gamma)},)")
        elif timesteps.dtype == torch.bool or timesteps.dtype.is_complex:
            raise TypeError(f"`timesteps` must be real numbers, got dtype {timesteps.dtype}")
        elif timesteps.is_floating_point() and not bool(torch.isfinite(timesteps).all()):
            raise ValueError("`timesteps` (the model's timestep inputs) must be finite")
        self.register_buffer("gamma", gamma.detach().to(torch.float32))
        self.register_buffer("sigma", sigma.detach().to(torch.float32))
        self.register_buffer("timesteps", timesteps.detach().clone())

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: Tensor) -> NoiseSchedule:
        """DDPM/DDIM-style schedule from ``alphas_cumprod`` (``ᾱ_t``), shape ``(T,)``.

        ``1 - ᾱ_t`` is formed in float64: in half precision it rounds to 0 near ``t = 0``.
        """
        check_floating(alphas_cumprod, "alphas_cumprod")
        if alphas_cumprod.ndim != 1 or len(alphas_cumprod) == 0:
            raise ValueError(
                f"`alphas_cumprod` must have shape (T,) with T >= 1, got "
                f"{tuple(alphas_cumprod.shape)}"
            )
        ac = alphas_cumprod.detach().to(torch.float64)
        if not (torch.isfinite(ac).all() and (ac > 0).all() and (ac < 1).all()):
            raise ValueError("`alphas_cumprod` must lie strictly inside (0, 1) at every timestep")
        return cls(ac.sqrt(), (1 - ac).sqrt())

    @classmethod
    def from_flow_sigmas(cls, sigmas: Tensor, timesteps: Tensor | None = None) -> NoiseSchedule:
        """Rectified-flow schedule ``x_t = (1 - s_t) x_0 + s_t eps`` from sigmas, shape ``(T,)``.

        ``timesteps`` are the model's inputs (diffusers' ``FlowMatchEulerDiscreteScheduler`` uses
        ``sigmas * num_train_timesteps``); they default to that with ``num_train_timesteps = T``.
        """
        check_floating(sigmas, "sigmas")
        if sigmas.ndim != 1 or len(sigmas) == 0:
            raise ValueError(
                f"`sigmas` must have shape (T,) with T >= 1, got {tuple(sigmas.shape)}"
            )
        s = sigmas.detach().to(torch.float64)
        if not (torch.isfinite(s).all() and (s > 0).all() and (s <= 1).all()):
            raise ValueError("flow-matching `sigmas` must lie in (0, 1] at every timestep")
        if timesteps is None:
            timesteps = (s * len(s)).to(torch.float32)
        return cls(1 - s, s, timesteps)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> NoiseSchedule:
        # nn.Module.to/half/double/bfloat16 all pass through here: follow the device, keep dtype.
        for name, buffer in self._buffers.items():
            if buffer is None:
                continue
            moved = fn(buffer)
            if moved.dtype != buffer.dtype:
                moved = buffer.to(device=moved.device)
            self._buffers[name] = moved
        return self

    def __len__(self) -> int:
        return self.gamma.shape[0]

    def sample_indices(
        self,
        batch_size: int,
        timesteps: TimestepSpec = None,
        *,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Grid indices ``(B,)`` (int64) for one batch.

        Args:
            batch_size: ``B``.
            timesteps: ``None`` for uniform over the whole schedule (the training distribution of
                Eq. 2); an ``int`` for one fixed index (the authors' CelebA-HQ and Stable Diffusion
                runs used 999 only); a pair ``(low, high)`` for uniform over ``low..high``
                inclusive; or an integer tensor ``(B,)`` of indices chosen by the caller.
            generator: source of randomness.
        """
        device = self.gamma.device
        last = len(self) - 1
        if timesteps is None:
            return _random.randint(0, last + 1, (batch_size,), generator=generator, device=device)
        if isinstance(timesteps, bool | np.bool_):
            raise TypeError("`timesteps` must be None, an int, a (low, high) pair or a tensor")
        if isinstance(timesteps, Integral):
            timesteps = check_index(timesteps, "timesteps")
            if not 0 <= timesteps <= last:
                raise ValueError(f"`timesteps` must lie in [0, {last}], got {timesteps}")
            return torch.full((batch_size,), timesteps, dtype=torch.long, device=device)
        if isinstance(timesteps, tuple):
            if len(timesteps) != 2 or not all(
                isinstance(t, Integral) and not isinstance(t, bool | np.bool_) for t in timesteps
            ):
                raise TypeError(f"a `timesteps` window must be a pair of ints, got {timesteps!r}")
            low, high = (check_index(t, "timesteps") for t in timesteps)
            if not 0 <= low <= high <= last:
                raise ValueError(
                    f"`timesteps` window must satisfy 0 <= low <= high <= {last}, got {timesteps}"
                )
            return _random.randint(low, high + 1, (batch_size,), generator=generator, device=device)
        if isinstance(timesteps, Tensor):
            if (
                timesteps.dtype.is_floating_point
                or timesteps.dtype.is_complex
                or timesteps.dtype == torch.bool
            ):
                raise TypeError(
                    "`timesteps` tensor must hold integer grid indices, "
                    f"got dtype {timesteps.dtype}"
                )
            if timesteps.device.type == "meta" and device.type != "meta":
                raise ValueError("`timesteps` is on the meta device and holds no indices")
            if timesteps.shape not in ((batch_size,), ()):
                raise ValueError(
                    f"`timesteps` tensor must have shape ({batch_size},), "
                    f"got {tuple(timesteps.shape)}"
                )
            # Checking values on an accelerator forces a host sync (value checks only); CPU is free.
            checked = timesteps.device.type == "cpu" or (
                validate_values_enabled() and timesteps.device.type != "meta"
            )
            # compared as int64: a uint8 tensor against `last` (e.g. 999) would wrap it to 231
            values = timesteps.to(torch.long)
            if checked and (bool((values < 0).any()) or bool((values > last).any())):
                raise ValueError(f"`timesteps` must lie in [0, {last}]")
            return timesteps.to(device=device, dtype=torch.long).expand(batch_size)
        raise TypeError(
            "`timesteps` must be None, an int, a (low, high) pair or a tensor, got "
            f"{type(timesteps).__name__}"
        )
