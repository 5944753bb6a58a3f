"""Membership inference against a diffusion model: is a forget image scored like a training image?

Two published loss-based attacks, both "lower error = more member-like":

* **Denoising loss** (Carlini et al., 2023, "Extracting Training Data from Diffusion Models",
  Sec. 6: the loss-threshold attack and its finding that small ``t`` separates members best)::

      L(x_0) = mean_{t, k} ||eps_k - eps_theta(gamma_t x_0 + sigma_t eps_k, t)||^2 / D

  over the given small ``t`` and ``k = 1 .. noise_draws`` draws ``eps_k ~ N(0, I)``, ``D`` values
  per image (``denoising_errors``).
* **PIA** (Kong et al., ICLR 2024, "An Efficient Membership Inference Attack for the Diffusion
  Model by Proximal Initialization"; matched against ``kong13661/PIA``, ``DDPM/components.py``
  class ``PIA``: ``eps_0 = eps_theta(x_0, 0)``, ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps_0``,
  distance ``sum |eps_0 - eps_theta(x_t, t)|^4``)::

      PIA(x_0) = mean_d |eps_0 - eps_theta(gamma_t x_0 + sigma_t eps_0, t)|_d^p,   p = 4

  deterministic, two model calls per image (``pia_errors``; here averaged over ``D`` instead
  of summed, which changes no ranking).

``membership_check`` scores the forget images against a reference set of comparable images
the model never trained on (non-members): each forget image's percentile among the reference
scores, and, over members versus non-members, the AUC and the TPR at a low FPR, the two numbers
the membership-inference literature reports (PIA's ``attack.py`` computes them with torchmetrics'
``BinaryAUROC`` / ``BinaryROC``, as here).

Models: ``eps_model`` is a diffusers model (called through ``siss.adapters.adapter_for(model)
.predict(noisy, timesteps, **conditioning)``), a ``siss.adapters.ModelAdapter``, or any callable
``(x_t (B, ...), t (B,), **conditioning) -> prediction (B, ...)``. Its prediction is turned into a
noise prediction with the schedule (``prediction_type``, see ``eps_from_prediction``), so
v-prediction, x0-prediction and flow-matching models are scored on the same epsilon scale.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from numbers import Integral, Real
from typing import Any, Literal

import torch
from torch import Tensor

from siss import _random
from siss._optional import needs
from siss.audit._inputs import (
    check_conditioning,
    check_fraction,
    check_generator,
    check_images,
    check_int,
    shared,
    take_rows,
)
from siss.audit._models import (
    eval_mode,
    predictor,
    progress_bar,
    resolve_schedule,
)
from siss.audit._stats import at_or_above, conformal_verdict, percentile_among, t_interval
from siss.audit.report import CheckResult, Estimate, Verdict, held_of
from siss.schedule import NoiseSchedule  # noqa: F401  (the doctests' namespace)
from siss.targets import eps_from_prediction

__all__ = [
    "denoising_errors",
    "eps_from_prediction",
    "membership_check",
    "pia_errors",
    "tpr_at_fpr",
]

# Carlini et al. (2023) found the loss attack strongest at small t (t = 50 .. 300 of 1000 on
# CIFAR-10 DDPMs); the defaults take two small noise levels and several noise draws. They are
# noise ranks on a 1000-step grid, the same fraction of a grid of another length
# (``_small_noise_indices``), as the reconstruction checks' t are.
DEFAULT_TIMESTEPS: tuple[int, int] = (50, 100)
DEFAULT_PIA_TIMESTEP = 200


MIN_BOOTSTRAP = 100
"""The fewest bootstrap resamples ``membership_check`` takes for its AUC interval."""


def _small_noise_indices(sigma: Tensor, ranks: Sequence[int]) -> list[int]:
    """Grid indices of the entries at noise ``ranks`` of a 1000-step grid, the least noisy
    first: rank ``r`` is position ``round(r T / 1000)`` in order of noise, so index ``r`` on a
    1000-step DDPM grid, ``T - 1 - r`` on diffusers' descending flow-matching grid, and the same
    fraction of the way on a grid of another length (at ``T = 100``, ranks 50 and 100 were
    clamped to the noisiest index, 99, and became one)."""
    order = torch.sort(sigma.cpu(), stable=True).indices
    length = len(order)
    return [int(order[min(round(r * length / 1000), length - 1)]) for r in ranks]


def _check_timesteps(timesteps: object, length: int, name: str) -> list[int]:
    values = [timesteps] if isinstance(timesteps, Integral) else timesteps
    if isinstance(values, Tensor):
        values = values.tolist()
    if isinstance(values, bool) or not isinstance(values, Sequence) or len(values) == 0:
        raise TypeError(f"`{name}` must be a non-empty sequence of grid indices (ints)")
    checked = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, Integral):
            raise TypeError(f"`{name}` must hold ints (grid indices), got {value!r}")
        if not 0 <= value < length:
            raise ValueError(f"`{name}` must lie in [0, {length - 1}], got {value}")
        checked.append(int(value))
    return checked


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def _denoising_error_draws(
    eps_model: object,
    schedule: object,
    images: Tensor,
    *,
    timesteps: Sequence[int] | None,
    noise_draws: int,
    generator: torch.Generator | None,
    batch_size: int,
    conditioning: Mapping[str, Any] | None,
    prediction_type: str | None,
    progress: bool,
    name: str = "images",
) -> Tensor:
    """Per-draw errors ``(N, K * M)`` (``K`` timesteps, ``M`` draws each), float64."""
    images = check_images(images, name)
    noise_draws = check_int(noise_draws, "noise_draws")
    batch_size = check_int(batch_size, "batch_size")
    generator = check_generator(generator)
    conditioning = check_conditioning(conditioning, "conditioning", images.shape[0])
    predict = predictor(eps_model, "eps_model")
    sched = resolve_schedule(schedule, prediction_type, images.device)
    length = len(sched.gamma)
    if timesteps is None:
        grid = _small_noise_indices(sched.sigma, DEFAULT_TIMESTEPS)
    else:
        grid = _check_timesteps(timesteps, length, "timesteps")
    n, k, m = images.shape[0], len(grid), noise_draws
    grid_t = torch.tensor(grid, device=images.device)
    rows = n * k * m
    errors = torch.empty(rows, dtype=torch.float64, device=images.device)
    with eval_mode(eps_model), progress_bar(rows, "denoising errors", progress) as bar:
        for start in range(0, rows, batch_size):
            row = torch.arange(start, min(start + batch_size, rows), device=images.device)
            image, index = row // (k * m), grid_t[(row // m) % k]
            clean = images[image]
            noise = _random.randn(
                tuple(clean.shape), generator=generator, device=images.device, dtype=images.dtype
            )
            gamma, sigma = sched.gamma[index], sched.sigma[index]
            shape = (-1,) + (1,) * (clean.ndim - 1)
            noisy = (gamma.reshape(shape) * clean + sigma.reshape(shape) * noise).to(images.dtype)
            output = predict(noisy, sched.timesteps[index], **take_rows(conditioning, image))
            eps_hat = eps_from_prediction(output, noisy, gamma, sigma, sched.prediction_type)
            errors[row] = (
                (noise.to(torch.float64) - eps_hat.to(torch.float64)).square().flatten(1).mean(1)
            )
            bar.update(len(row))
    return errors.reshape(n, k * m)


def denoising_errors(
    eps_model: object,
    schedule: object,
    images: Tensor,
    *,
    timesteps: Sequence[int] | None = None,
    noise_draws: int = 8,
    generator: torch.Generator | None = None,
    batch_size: int = 64,
    conditioning: Mapping[str, Any] | None = None,
    prediction_type: str | None = None,
    progress: bool = False,
) -> Tensor:
    """Carlini et al.'s (2023) loss-based membership score: the denoising error at small ``t``.

    $$
    L(x_0) = \\frac{1}{K M} \\sum_{t \\in \\text{timesteps}} \\sum_{k=1}^{M}
    \\frac{1}{D} \\lVert \\epsilon_k - \\hat\\epsilon_\\theta(\\gamma_t x_0 + \\sigma_t
    \\epsilon_k, t) \\rVert^2, \\quad \\epsilon_k \\sim N(0, I)
    $$

    Lower is more member-like (training images are denoised better). Batched: the ``N * K * M``
    noisy rows go through the model ``batch_size`` rows at a time.

    Args:
        eps_model: a diffusers model (through ``siss.adapters.adapter_for``), a
            ``ModelAdapter``, or a callable ``(x_t (B, ...), t (B,), **conditioning) -> (B, ...)``.
        schedule: a ``siss.NoiseSchedule`` or a diffusers scheduler (read with
            ``siss.adapters.schedule_from_scheduler``; not modified).
        images: clean images (or latents) ``(N, ...)``, in the model's input range.
        timesteps: grid indices of the schedule (``K`` of them). ``None``: the 50th and 100th
            least noisy grid entries, i.e. ``(50, 100)`` on a 1000-step DDPM grid and
            ``(949, 899)`` on diffusers' descending flow-matching grid.
        noise_draws: ``M``, noise draws per image and timestep.
        generator: source of the noise; the draw depends on ``batch_size`` too.
        batch_size: rows per model call.
        conditioning: model keyword inputs (e.g. ``{"encoder_hidden_states": embeds}``,
            ``{"class_labels": labels}``), each with ``N`` rows or 1 (shared).
        prediction_type: what the model predicts; ``None`` reads it from a diffusers scheduler
            (``"epsilon"`` for a ``NoiseSchedule``). Converted with ``eps_from_prediction``.
        progress: show a tqdm bar.

    Returns:
        ``(N,)`` float64 on the images' device; NaN for an image the model returned NaN on.

    Examples:
        >>> schedule = NoiseSchedule.from_alphas_cumprod(
        ...     torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0))
        >>> exact_for_zeros = lambda x_t, t: x_t / schedule.sigma[t].view(-1, 1, 1, 1)
        >>> errors = denoising_errors(exact_for_zeros, schedule, torch.zeros(2, 1, 4, 4))
        >>> errors.shape, bool(errors.max() < 1e-10)
        (torch.Size([2]), True)
    """
    draws = _denoising_error_draws(
        eps_model,
        schedule,
        images,
        timesteps=timesteps,
        noise_draws=noise_draws,
        generator=generator,
        batch_size=batch_size,
        conditioning=conditioning,
        prediction_type=prediction_type,
        progress=progress,
    )
    return draws.mean(1)


@torch.no_grad()
def pia_errors(
    eps_model: object,
    schedule: object,
    images: Tensor,
    *,
    timestep: int | None = None,
    p: float = 4.0,
    batch_size: int = 64,
    conditioning: Mapping[str, Any] | None = None,
    prediction_type: str | None = None,
    progress: bool = False,
) -> Tensor:
    """PIA's t-error (Kong et al., ICLR 2024): a deterministic, proximally initialised loss.

    $$
    \\epsilon_0 = \\hat\\epsilon_\\theta(x_0, t_0), \\quad
    \\text{PIA}(x_0) = \\frac{1}{D} \\sum_d \\lvert \\epsilon_0 - \\hat\\epsilon_\\theta(
    \\gamma_t x_0 + \\sigma_t \\epsilon_0, t) \\rvert_d^{p}
    $$

    with ``t_0`` the least noisy grid entry (``t = 0`` on a DDPM grid) and ``p = 4`` as in the
    reference code (``kong13661/PIA``, class ``PIA``, ``lp=4``; it sums over ``d``, we average,
    which ranks identically). Lower is more member-like. Two model calls per image, no noise.

    Args:
        eps_model, schedule, images, batch_size, conditioning, prediction_type, progress: as in
            ``denoising_errors``.
        timestep: grid index ``t``; ``None``: the 200th least noisy grid entry (``t = 200`` on
            a 1000-step DDPM grid, inside the range ``10 .. 300`` PIA's reference code scans).
        p: the exponent of the distance.

    Returns:
        ``(N,)`` float64.

    Examples:
        >>> schedule = NoiseSchedule.from_alphas_cumprod(
        ...     torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0))
        >>> pia_errors(lambda x_t, t: torch.zeros_like(x_t), schedule, torch.ones(3, 2))
        tensor([0., 0., 0.], dtype=torch.float64)
    """
    images = check_images(images, "images")
    batch_size = check_int(batch_size, "batch_size")
    if isinstance(p, bool) or not isinstance(p, Real) or not float(p) > 0:
        raise ValueError(f"`p` must be a positive number, got {p!r}")
    conditioning = check_conditioning(conditioning, "conditioning", images.shape[0])
    predict = predictor(eps_model, "eps_model")
    sched = resolve_schedule(schedule, prediction_type, images.device)
    first = _small_noise_indices(sched.sigma, (0,))[0]
    if timestep is None:
        index = _small_noise_indices(sched.sigma, (DEFAULT_PIA_TIMESTEP,))[0]
    else:
        index = _check_timesteps(timestep, len(sched.gamma), "timestep")[0]
    n = images.shape[0]
    scores = torch.empty(n, dtype=torch.float64, device=images.device)
    with eval_mode(eps_model), progress_bar(n, "PIA errors", progress) as bar:
        for start in range(0, n, batch_size):
            row = torch.arange(start, min(start + batch_size, n), device=images.device)
            clean, cond = images[row], take_rows(conditioning, row)
            at = torch.full_like(row, first)
            out0 = predict(clean, sched.timesteps[at], **cond)
            eps0 = eps_from_prediction(
                out0, clean, sched.gamma[at], sched.sigma[at], sched.prediction_type
            )
            it = torch.full_like(row, index)
            gamma, sigma = sched.gamma[it], sched.sigma[it]
            shape = (-1,) + (1,) * (clean.ndim - 1)
            noisy = (gamma.reshape(shape) * clean + sigma.reshape(shape) * eps0).to(images.dtype)
            out_t = predict(noisy, sched.timesteps[it], **cond)
            eps_t = eps_from_prediction(out_t, noisy, gamma, sigma, sched.prediction_type)
            diff = (eps0.to(torch.float64) - eps_t.to(torch.float64)).abs()
            scores[row] = diff.pow(float(p)).flatten(1).mean(1)
            bar.update(len(row))
    return scores


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


def _roc_inputs(member_scores: Tensor, nonmember_scores: Tensor) -> tuple[Tensor, Tensor]:
    """Predictions in ``[0, 1]`` (1 = most member-like, ties kept) and targets for torchmetrics.

    The scores are mapped through their ranks, an order-preserving map into ``[0, 1]``:
    torchmetrics would otherwise pass scores outside ``[0, 1]`` through a sigmoid, which
    saturates (and so ties) large scores.
    """
    scores = torch.cat([member_scores, nonmember_scores]).to(torch.float64)
    unique, inverse = torch.unique(scores, return_inverse=True)
    preds = 1.0 - inverse.to(torch.float64) / max(len(unique), 1)
    target = torch.cat([torch.ones(len(member_scores)), torch.zeros(len(nonmember_scores))]).to(
        device=preds.device, dtype=torch.long
    )
    return preds, target


def tpr_at_fpr(member_scores: Tensor, nonmember_scores: Tensor, fpr: float = 0.01) -> float:
    """TPR of the best threshold on "score <= tau means member" whose FPR is at most ``fpr``.

    Read off torchmetrics' ``binary_roc`` (as PIA's ``attack.py`` does with ``BinaryROC``): the
    largest TPR among ROC points with ``FPR <= fpr``. Lower scores are member-like.

    Examples:
        >>> round(tpr_at_fpr(torch.tensor([0.1, 0.2, 0.9]), torch.linspace(0.5, 1.5, 100)), 4)
        0.6667
    """
    with needs("siss.audit.membership"):
        from torchmetrics.functional.classification import binary_roc

    preds, target = _roc_inputs(member_scores, nonmember_scores)
    false_pos, true_pos, _ = binary_roc(preds, target)
    allowed = false_pos <= fpr + 1e-12
    return float(true_pos[allowed].max())


def _auroc(member_scores: Tensor, nonmember_scores: Tensor) -> float:
    with needs("siss.audit.membership"):
        from torchmetrics.functional.classification import binary_auroc

    preds, target = _roc_inputs(member_scores, nonmember_scores)
    return float(binary_auroc(preds, target))


def _bootstrap(
    members: Tensor,
    nonmembers: Tensor,
    fpr: float,
    resamples: int,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    """Stratified bootstrap ``(B,)`` AUCs and TPRs at ``fpr`` (vectorised over resamples).

    AUC as the Mann-Whitney statistic (ties count 1/2), equal to ``binary_auroc``; TPR at FPR as
    in ``tpr_at_fpr``: with ``k = floor(fpr * n)`` false positives allowed, the threshold
    sits just below the ``(k + 1)``-th smallest non-member score.
    """
    # Not scipy.stats.bootstrap: it refuses a sample of one observation ("each sample in `data`
    # must contain two or more observations"), and one forget image is the common audit; it also
    # draws from numpy's generator, not the audit's torch.Generator.
    m, n = len(members), len(nonmembers)
    device = members.device
    pick_m = _random.randint(0, m, (resamples, m), generator=generator, device=device)
    pick_n = _random.randint(0, n, (resamples, n), generator=generator, device=device)
    mem = members[pick_m]
    non = torch.sort(nonmembers[pick_n], dim=1).values
    below = torch.searchsorted(non, mem, right=False)  # non-members strictly below
    at_or_below = torch.searchsorted(non, mem, right=True)
    wins = (n - at_or_below).to(torch.float64) + 0.5 * (at_or_below - below).to(torch.float64)
    aucs = wins.sum(1) / (m * n)
    k = math.floor(fpr * n + 1e-9)
    cut = non[:, k : k + 1]
    tprs = (mem < cut).to(torch.float64).mean(1)
    return aucs, tprs


def _score_estimate(draws: Tensor, confidence: float, deterministic: bool, method: str) -> Estimate:
    if not bool(torch.isfinite(draws).all()):
        return Estimate.missing(
            "the model's prediction held NaN or inf on this image",
            "lower",
            n=draws.numel(),
            status="non-finite",
        )
    if deterministic or draws.numel() < 2:
        value = float(draws.mean())
        why = "deterministic score: no sampling interval" if deterministic else "one draw"
        return Estimate(
            value,
            math.nan,
            math.nan,
            draws.numel(),
            "lower",
            note=f"{method}; {why}",
            confidence=confidence,
        )
    value, low, high = t_interval(draws, confidence)
    return Estimate(
        value,
        low,
        high,
        draws.numel(),
        "lower",
        note=f"{method}; Student-t interval over the timestep x noise draws (pooled, "
        "conservative across timesteps)",
        confidence=confidence,
    )


Score = Literal["loss", "pia"]


def membership_check(
    eps_model: object,
    schedule: object,
    forget: Tensor,
    reference: Tensor,
    *,
    members: Tensor | None = None,
    score: Score = "loss",
    timesteps: Sequence[int] | None = None,
    noise_draws: int = 8,
    pia_timestep: int | None = None,
    conditioning: Mapping[str, Any] | None = None,
    reference_conditioning: Mapping[str, Any] | None = None,
    member_conditioning: Mapping[str, Any] | None = None,
    prediction_type: str | None = None,
    level: float = 0.05,
    fpr: float = 0.01,
    confidence: float = 0.95,
    bootstrap: int = 1000,
    generator: torch.Generator | None = None,
    batch_size: int = 64,
    progress: bool = False,
) -> list[CheckResult]:
    """Membership inference of each forget image against non-member reference images.

    Per forget image ``i`` (``CheckResult("membership", image=i, ...)``):

    * ``"error"``: its score (``denoising_errors`` or ``pia_errors``), ``held_when``
      ``"lower"``; for the loss score, a Student-t interval over its ``K * M`` draws.
    * ``"percentile"``: the fraction of reference scores at or below it, i.e. the false-positive
      rate of a threshold attack placed at this image's score; ``held_when="lower"`` (a member
      scores below most non-members); exact Clopper-Pearson interval over the ``R`` reference
      images (``siss.metrics.rate.proportion_ci``).
    * verdict: ``held`` if the conformal p-value ``(1 + #{reference <= score}) / (R + 1)`` is at
      most ``level`` (0.05): at most ``floor(level (R + 1)) - 1`` reference scores lie at or
      below it (not the same as "below the reference's ``level`` quantile"). For an
      image exchangeable with the references (a non-member, or a forgotten member) this says
      "held" with probability at most ``level``. ``overshot``, the mirror tail, if the mirror
      p-value ``(1 + #{reference >= score}) / (R + 1)`` is at most ``level`` (less
      member-like than almost all non-members; again at most ``level`` for an exchangeable
      image); else ``not held``. ``details["reference_quantile"]`` is informational only.
      With ``R + 1 < 1 / level`` reference images no p-value can reach ``level``:
      ``held=None``. Non-finite scores: ``held=None`` and the statistic's status
      ``"non-finite"``.

    Set level (``image=None``), members versus the reference non-members (members: ``members=``
    if given, else the forget images):

    * ``"auc"``: ``binary_auroc`` with lower score = member; 0.5 is chance.
    * ``"tpr_at_fpr"``: TPR at ``FPR <= fpr`` (``tpr_at_fpr``). Needs ``R >= 1 / fpr``
      non-members (100 for 1%): with fewer, one false positive is already more than ``fpr`` and
      the number would be the TPR at FPR 0; it is reported as not measured instead.
    * intervals: percentile bootstrap, ``bootstrap`` stratified resamples (members and
      non-members resampled separately) drawn from ``generator``; ``n`` is ``m + R`` and
      ``details`` holds ``n_members`` / ``n_nonmembers``. Fewer than 2 of either: not measured.
    * verdict: ``held`` if the AUC interval lies above 0.5 (members are told apart from
      non-members), ``False`` if it does not, ``None`` if the AUC was not measured.

    Args:
        eps_model, schedule, timesteps, noise_draws, prediction_type, batch_size, progress: as
            in ``denoising_errors``.
        forget: forget images ``(F, ...)``.
        reference: non-member images ``(R, ...)``, comparable to the forget images (same
            distribution, never trained on).
        members: a separate member set ``(m, ...)`` for the AUC (e.g. retained training images).
        score: ``"loss"`` (Carlini et al.) or ``"pia"`` (Kong et al.).
        pia_timestep: ``timestep`` of ``pia_errors``.
        conditioning: the forget images' model inputs (``F`` rows or 1).
        reference_conditioning, member_conditioning: the other sets'; default to
            ``conditioning`` when all its tensors have 1 row.
        level: the p-value at or below which an image is "held".
        fpr: the false-positive rate of ``"tpr_at_fpr"``.
        confidence: level of every interval.
        bootstrap: bootstrap resamples (>= 100).
        generator: source of the noise draws and the bootstrap.

    Returns:
        ``F`` per-image results, then one set-level result.

    Examples:
        >>> schedule = NoiseSchedule.from_alphas_cumprod(
        ...     torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0))
        >>> model = lambda x_t, t: schedule.sigma[t].view(-1, 1) * x_t  # exact for N(0, I) data
        >>> g = torch.Generator().manual_seed(0)
        >>> forget, reference = torch.randn(3, 4, generator=g), torch.randn(40, 4, generator=g)
        >>> results = membership_check(model, schedule, forget, reference, generator=g)
        >>> results[-1].statistics["auc"].measured, results[-1].statistics["tpr_at_fpr"].status
        (True, 'not measured')
    """
    # ---- every argument checked before the first model call
    forget = check_images(forget, "forget")
    reference = check_images(reference, "reference", like=forget)
    if members is not None:
        members = check_images(members, "members", like=forget)
    for images, name in ((reference, "reference"), (members, "members")):
        if images is not None and images.device != forget.device:
            raise ValueError(
                f"`{name}` is on {images.device} but the forget images are on {forget.device}"
            )
    if score not in ("loss", "pia"):
        raise ValueError(f"`score` must be 'loss' or 'pia', got {score!r}")
    level = check_fraction(level, "level")
    fpr = check_fraction(fpr, "fpr")
    confidence = check_fraction(confidence, "confidence")
    bootstrap = check_int(bootstrap, "bootstrap", MIN_BOOTSTRAP)
    noise_draws = check_int(noise_draws, "noise_draws")
    batch_size = check_int(batch_size, "batch_size")
    generator = check_generator(generator)
    conditioning = check_conditioning(conditioning, "conditioning", forget.shape[0])
    is_shared = shared(conditioning)

    def other(value: Mapping | None, name: str, rows: int) -> dict[str, Any]:
        if value is not None:
            return check_conditioning(value, name, rows)
        if conditioning and not is_shared:
            raise ValueError(
                f"`{name}` is needed: `conditioning` has one row per forget image, which cannot "
                "condition the other images"
            )
        return conditioning

    reference_conditioning = other(reference_conditioning, "reference_conditioning", len(reference))
    if members is not None:
        member_conditioning = other(member_conditioning, "member_conditioning", len(members))
    sched = resolve_schedule(schedule, prediction_type, forget.device)  # checks `schedule`
    predictor(eps_model, "eps_model")  # checks `eps_model`
    if score == "loss" and timesteps is not None:
        _check_timesteps(timesteps, len(sched.gamma), "timesteps")
    if score == "pia" and pia_timestep is not None:
        _check_timesteps(pia_timestep, len(sched.gamma), "pia_timestep")

    def draws(images: Tensor, cond: Mapping[str, Any], name: str) -> Tensor:
        if score == "pia":
            return pia_errors(
                eps_model,
                schedule,
                images,
                timestep=pia_timestep,
                batch_size=batch_size,
                conditioning=cond,
                prediction_type=prediction_type,
                progress=progress,
            )[:, None]
        return _denoising_error_draws(
            eps_model,
            schedule,
            images,
            timesteps=timesteps,
            noise_draws=noise_draws,
            generator=generator,
            batch_size=batch_size,
            conditioning=cond,
            prediction_type=prediction_type,
            progress=progress,
            name=name,
        )

    forget_draws = draws(forget, conditioning, "forget")
    reference_scores = draws(reference, reference_conditioning, "reference").mean(1)
    member_scores = (
        draws(members, member_conditioning, "members").mean(1)
        if members is not None
        else forget_draws.mean(1)
    )
    method = (
        "Carlini et al. (2023) denoising loss" if score == "loss" else "PIA t-error (Kong et al.)"
    )
    results = _per_image(forget_draws, reference_scores, level, confidence, score == "pia", method)
    results.append(
        _set_level(
            member_scores,
            reference_scores,
            fpr,
            confidence,
            bootstrap,
            generator,
            separate=members is not None,
        )
    )
    return results


def _per_image(
    forget_draws: Tensor,
    reference: Tensor,
    level: float,
    confidence: float,
    deterministic: bool,
    method: str,
) -> list[CheckResult]:
    r = reference.numel()
    reference = reference.cpu()
    finite = bool(torch.isfinite(reference).all())
    threshold = float(torch.quantile(reference, level)) if finite else math.nan
    rule = (
        f"held if the conformal p-value (1 + #reference <= score) / (R + 1) <= {level:g} "
        f"(at most floor({level:g} (R + 1)) - 1 reference scores at or below it)"
    )
    results = []
    for i, row in enumerate(forget_draws.cpu()):
        error = _score_estimate(row, confidence, deterministic, method)
        details: dict[str, Any] = {
            "n_reference": r,
            "reference_quantile": threshold,
            "reference_values": [float(v) for v in reference.tolist()],
        }
        verdict: Verdict = "undecided"
        reason = "no verdict: the model returned NaN or inf on this image"
        if not error.measured:
            percentile = Estimate.missing(
                "the image's score is non-finite", "lower", n=r, status="non-finite"
            )
        else:
            percentile, count = percentile_among(
                error.value, reference, "lower", confidence, "reference (non-member) scores"
            )
            if percentile.measured:
                mirror = at_or_above(reference, error.value)
                details["p_value"], verdict, reason, details["p_value_overshot"] = (
                    conformal_verdict(count, r, level, rule, "reference images", mirror)
                )
            else:
                reason = "no verdict: the reference distribution is non-finite"
        stats = {"error": error, "percentile": percentile}
        results.append(
            CheckResult("membership", i, stats, held_of(verdict), reason, details, verdict)
        )
    return results


def _set_level(
    members: Tensor,
    nonmembers: Tensor,
    fpr: float,
    confidence: float,
    bootstrap: int,
    generator: torch.Generator | None,
    *,
    separate: bool,
) -> CheckResult:
    m, n = members.numel(), nonmembers.numel()
    details: dict[str, Any] = {
        "n_members": m,
        "n_nonmembers": n,
        "members": "the `members` set" if separate else "the forget images",
        "fpr": fpr,
    }
    total = m + n
    if m < 2 or n < 2:
        why = f"needs at least 2 members and 2 non-members, got {m} and {n}"
        stats = {
            "auc": Estimate.missing(why, "higher", n=total),
            "tpr_at_fpr": Estimate.missing(why, "higher", n=total),
        }
        return CheckResult("membership", None, stats, None, f"no verdict: {why}", details)
    if not (bool(torch.isfinite(members).all()) and bool(torch.isfinite(nonmembers).all())):
        why = "some member or non-member scores are NaN or inf (the model's prediction diverged)"
        stats = {
            "auc": Estimate.missing(why, "higher", n=total, status="non-finite"),
            "tpr_at_fpr": Estimate.missing(why, "higher", n=total, status="non-finite"),
        }
        return CheckResult("membership", None, stats, None, f"no verdict: {why}", details)
    members, nonmembers = members.to(torch.float64), nonmembers.to(torch.float64)
    aucs, tprs = _bootstrap(members, nonmembers, fpr, bootstrap, generator)
    tail = (1 - confidence) / 2
    qs = torch.tensor([tail, 1 - tail], dtype=torch.float64, device=aucs.device)
    auc_low, auc_high = (float(v) for v in torch.quantile(aucs, qs))
    auc = _auroc(members, nonmembers)
    interval = (
        f"percentile bootstrap, {bootstrap} stratified resamples ({m} members, {n} non-members)"
    )
    stats = {
        "auc": Estimate(
            auc, auc_low, auc_high, total, "higher", note=interval, confidence=confidence
        )
    }
    needed = math.ceil(1 / fpr - 1e-9)
    if n < needed:
        stats["tpr_at_fpr"] = Estimate.missing(
            f"TPR at {fpr:g} FPR needs at least {needed} non-members (one false positive among "
            f"{n} is already an FPR of {1 / n:.3g}); got {n}",
            "higher",
            n=total,
        )
    else:
        tpr_low, tpr_high = (float(v) for v in torch.quantile(tprs, qs))
        stats["tpr_at_fpr"] = Estimate(
            tpr_at_fpr(members, nonmembers, fpr),
            tpr_low,
            tpr_high,
            total,
            "higher",
            note=f"TPR at FPR <= {fpr:g}; {interval}",
            confidence=confidence,
        )
    held = auc_low > 0.5
    reason = (
        f"held if the AUC's {confidence:g} interval lies above 0.5 (members told apart from "
        f"non-members); AUC {auc:.3g} [{auc_low:.3g}, {auc_high:.3g}]"
    )
    return CheckResult("membership", None, stats, held, reason, details)
