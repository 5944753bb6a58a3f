"""Likelihood check: is a forget image's exact NLL unusually low among non-members?

Per forget image the check computes its negative log-likelihood in bits/dim along the
probability-flow ODE and places it among the NLLs of reference images the model never trained on.

* VP schedules (DDPM, DDIM, ...): ``siss.metrics.bits_per_dim`` (Song et al. 2021; the model's
  prediction is converted to eps with the scheduler's ``prediction_type``).
* Flow matching (``FlowMatchEulerDiscreteScheduler``): ``siss.metrics.flow_bits_per_dim``, the
  rectified-flow ODE ``dx/ds = v(x, s)`` with the model's velocity ``v`` (its input timestep is
  ``s * T``, the diffusers convention whatever the ``shift``).

Both go through the one probability-flow ODE integrator of ``siss.metrics.nll`` (Hutchinson's
divergence estimator, torchdiffeq's adaptive solvers; the equations are in its docstring), with
the same bits/dim convention (offset ``log2(256 / (hi - lo))``, 7 for ``[-1, 1]``).
``flow_log_likelihood`` and ``flow_bits_per_dim`` are re-exported here from ``siss.metrics``.

Statistics per forget image:

* ``"nll_bpd"`` (``held_when="lower"``): the mean of ``repeats`` independent Hutchinson estimates;
  its interval is the Student-t interval over those estimates (the Hutchinson noise only; the ODE
  solver's error, of order ``rtol``, is not in it). One repeat gives no interval (NaN, said so).
* ``"percentile"`` (``held_when="lower"``): the fraction ``k / R`` of the ``R`` reference NLLs at
  or below the forget image's (ties count against "held"). ``k ~ Binomial(R, F(nll))`` with ``F``
  the non-members' NLL distribution, so its exact Clopper-Pearson interval is a confidence
  interval for ``F(nll)``: where the image sits among non-members.

Verdict, with ``p = percentile`` (default 5%): ``held`` when the percentile's upper confidence
bound is below ``p`` (the image's NLL is, at the stated confidence, below the non-members'
``p``-quantile); overshot, the mirror tail, when the share of reference NLLs at or above the
image's has its upper bound below ``p`` (the image is less likely than almost all non-members:
an auditor can tell it was treated specially); not held when the percentile's lower bound is above
``p`` without reaching "overshot"; undecided (``held = None``) when the interval contains
``p``: a reference set too small to tell (with no reference image at or below, ``R`` must be
at least 72 at 5%, the same for "overshot") or an image at the boundary.

A model whose ODE produces NaN or inf (a diverged model) gives status ``"non-finite"`` and
``held = None``: never "not held".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from siss.audit._inputs import (
    check_conditioning,
    check_fraction,
    check_generator,
    check_images,
    check_int,
    check_range,
)
from siss.audit._models import (
    check_model_device,
    eval_mode,
    progress_bar,
    scheduler_kind,
)
from siss.audit._stats import rank_against_reference, t_interval
from siss.audit.report import CheckResult, Estimate, held_of
from siss.audit.sampling import prediction_fn
from siss.metrics.nll import (
    VPSchedule,
    _check_solver,
    bits_per_dim,
    flow_bits_per_dim,
    flow_log_likelihood,
)
from siss.targets import eps_from_prediction

__all__ = [
    "flow_bits_per_dim",
    "flow_log_likelihood",
    "likelihood_check",
    "rank_against_reference",
]

_DIVERGED = ("NaN or inf", "overflow", "underflow")
ZERO_SNR_ALPHA_CUMPROD = 2.0**-24
"""The last ``alphas_cumprod`` of a zero-terminal-SNR schedule in the likelihood ODE, whose
continuous VP-SDE needs it inside (0, 1): diffusers' Euler sampler's value for such schedules, or
half the one before it where that is smaller (diffusers' own rescaled 1000-step linear schedule
has 4.2e-9 there), so that the schedule stays decreasing; the prior term then differs from the
standard normal's by that value times ``||x||^2``."""


def _check_ode_images(x: object, name: str, rows: int = 1) -> Tensor:
    """Images for the ODE, which runs in their dtype: float32 or float64."""
    x = check_images(x, name, rows=rows)
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"`{name}` must be float32 or float64, got {x.dtype}")
    return x


def _nll_function(
    model: object, scheduler: Any, conditioning: dict[str, Any], options: dict[str, Any]
) -> tuple[Callable[[Tensor, torch.Generator | None], Tensor], str]:
    """``nll(x, generator) -> (B,)`` bits/dim for the scheduler's kind, and a description."""
    predict = prediction_fn(
        model, conditioning, None if isinstance(scheduler, Tensor) else scheduler
    )
    if isinstance(scheduler, Tensor):
        alphas_cumprod, prediction_type, kind = scheduler.detach(), "epsilon", "vp"
    else:
        kind, prediction_type = scheduler_kind(scheduler)
        alphas_cumprod = None
        if kind == "vp":
            betas = scheduler.betas.detach().to("cpu", torch.float64)
            alphas_cumprod = torch.cumprod(1 - betas, 0)
    if kind == "flow":
        steps = int(scheduler.config.num_train_timesteps)

        def flow_nll(x: Tensor, generator: torch.Generator | None) -> Tensor:
            return flow_bits_per_dim(
                predict, x, num_train_timesteps=steps, generator=generator, **options
            )

        return flow_nll, "flow-matching probability-flow ODE (Hutchinson, torchdiffeq)"

    described = "VP probability-flow ODE (siss.metrics.bits_per_dim)"
    if alphas_cumprod[-1] == 0:  # a zero terminal SNR (rescale_betas_zero_snr)
        alphas_cumprod = alphas_cumprod.clone()
        last = min(ZERO_SNR_ALPHA_CUMPROD, float(alphas_cumprod[-2]) / 2)
        alphas_cumprod[-1] = last
        described += f"; the zero terminal SNR's last alphas_cumprod taken as {last:.3g}"
    vp = VPSchedule(alphas_cumprod)
    scale = vp.num_train_timesteps - 1

    def eps_model(x: Tensor, timesteps: Tensor) -> Tensor:
        prediction = predict(x, timesteps)
        if prediction_type == "epsilon":
            return prediction
        t = timesteps[:1].detach() / scale
        gamma = torch.exp(0.5 * vp.log_alpha_cumprod(t)).to(x.device, x.dtype)
        sigma = vp.sigma(t).to(x.device, x.dtype)
        return eps_from_prediction(prediction, x, gamma, sigma, prediction_type).to(x.dtype)

    def vp_nll(x: Tensor, generator: torch.Generator | None) -> Tensor:
        return bits_per_dim(eps_model, x, alphas_cumprod, generator=generator, **options)

    return vp_nll, described


def likelihood_check(
    model: object,
    scheduler: Any,
    forget: Tensor,
    reference: Tensor | None,
    *,
    conditioning: Mapping[str, Any] | None = None,
    percentile: float = 0.05,
    confidence: float = 0.95,
    repeats: int = 4,
    num_probes: int = 1,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "dopri5",
    t_eps: float = 1e-5,
    data_range: tuple[float, float] = (-1.0, 1.0),
    num_bins: int | None = 256,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> list[CheckResult]:
    """Per forget image: its exact NLL (bits/dim) and its percentile among non-members' NLLs.

    Args:
        model: a diffusers model or a callable ``model(x_t, timesteps) -> prediction`` in the
            scheduler's ``prediction_type`` (see ``siss.audit.sampling.prediction_fn``);
            gradients are taken with respect to the input only.
        scheduler: the model's diffusers scheduler (VP or ``FlowMatchEulerDiscreteScheduler``),
            or a ``(T,)`` ``alphas_cumprod`` tensor for an eps-prediction model.
        forget: ``(M, *S)`` finite float32/float64 images in ``data_range`` (the ODE runs in
            their dtype: float64 for reference values, float32 for a UNet), on the model's
            device.
        reference: ``(R, *S)`` comparable non-member images, or ``None`` / ``R = 0`` (the
            percentile is then not measured, with the reason).
        conditioning: one conditioning shared by every image (1-row tensors), e.g. a prompt.
        percentile: ``p`` of the verdict (see the module docstring), in ``(0, 1)``.
        confidence: level of every interval.
        repeats: independent Hutchinson estimates of each forget image's NLL (``>= 1``; their
            spread gives the NLL's interval). Reference images get one estimate each.
        num_probes, rtol, atol, method, t_eps: the ODE solve, as in
            ``siss.metrics.bits_per_dim``.
        data_range, num_bins: the bits/dim convention, as in ``siss.metrics.bits_per_dim``.
        batch_size: images per ODE solve (the solve's step sizes depend slightly on the batch).
        generator: source of the Hutchinson probes.
        progress: a tqdm bar over the images.

    Returns:
        One ``CheckResult("likelihood", i, {"nll_bpd", "percentile"}, held, reason, details)``
        per forget image; ``details`` holds the reference NLLs' quantile and the repeats.

    Raises:
        ValueError, TypeError: naming the argument, before any ODE is solved.
    """
    forget = _check_ode_images(forget, "forget")
    if reference is not None:
        reference = _check_ode_images(reference, "reference", rows=0)
        if reference.shape[1:] != forget.shape[1:]:
            raise ValueError(
                f"`reference` images {tuple(reference.shape[1:])} and `forget` "
                f"{tuple(forget.shape[1:])} differ in shape"
            )
        if reference.dtype != forget.dtype or reference.device != forget.device:
            raise ValueError("`reference` must have the dtype and device of `forget`")
    percentile = check_fraction(percentile, "percentile")
    confidence = check_fraction(confidence, "confidence")
    repeats = check_int(repeats, "repeats")
    batch_size = check_int(batch_size, "batch_size")
    # The integrator's own checks, here before any solve.
    num_probes, rtol, atol, method, t_eps = _check_solver(num_probes, rtol, atol, method, t_eps)
    check_range(data_range)
    check_generator(generator)
    check_model_device(model, forget, "forget")
    options = {
        "num_probes": num_probes,
        "rtol": rtol,
        "atol": atol,
        "method": method,
        "t_eps": t_eps,
        "data_range": data_range,
        "num_bins": num_bins,
    }
    conditioning = check_conditioning(conditioning, "conditioning", rows=None)
    nll, how = _nll_function(model, scheduler, conditioning, options)

    num_forget = forget.shape[0]
    images = forget.repeat_interleave(repeats, dim=0)
    if reference is not None and len(reference):
        images = torch.cat([images, reference])
    values = torch.full((images.shape[0],), math.nan, dtype=torch.float64)
    failures: list[str] = []

    with eval_mode(model), progress_bar(images.shape[0], "NLL (ODE solves)", progress) as bar:
        for start in range(0, images.shape[0], batch_size):
            batch = images[start : start + batch_size]
            try:
                values[start : start + len(batch)] = nll(batch, generator).cpu()
            except ValueError as err:
                if not any(word in str(err) for word in _DIVERGED):
                    raise
                failures.append(str(err))  # a diverged model: these rows stay NaN
            bar.update(len(batch))

    forget_values = values[: num_forget * repeats].reshape(num_forget, repeats)
    reference_values = values[num_forget * repeats :]
    results = []
    for i in range(num_forget):
        runs = forget_values[i]
        details: dict[str, Any] = {
            "repeats": runs.tolist(),
            "method": how,
            "reference_values": (
                [float(v) for v in reference_values.tolist()] if reference is not None else []
            ),
        }
        if not bool(torch.isfinite(runs).all()):
            why = "the probability-flow ODE gave NaN or inf (a diverged model?)"
            if failures:
                why += f": {failures[0]}"
            results.append(
                CheckResult(
                    "likelihood",
                    i,
                    {
                        "nll_bpd": Estimate.missing(why, "lower", n=repeats, status="non-finite"),
                        "percentile": Estimate.missing(why, "lower", status="non-finite"),
                    },
                    None,
                    f"undecided: {why}",
                    details,
                )
            )
            continue
        mean, low, high = t_interval(runs, confidence)
        if repeats > 1:
            note = (
                f"mean of {repeats} Hutchinson estimates ({how}); Student-t interval of the "
                f"Hutchinson noise (ODE tolerance rtol={rtol:g} not included)"
            )
        else:
            note = f"one Hutchinson estimate ({how}): no interval (set repeats >= 2)"
        estimate = Estimate(mean, low, high, repeats, "lower", note=note, confidence=confidence)
        rank, verdict, reason, more = rank_against_reference(
            mean,
            reference_values if reference is not None else None,
            held_when="lower",
            percentile=percentile,
            confidence=confidence,
            statistic="NLL",
        )
        details.update(more)
        results.append(
            CheckResult(
                "likelihood",
                i,
                {"nll_bpd": estimate, "percentile": rank},
                held_of(verdict),
                reason,
                details,
                verdict,
            )
        )
    return results
