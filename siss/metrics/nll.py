"""Exact likelihood of a diffusion model through its probability-flow ODE: VP and rectified flow.

The paper measures unlearning by the negative log-likelihood of the forgotten image (Table 2's
"NLL"), computed as in Song et al., "Score-Based Generative Modeling through Stochastic
Differential Equations" (ICLR 2021), Sec. 4.3 and appendix D.2. A deterministic flow
$dx/dt = f(x, t)$ on $t \\in [t_\\epsilon, 1]$ that ends at the prior $\\mathcal N(0, I)$ gives
the data point $x = x(t_\\epsilon)$ the log-density (instantaneous change of variables)

$$
\\log p_{t_\\epsilon}(x) = \\log \\mathcal N(x(1); 0, I) + \\int_{t_\\epsilon}^1
\\nabla \\cdot f(x(t), t)\\,dt.
$$

One integrator solves it for both processes here (one adaptive torchdiffeq solve of the
augmented state ``(x, divergence integral)``, the same estimator, the same checks); the entry
points differ only in the drift $f$ they build from the model's output:

* ``log_likelihood`` / ``bits_per_dim``: a VP (DDPM) noise-prediction model $\\epsilon_\\theta$.
  The variance-preserving SDE

  $$
  dx = -\\tfrac12 \\beta(t) x\\,dt + \\sqrt{\\beta(t)}\\,dw, \\quad t \\in [0, 1],
  $$

  has the probability-flow ODE (the score is $-\\epsilon_\\theta / \\sigma$)

  $$
  \\frac{dx}{dt} = f(x, t) = -\\tfrac12 \\beta(t) \\Big(x - \\frac{\\epsilon_\\theta(x, t)}
  {\\sigma(t)}\\Big), \\qquad \\sigma(t)^2 = 1 - \\bar\\alpha(t).
  $$

* ``flow_log_likelihood`` / ``flow_bits_per_dim``: a rectified-flow (flow-matching) model
  $v_\\theta$. The process $x_s = (1 - s) x_0 + s \\epsilon$, $s \\in [0, 1]$, has the ODE
  $dx/ds = f(x, s) = v_\\theta(x, s)$, the model's velocity $\\epsilon - x_0$; its marginal at
  $s = 1$ is the prior exactly. The model is queried at the timestep ``s * T`` (the diffusers
  convention whatever the scheduler's ``shift``, which only moves the sampling grid).

The divergence is estimated with Hutchinson's trace estimator
$\\nabla\\cdot f \\approx v^\\top (\\partial f / \\partial x) v$ with Rademacher probes
$v$ drawn once per call (fixed along the trajectory), one vector-Jacobian product per
probe and function evaluation. The estimator is unbiased; it is exact whenever the Jacobian is
diagonal, since $v_i^2 = 1$.

Continuous VP schedule (the choice made here): the discrete schedule with ``T`` steps is read as
the VP-SDE whose $\\beta(t)$ interpolates ``T * betas[i]`` linearly between the nodes
$t_i = i / (T - 1)$, with ``betas[i] = 1 - alphas_cumprod[i] / alphas_cumprod[i - 1]``
and $\\log\\bar\\alpha(t) = -\\int_0^t \\beta(s)\\,ds$ (so $\\bar\\alpha(0) = 1$).
For DDPM's linear schedule (``betas`` from 1e-4 to 0.02, ``T = 1000``) this is exactly Song et
al.'s VP-SDE with $\\beta_{\\min} = 0.1, \\beta_{\\max} = 20$. The model is queried at the
continuous timestep ``t * (T - 1)``, Song et al.'s convention for DDPM checkpoints.

Bits per dimension (Song et al.'s convention, ``offset = 7`` for data in ``[-1, 1]``; the same
for both processes): images with ``num_bins = 256`` intensity levels scaled to
``data_range = (lo, hi)`` occupy bins of width ``(hi - lo) / 256``, so the discrete negative
log-likelihood in bits per dimension is

$$
\\text{bpd} = -\\frac{\\log p(x)}{D \\ln 2} + \\log_2 \\frac{256}{hi - lo}
$$

(7 for ``[-1, 1]``, 8 for ``[0, 1]``); ``num_bins=None`` drops the offset (continuous
bits/dim). With ``dequantize=True`` the input is first mapped back to its integer level ``k``
and replaced by Song et al.'s uniform dequantization ``lo + (hi - lo) (k + u) / 256``. The two
processes integrate different ODEs: their bits/dim compare within a process only.

What cannot be measured raises ``ValueError`` (``TypeError`` for a wrong type) naming the
argument (``eps_model`` or ``velocity_model`` for the model), never a number: images with NaN
or inf values (with their count), a model whose output is non-finite or of the wrong shape (a
diverged model has no likelihood), an ODE solution that overflows, integer or half-precision
images (the solver's tolerances are below half precision's resolution), and fixed-grid solvers
(they would take a single step from $t_\\epsilon$ to 1 here and return a finite, wrong value).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from siss._optional import needs
from siss.metrics._validate import (
    check_choice,
    check_finite_rows,
    check_int,
    check_real,
    check_tensor,
)

__all__ = [
    "VPSchedule",
    "bits_per_dim",
    "flow_bits_per_dim",
    "flow_log_likelihood",
    "log_likelihood",
]

EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
VelocityModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# (x_t, model output, t) -> dx/dt: the drift of the probability-flow ODE, differentiable in x_t.
Drift = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# torchdiffeq's adaptive solvers; its fixed-grid ones step on the output times [t_eps, 1] only.
_ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")


class VPSchedule:
    """Continuous VP-SDE built from a discrete ``alphas_cumprod`` (see the module docstring).

    Args:
        alphas_cumprod: ``(T,)`` cumulative products of ``1 - beta`` of the discrete schedule
            (a tensor or a sequence of numbers), ``T >= 2``, non-increasing inside ``(0, 1)``.

    Examples:
        >>> betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
        >>> vp = VPSchedule(torch.cumprod(1 - betas, 0))
        >>> round(float(vp.beta(torch.tensor(1.0))), 6)  # Song et al.'s beta_max
        20.0
    """

    def __init__(self, alphas_cumprod: torch.Tensor) -> None:
        if isinstance(alphas_cumprod, torch.Tensor) and alphas_cumprod.is_meta:
            raise ValueError("`alphas_cumprod` is a meta tensor: it holds no values")
        try:
            ac = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(
                f"`alphas_cumprod` must be a (T,) tensor, got {type(alphas_cumprod).__name__}"
            ) from err
        if ac.dim() != 1 or ac.numel() < 2:
            raise ValueError(f"`alphas_cumprod` must be (T,) with T >= 2, got {tuple(ac.shape)}")
        if not bool(((ac > 0) & (ac < 1)).all()) or not bool((ac[1:] <= ac[:-1]).all()):
            zero_snr = bool(ac[-1] == 0)
            raise ValueError(
                "`alphas_cumprod` must be non-increasing and inside (0, 1)"
                + (
                    "; its last value is 0, a zero terminal SNR (rescale_betas_zero_snr): "
                    "replace it by a small positive value below the one before it (the audit's "
                    "likelihood check takes min(2**-24, half the one before))"
                    if zero_snr
                    else ""
                )
            )
        prev = torch.cat([ac.new_ones(1), ac[:-1]])
        self.num_train_timesteps = ac.numel()
        self.h = 1.0 / (self.num_train_timesteps - 1)
        self.nodes = self.num_train_timesteps * (1.0 - ac / prev)  # beta(t_i), continuous
        steps = 0.5 * (self.nodes[1:] + self.nodes[:-1]) * self.h
        self.cum = torch.cat([ac.new_zeros(1), torch.cumsum(steps, 0)])  # int_0^{t_i} beta

    def _segment(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Node index, offset into the segment and slope of beta there, for t clamped to [0, 1].

        Clamping holds the schedule at its end values where an adaptive solver's stages step
        slightly past ``t = 1``; a NaN time has no segment and raises.
        """
        t = check_tensor(torch.as_tensor(t), "t", floating=False)
        t = t.detach().to("cpu", torch.float64)
        if not bool(torch.isfinite(t).all()):
            raise ValueError("`t` holds NaN or inf values")
        t = t.clamp(0.0, 1.0)
        k = torch.clamp((t / self.h).floor().long(), max=self.num_train_timesteps - 2)
        u = t - k.to(torch.float64) * self.h  # a long tensor times a float is float32
        return k, u, (self.nodes[k + 1] - self.nodes[k]) / self.h

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        """$\\beta(t)$, float64, same shape as ``t`` (finite; clamped to ``[0, 1]``)."""
        k, u, slope = self._segment(t)
        return self.nodes[k] + slope * u

    def log_alpha_cumprod(self, t: torch.Tensor) -> torch.Tensor:
        """$\\log\\bar\\alpha(t) = -\\int_0^t \\beta(s) ds$, float64."""
        k, u, slope = self._segment(t)
        return -(self.cum[k] + self.nodes[k] * u + 0.5 * slope * u * u)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """$\\sigma(t) = \\sqrt{1 - \\bar\\alpha(t)}$, float64."""
        return torch.sqrt(-torch.expm1(self.log_alpha_cumprod(t)))


def _rademacher(shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    bits = torch.randint(0, 2, shape, generator=generator, dtype=torch.int64)
    return bits.to(torch.float64) * 2 - 1


def _dequantize(
    x: torch.Tensor, lo: float, hi: float, num_bins: int, generator: torch.Generator | None
) -> torch.Tensor:
    levels = torch.round((x.double() - lo) / (hi - lo) * (num_bins - 1)).clamp(0, num_bins - 1)
    u = torch.rand(x.shape, generator=generator, dtype=torch.float64)
    return (lo + (hi - lo) * (levels + u.to(x.device)) / num_bins).to(x.dtype)


def _check_x(x: object) -> torch.Tensor:
    """``(B, *S)`` float32/float64 images with ``B > 0``, non-empty and finite."""
    x = check_tensor(x, "x", dims="(B, *S) with B > 0", min_dim=2)
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(
            f"`x` must be float32 or float64, got {x.dtype}: the ODE solver's tolerances are "
            "below half precision's resolution (wrap a half-precision model as "
            "lambda x, t: model(x.half(), t.half()).float())"
        )
    if x.numel() == 0:
        raise ValueError(f"`x` must be (B, *S) with B > 0 and non-empty S, got {tuple(x.shape)}")
    check_finite_rows(x, "x", "images")
    return x


def _check_solver(
    num_probes: object, rtol: object, atol: object, method: object, t_eps: object
) -> tuple[int, float, float, str, float]:
    return (
        check_int(num_probes, "num_probes", minimum=1),
        check_real(rtol, "rtol", low=0.0, low_open=True),
        check_real(atol, "atol", low=0.0, low_open=True),
        check_choice(method, "method", _ADAPTIVE_METHODS),
        # sigma(0) = 0: the score eps / sigma is undefined at t = 0.
        check_real(t_eps, "t_eps", low=0.0, high=1.0, low_open=True, high_open=True),
    )


def _check_output(out: object, xt: torch.Tensor, t: torch.Tensor, name: str) -> torch.Tensor:
    """The model's output: a finite tensor shaped like ``x_t``, cast to its dtype."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"`{name}` must return a tensor, got {type(out).__name__}")
    if out.shape != xt.shape or out.device != xt.device:
        raise ValueError(
            f"`{name}` must return a tensor of the shape {tuple(xt.shape)} and device "
            f"{xt.device} of its input, got {tuple(out.shape)} on {out.device}"
        )
    if not bool(torch.isfinite(out).all()):
        raise ValueError(
            f"`{name}` returned NaN or inf values at t = {float(t):.4g} (has the model "
            "diverged?): its likelihood cannot be measured"
        )
    return out.to(xt.dtype)


def _solve(
    odeint: Callable, dynamics: Callable, state: tuple, t_span: torch.Tensor, name: str, **kwargs
):
    """``odeint``, with its step-size underflow (a stiff or exploding flow) named."""
    try:
        return odeint(dynamics, state, t_span, **kwargs)
    except AssertionError as err:  # torchdiffeq asserts on a step size that underflows
        if "underflow" not in str(err):
            raise
        raise ValueError(
            f"the probability-flow ODE's step size underflowed: the flow of `{name}` is too "
            "stiff or explodes at these `rtol` / `atol`"
        ) from err


def _ode_log_likelihood(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    name: str,
    drift: Drift,
    timestep_scale: int,
    x: torch.Tensor,
    *,
    num_probes: int,
    rtol: float,
    atol: float,
    method: str,
    t_eps: float,
    generator: torch.Generator | None,
    progress: bool,
) -> torch.Tensor:
    """The integrator behind both entry points: ``(B,)`` float64 $\\log p_{t_\\epsilon}(x)$.

    Solves ``d(x, I)/dt = (f, div f)`` from ``(x, 0)`` at ``t_eps`` to ``t = 1`` with
    ``f = drift(x_t, model(x_t, t * timestep_scale), t)`` and ``div f`` by Hutchinson's
    estimator (probes fixed along the trajectory), then returns
    ``log N(x(1); 0, I) + I(1)``. ``name`` is the model's argument name, for the messages.
    """
    x = _check_x(x)
    num_probes, rtol, atol, method, t_eps = _check_solver(num_probes, rtol, atol, method, t_eps)
    if not callable(model):
        raise TypeError(f"`{name}` must be callable, got {type(model).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"`generator` must be a torch.Generator, got {type(generator).__name__}")
    with needs("the probability-flow likelihood"):
        from torchdiffeq import odeint
    batch, dims = x.shape[0], math.prod(x.shape[1:])
    probes = _rademacher((num_probes, *x.shape), generator).to(x.device, x.dtype)
    bar = None
    if progress:
        with needs("siss.metrics.nll"):
            from tqdm.auto import tqdm

        bar = tqdm(total=1.0 - t_eps, desc="probability-flow ODE")
    reached = [t_eps]

    def dynamics(t: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        xt = state[0].detach()
        # Adaptive solvers evaluate stages slightly past t = 1; the model's timestep (and the
        # VP schedule) are held at their t = 1 values there.
        timesteps = (t.detach().clamp(0.0, 1.0) * timestep_scale).to(x.device, x.dtype)
        with torch.enable_grad():
            xt.requires_grad_(True)
            out = _check_output(model(xt, timesteps.expand(batch)), xt, t, name)
            f = drift(xt, out, t)
            div = torch.zeros(batch, device=x.device, dtype=x.dtype)
            for i, v in enumerate(probes):
                (vjp,) = torch.autograd.grad(f, xt, v, retain_graph=i + 1 < num_probes)
                div = div + (vjp * v).reshape(batch, -1).sum(1)
        if not bool(torch.isfinite(f).all() & torch.isfinite(div).all()):
            # Finite inputs and outputs, yet the flow overflows x's dtype: no likelihood.
            raise ValueError(
                f"the probability-flow drift of `{name}` at `x` overflows {x.dtype} at "
                f"t = {float(t):.4g}"
            )
        if bar is not None and float(t) > reached[0]:
            bar.update(float(t) - reached[0])
            reached[0] = float(t)
        return f.detach(), div.detach() / num_probes

    t_span = torch.tensor([t_eps, 1.0], dtype=x.dtype, device=x.device)
    zero = torch.zeros(batch, dtype=x.dtype, device=x.device)
    try:
        xs, divs = _solve(
            odeint, dynamics, (x.detach(), zero), t_span, name, rtol=rtol, atol=atol, method=method
        )
    finally:
        if bar is not None:
            bar.close()
    x1 = xs[-1].double().reshape(batch, -1)
    logp = -0.5 * dims * math.log(2 * math.pi) - 0.5 * (x1 * x1).sum(1) + divs[-1].double()
    if not bool(torch.isfinite(logp).all()):
        raise ValueError(f"the probability-flow ODE of `{name}` at `x` overflows {x.dtype}")
    return logp


def log_likelihood(
    eps_model: EpsModel,
    x: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    *,
    num_probes: int = 1,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "dopri5",
    t_eps: float = 1e-5,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Log-density $\\log p_{t_\\epsilon}(x)$ in nats by the probability-flow ODE.

    The whole batch is integrated at once (one adaptive solve of the augmented state
    ``(x, divergence integral)``), so the step sizes, and hence the result to within the solver
    tolerance, depend slightly on which images share the batch.

    Args:
        eps_model: ``eps_model(x_t, timesteps) -> eps`` with ``x_t`` like ``x`` and
            ``timesteps`` a ``(B,)`` float tensor of discrete-scale timesteps ``t * (T - 1)``;
            ``eps`` must be a finite tensor of ``x_t``'s shape and device (else ``ValueError``
            naming ``eps_model``). Wrap a diffusers UNet as ``lambda x, t: unet(x, t).sample``
            and put it in eval mode; gradients are taken with respect to ``x_t`` only
            (parameters' ``.grad`` are left untouched).
        x: ``(B, *S)`` finite data points, ``B > 0``, on the model's device and in the dtype to
            integrate in: float64 for reference values, float32 for a UNet. Integer and
            half-precision tensors raise ``TypeError``; NaN or inf images raise ``ValueError``
            with their count.
        alphas_cumprod: ``(T,)`` the model's discrete schedule, e.g.
            ``DDPMScheduler.alphas_cumprod`` (read, never modified).
        num_probes: Rademacher probes per image, an int ``>= 1``; the divergence is their mean.
        rtol: relative tolerance of the ODE solver, ``> 0`` (Song et al. and the paper: 1e-5).
        atol: absolute tolerance of the ODE solver, ``> 0``.
        method: an adaptive ``torchdiffeq.odeint`` method: ``"dopri5"`` (RK45, as scipy's in
            the paper), ``"dopri8"``, ``"bosh3"``, ``"fehlberg2"`` or ``"adaptive_heun"``.
        t_eps: start of the integration, in ``(0, 1)``; the density is that of
            $x(t_\\epsilon)$.
        generator: random source of the probes (drawn on the CPU, once per call).
        progress: show a tqdm bar of the integration time reached.

    Returns:
        ``(B,)`` float64 finite log-likelihoods in nats.

    Examples:
        >>> betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
        >>> ac = torch.cumprod(1 - betas, 0)
        >>> def eps_model(x, t):  # exact eps of N(0, I) data: x_t ~ N(0, I) at every t
        ...     return VPSchedule(ac).sigma(t[:1] / 999).to(x.dtype) * x
        >>> x = torch.zeros(1, 4, dtype=torch.float64)  # log N(0; 0, I_4) = -2 log(2 pi)
        >>> nats = log_likelihood(eps_model, x, ac)
        >>> nats
        tensor([-3.6758], dtype=torch.float64)
        >>> abs(nats.item() + 2 * math.log(2 * math.pi)) < 1e-4
        True
    """
    schedule = VPSchedule(alphas_cumprod)

    def drift(xt: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        beta = schedule.beta(t).to(xt.device, xt.dtype)
        sigma = schedule.sigma(t).to(xt.device, xt.dtype)
        return -0.5 * beta * (xt - eps / sigma)

    return _ode_log_likelihood(
        eps_model,
        "eps_model",
        drift,
        schedule.num_train_timesteps - 1,
        x,
        num_probes=num_probes,
        rtol=rtol,
        atol=atol,
        method=method,
        t_eps=t_eps,
        generator=generator,
        progress=progress,
    )


def _velocity(xt: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The rectified-flow drift: the model's velocity itself."""
    return v


def flow_log_likelihood(
    velocity_model: VelocityModel,
    x: torch.Tensor,
    *,
    num_train_timesteps: int = 1000,
    num_probes: int = 1,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "dopri5",
    t_eps: float = 1e-5,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Log-density $\\log p_{s_\\epsilon}(x)$ in nats under a rectified-flow (flow-matching) model.

    The probability-flow ODE is $dx/ds = v_\\theta(x, s)$, integrated by the same integrator as
    ``log_likelihood`` (see the module docstring) with the model's velocity as the drift: the two
    differ only in how the model's output becomes ``dx/ds``.

    Args:
        velocity_model: ``velocity_model(x_s, timesteps) -> v`` the velocity ``eps - x_0`` at
            ``x_s = (1 - s) x_0 + s eps``, with ``x_s`` like ``x`` and ``timesteps`` a ``(B,)``
            float tensor ``s * num_train_timesteps``; ``v`` must be a finite tensor of
            ``x_s``'s shape and device (else ``ValueError`` naming ``velocity_model``). Wrap a
            diffusers UNet as ``lambda x, t: unet(x, t).sample``; gradients are taken with
            respect to ``x_s`` only.
        x: ``(B, *S)`` finite float32/float64 data points, ``B > 0``, on the model's device
            and in the dtype to integrate in (as in ``log_likelihood``).
        num_train_timesteps: ``T``, the model's timestep scale (an int ``>= 1``; the
            scheduler's ``config.num_train_timesteps``).
        num_probes: Rademacher probes per image, an int ``>= 1``; the divergence is their mean.
        rtol: relative tolerance of the ODE solver, ``> 0``.
        atol: absolute tolerance of the ODE solver, ``> 0``.
        method: an adaptive ``torchdiffeq.odeint`` method, see ``log_likelihood``.
        t_eps: start of the integration $s_\\epsilon$, in ``(0, 1)``; the density is that of
            $x_{s_\\epsilon}$.
        generator: random source of the probes (drawn on the CPU, once per call).
        progress: show a tqdm bar of the integration time reached.

    Returns:
        ``(B,)`` float64 finite log-likelihoods in nats.

    Examples:
        >>> def velocity_model(x, t):  # exact velocity of N(0, I) data
        ...     s = t[:1] / 1000
        ...     return (2 * s - 1) / ((1 - s) ** 2 + s**2) * x
        >>> x = torch.zeros(1, 4, dtype=torch.float64)
        >>> nats = flow_log_likelihood(velocity_model, x, t_eps=1e-3)
        >>> var = (1 - 1e-3) ** 2 + 1e-3**2  # x_{s_eps} ~ N(0, var I): log N(0; 0, var I_4)
        >>> bool(abs(nats.item() + 2 * math.log(2 * math.pi * var)) < 1e-3)  # solver's error
        True
    """
    steps = check_int(num_train_timesteps, "num_train_timesteps", minimum=1)
    return _ode_log_likelihood(
        velocity_model,
        "velocity_model",
        _velocity,
        steps,
        x,
        num_probes=num_probes,
        rtol=rtol,
        atol=atol,
        method=method,
        t_eps=t_eps,
        generator=generator,
        progress=progress,
    )


def _check_range(data_range: object) -> tuple[float, float]:
    if not isinstance(data_range, Sequence):
        raise TypeError(f"`data_range` must be a pair (lo, hi), got {type(data_range).__name__}")
    if len(data_range) != 2:
        raise ValueError(f"`data_range` must be a pair (lo, hi), got {data_range!r}")
    lo = check_real(data_range[0], "data_range")
    hi = check_real(data_range[1], "data_range")
    if not hi > lo:
        raise ValueError(f"`data_range` must be (lo, hi) with hi > lo, got {data_range!r}")
    return lo, hi


def _to_bits_per_dim(
    log_likelihood_of: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    data_range: tuple[float, float],
    num_bins: int | None,
    dequantize: bool,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """``-log_likelihood_of(x) / (D ln 2) + log2(num_bins / (hi - lo))`` (module docstring),
    ``x`` first replaced by its uniform dequantization when ``dequantize``."""
    x = _check_x(x)
    lo, hi = _check_range(data_range)
    if num_bins is not None:
        num_bins = check_int(num_bins, "num_bins", minimum=2)
    if dequantize:
        if num_bins is None:
            raise ValueError("`dequantize`=True needs `num_bins`")
        x = _dequantize(x, lo, hi, num_bins, generator)
    logp = log_likelihood_of(x)
    dims = math.prod(x.shape[1:])
    offset = 0.0 if num_bins is None else math.log2(num_bins / (hi - lo))
    return -logp / (dims * math.log(2)) + offset


def bits_per_dim(
    eps_model: EpsModel,
    x: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    *,
    num_probes: int = 1,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "dopri5",
    t_eps: float = 1e-5,
    data_range: tuple[float, float] = (-1.0, 1.0),
    num_bins: int | None = 256,
    dequantize: bool = False,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Negative log-likelihood in bits per dimension (Song et al. 2021, appendix D.2).

    Computes ``log_likelihood`` and converts it as
    ``-log p / (D ln 2) + log2(num_bins / (hi - lo))`` with ``D`` values per image (the offset
    is 7 for ``[-1, 1]`` and 256 levels, as in Song et al.'s code; 0 with ``num_bins=None``).

    Args:
        eps_model: noise-prediction callable, see ``log_likelihood``.
        x: ``(B, *S)`` finite float32/float64 images in ``data_range`` (8-bit images must be
            scaled first: integer tensors raise ``TypeError``).
        alphas_cumprod: ``(T,)`` the discrete schedule.
        num_probes: Rademacher probes per image.
        rtol: relative tolerance of the ODE solver.
        atol: absolute tolerance of the ODE solver.
        method: an adaptive ``torchdiffeq.odeint`` method, see ``log_likelihood``.
        t_eps: start of the integration, in ``(0, 1)``.
        data_range: ``(lo, hi)`` finite, ``hi > lo``: the range the model's data was scaled to.
        num_bins: intensity levels of the original data (an int ``>= 2``, 256 for 8-bit), or
            ``None`` for continuous bits/dim with no offset.
        dequantize: replace ``x`` by Song et al.'s uniform dequantization of its level first
            (needs ``num_bins``).
        generator: random source of the probes and the dequantization noise.
        progress: show a tqdm bar.

    Returns:
        ``(B,)`` float64 finite bits per dimension. What cannot be measured (see the module
        docstring) raises ``ValueError`` / ``TypeError`` naming the argument.

    Examples:
        >>> import torch
        >>> betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
        >>> ac = torch.cumprod(1 - betas, 0)
        >>> def eps_model(x, t):  # exact eps of N(0, I) data: x_t ~ N(0, I) at every t
        ...     sigma = VPSchedule(ac).sigma(t[:1] / 999).to(x.dtype)
        ...     return sigma * x
        >>> x = torch.zeros(2, 1, 2, 2, dtype=torch.float64)
        >>> bpd = bits_per_dim(eps_model, x, ac, num_bins=None)
        >>> bool((bpd - 0.5 * math.log2(2 * math.pi)).abs().max() < 1e-4)
        True
    """
    solver = {
        "num_probes": num_probes,
        "rtol": rtol,
        "atol": atol,
        "method": method,
        "t_eps": t_eps,
        "generator": generator,
        "progress": progress,
    }
    return _to_bits_per_dim(
        lambda x: log_likelihood(eps_model, x, alphas_cumprod, **solver),
        x,
        data_range,
        num_bins,
        dequantize,
        generator,
    )


def flow_bits_per_dim(
    velocity_model: VelocityModel,
    x: torch.Tensor,
    *,
    num_train_timesteps: int = 1000,
    num_probes: int = 1,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "dopri5",
    t_eps: float = 1e-5,
    data_range: tuple[float, float] = (-1.0, 1.0),
    num_bins: int | None = 256,
    dequantize: bool = False,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Negative log-likelihood in bits per dimension under a rectified-flow model.

    Computes ``flow_log_likelihood`` and converts it as ``bits_per_dim`` does,
    ``-log p / (D ln 2) + log2(num_bins / (hi - lo))`` (7 for ``[-1, 1]`` and 256 levels; 0
    with ``num_bins=None``). A flow model's bits/dim and a VP model's come from different ODEs:
    compare them within a process only.

    Args:
        velocity_model: velocity-prediction callable, see ``flow_log_likelihood``.
        x: ``(B, *S)`` finite float32/float64 images in ``data_range``.
        num_train_timesteps: ``T``, the model's timestep scale.
        num_probes: Rademacher probes per image.
        rtol: relative tolerance of the ODE solver.
        atol: absolute tolerance of the ODE solver.
        method: an adaptive ``torchdiffeq.odeint`` method, see ``log_likelihood``.
        t_eps: start of the integration, in ``(0, 1)``.
        data_range: ``(lo, hi)`` finite, ``hi > lo``: the range the model's data was scaled to.
        num_bins: intensity levels of the original data (an int ``>= 2``, 256 for 8-bit), or
            ``None`` for continuous bits/dim with no offset.
        dequantize: replace ``x`` by Song et al.'s uniform dequantization of its level first
            (needs ``num_bins``).
        generator: random source of the probes and the dequantization noise.
        progress: show a tqdm bar.

    Returns:
        ``(B,)`` float64 finite bits per dimension. What cannot be measured (see the module
        docstring) raises ``ValueError`` / ``TypeError`` naming the argument.

    Examples:
        >>> def velocity_model(x, t):  # exact velocity of N(0, I) data
        ...     s = t[:1] / 1000
        ...     return (2 * s - 1) / ((1 - s) ** 2 + s**2) * x
        >>> x = torch.zeros(2, 1, 2, 2, dtype=torch.float64)
        >>> bpd = flow_bits_per_dim(velocity_model, x, num_bins=None, t_eps=1e-3)
        >>> var = (1 - 1e-3) ** 2 + 1e-3**2
        >>> bool((bpd - 0.5 * math.log2(2 * math.pi * var)).abs().max() < 1e-3)
        True
    """
    solver = {
        "num_probes": num_probes,
        "rtol": rtol,
        "atol": atol,
        "method": method,
        "t_eps": t_eps,
        "generator": generator,
        "progress": progress,
    }
    return _to_bits_per_dim(
        lambda x: flow_log_likelihood(
            velocity_model, x, num_train_timesteps=num_train_timesteps, **solver
        ),
        x,
        data_range,
        num_bins,
        dequantize,
        generator,
    )
