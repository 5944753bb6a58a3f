"""Memorization of a prompt by a text-conditional diffusion model (Wen et al., ICLR 2024).

Wen, Liu, Chen and Lyu, "Detecting, Explaining, and Mitigating Memorization in Diffusion
Models" (ICLR 2024): along the classifier-free-guided sampling trajectory of a prompt ``c``, the
magnitude of the text-conditional part of the noise prediction,

$$
d = \\frac{1}{S} \\sum_{i=1}^{S} \\lVert \\hat\\epsilon_\\theta(x_{t_i}, c) -
\\hat\\epsilon_\\theta(x_{t_i}, \\varnothing) \\rVert_2,
$$

is high for memorized prompts. Matched against the authors' code (``YuxinWenRick/
diffusion_memorization``): ``local_sd_pipeline.py`` records, at every step of a DDIM run with
guidance scale 7.5, ``noise_pred_text - noise_pred_uncond`` (raw UNet outputs, before guidance)
and its L2 norm over the whole latent of each generated image (``.norm(p=2)``, not divided by
the size); ``detect_mem.py`` runs 50 inference steps and 4 images per prompt; the detection
notebook (``examples/det_mem_viz.ipynb``) averages the norms over the generations and over steps
``start=0 .. end=50``. Those are the defaults here (``num_inference_steps=50``,
``num_steps=50``, ``guidance_scale=7.5``, 4 generations); the paper also reports that the first
step alone already separates memorized prompts (``num_steps=1``, 50x cheaper).

The sampler is deterministic DDIM (eta 0, as the authors' ``DDIMScheduler``) written on the
forward process ``x_t = gamma_t x_0 + sigma_t eps`` of the model's schedule, so it serves
DDPM-style and rectified-flow models alike (DDIM on rectified flow is its Euler step). With a
diffusers scheduler the noise levels are those its ``set_timesteps`` chooses (on a copy).
Model outputs other than epsilon are converted to epsilon first (``eps_from_prediction``), so the
score is on the noise scale for every prediction type; for an epsilon model it is the authors'.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from numbers import Integral, Real
from typing import Any

import torch
from torch import Tensor

from siss import _random
from siss.audit._inputs import (
    broadcast_rows,
    check_conditioning,
    check_fraction,
    check_generator,
    check_int,
    tensors,
)
from siss.audit._models import (
    Schedule,
    eval_mode,
    predictor,
    progress_bar,
    resolve_schedule,
)
from siss.audit._stats import (
    at_or_above,
    at_or_below,
    conformal_verdict,
    percentile_among,
    t_interval,
)
from siss.audit.report import CheckResult, Estimate, Verdict, held_of
from siss.targets import eps_from_prediction, x0_from_prediction

__all__ = ["guided_trajectory", "memorization_check", "noise_magnitude_score"]


def _inference_indices(sched: Schedule, num_inference_steps: int) -> list[int]:
    """Grid indices of the sampling steps, noisiest first.

    From a diffusers scheduler: a copy's ``set_timesteps(num_inference_steps)`` timesteps, each
    mapped to the grid entry with the nearest model timestep (so SD's DDIM config gives 981, 961,
    ..., 1 as the authors' pipeline). From a ``NoiseSchedule``: DDIM's "leading" spacing, every
    ``T // num_inference_steps``-th grid entry in order of noise, from the least noisy one.
    """
    length = len(sched.sigma)
    if num_inference_steps > length:
        raise ValueError(
            f"`num_inference_steps` ({num_inference_steps}) exceeds the schedule's "
            f"{length} training timesteps"
        )
    if sched.scheduler is not None:
        scheduler = copy.deepcopy(sched.scheduler)
        try:
            scheduler.set_timesteps(num_inference_steps, device="cpu")
            wanted = torch.as_tensor(scheduler.timesteps, dtype=torch.float64).cpu()
        except (TypeError, ValueError):  # e.g. dynamic shifting needs `mu`: use the grid
            wanted = None
        if wanted is not None and len(wanted) > 0:
            grid = sched.timesteps.detach().cpu().to(torch.float64)
            nearest = (grid[None, :] - wanted[:, None]).abs().argmin(1)
            return [int(i) for i in nearest]
    order = torch.sort(sched.sigma.cpu(), stable=True).indices
    positions = torch.arange(num_inference_steps) * (length // num_inference_steps)
    return [int(i) for i in order[positions].flip(0)]


def _cat(first: Any, second: Any) -> Any:
    """``torch.cat([first, second])`` through dicts and lists (the CFG batch)."""
    if isinstance(first, Tensor) and first.ndim > 0:
        return torch.cat([first, second])
    if isinstance(first, Mapping):
        return {k: _cat(v, second[k]) for k, v in first.items()}
    if isinstance(first, list | tuple):
        return type(first)(_cat(a, b) for a, b in zip(first, second, strict=True))
    return first


@torch.no_grad()
def _noise_magnitude_tracks(
    eps_model: object,
    schedule: object,
    latents: Tensor | Sequence[int] | None,
    prompt_embeds: Tensor,
    null_embeds: Tensor,
    *,
    num_inference_steps: int,
    num_steps: int,
    guidance_scale: float,
    generator: torch.Generator | None,
    prediction_type: str | None,
    embeds_key: str,
    conditioning: Mapping[str, Any] | None,
    null_conditioning: Mapping[str, Any] | None,
    progress: bool,
    trajectory: Tensor | None = None,
    record: list[Tensor] | None = None,
) -> Tensor:
    """``(G, num_steps)`` norms ``||eps(x_t, c) - eps(x_t, null)||_2`` along the trajectory:
    the model's own guided DDIM run from ``latents``, or the given ``trajectory``
    ``(num_steps, G, ...)`` (then ``latents`` is ``None``). ``record`` collects the ``x_t``."""
    for value, name in ((prompt_embeds, "prompt_embeds"), (null_embeds, "null_embeds")):
        if not isinstance(value, Tensor) or not value.is_floating_point():
            raise TypeError(f"`{name}` must be a floating-point torch.Tensor (1 or G rows, ...)")
        if value.ndim < 2:
            raise ValueError(f"`{name}` must have a row dimension, got {tuple(value.shape)}")
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"`{name}` holds NaN or inf values")
    if prompt_embeds.shape[1:] != null_embeds.shape[1:]:
        raise ValueError(
            f"`null_embeds` {tuple(null_embeds.shape)} must match `prompt_embeds` "
            f"{tuple(prompt_embeds.shape)} beyond the row dimension (encode the empty prompt "
            "with the same tokenizer length)"
        )
    device, dtype = prompt_embeds.device, prompt_embeds.dtype
    generator = check_generator(generator)
    if trajectory is not None:
        if latents is not None:
            raise ValueError("give `latents` or `trajectory`, not both (`latents=None`)")
        if (
            not isinstance(trajectory, Tensor)
            or not trajectory.is_floating_point()
            or trajectory.ndim < 3
            or trajectory.numel() == 0
        ):
            raise ValueError(
                "`trajectory` must be a floating tensor (num_steps, G, ...) of the x_t of each "
                f"step (e.g. from `guided_trajectory`), got {getattr(trajectory, 'shape', None)}"
            )
        if not bool(torch.isfinite(trajectory).all()):
            raise ValueError("`trajectory` holds NaN or inf values")
        x = trajectory[0].to(device)
    elif isinstance(latents, Tensor):
        if not latents.is_floating_point() or latents.ndim < 2 or latents.numel() == 0:
            raise ValueError(
                f"`latents` must be a floating tensor (G, ...) of starting noise, got "
                f"{latents.dtype} {tuple(latents.shape)}"
            )
        if not bool(torch.isfinite(latents).all()):
            raise ValueError("`latents` holds NaN or inf values")
        x = latents.to(device)
    else:
        if (
            not isinstance(latents, Sequence)
            or len(latents) < 2
            or any(isinstance(v, bool) or not isinstance(v, Integral) or v < 1 for v in latents)
        ):
            raise TypeError(
                "`latents` must be a tensor (G, ...) of starting noise or a shape (G, C, H, W) "
                f"of positive ints, got {latents!r}"
            )
        x = _random.randn(
            tuple(int(v) for v in latents), generator=generator, device=device, dtype=dtype
        )
    generations = x.shape[0]
    num_inference_steps = check_int(num_inference_steps, "num_inference_steps")
    num_steps = check_int(num_steps, "num_steps")
    if num_steps > num_inference_steps:
        raise ValueError(
            f"`num_steps` ({num_steps}) must be at most `num_inference_steps` "
            f"({num_inference_steps})"
        )
    if trajectory is not None and trajectory.shape[0] < num_steps:
        raise ValueError(
            f"`trajectory` holds {trajectory.shape[0]} steps, fewer than `num_steps` ({num_steps})"
        )
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, Real):
        raise TypeError(f"`guidance_scale` must be a real number, got {guidance_scale!r}")
    if not math.isfinite(float(guidance_scale)):
        raise ValueError(f"`guidance_scale` must be finite, got {guidance_scale!r}")
    if not isinstance(embeds_key, str):
        raise TypeError(f"`embeds_key` must be a str, got {type(embeds_key).__name__}")
    conditioning = check_conditioning(conditioning, "conditioning", generations, per="generation")
    null_conditioning = (
        conditioning
        if null_conditioning is None
        else check_conditioning(
            null_conditioning, "null_conditioning", generations, per="generation"
        )
    )
    cond = {
        **broadcast_rows(conditioning, generations, "conditioning"),
        embeds_key: broadcast_rows(prompt_embeds, generations, "prompt_embeds"),
    }
    null = {
        **broadcast_rows(null_conditioning, generations, "null_conditioning"),
        embeds_key: broadcast_rows(null_embeds, generations, "null_embeds"),
    }
    for key, tensor in tensors(cond, "conditioning"):
        if tensor.device != device:
            raise ValueError(f"`{key}` is on {tensor.device}, `prompt_embeds` on {device}")
    batch = _cat(null, cond)  # unconditional rows first, as the authors' pipeline
    predict = predictor(eps_model, "eps_model")
    sched = resolve_schedule(schedule, prediction_type, device)
    steps = _inference_indices(sched, num_inference_steps)[:num_steps]
    kind = sched.prediction_type
    w = float(guidance_scale)
    tracks = torch.empty(generations, num_steps, dtype=torch.float64, device=device)
    with eval_mode(eps_model), progress_bar(num_steps, "noise magnitude", progress) as bar:
        for i, index in enumerate(steps):
            if trajectory is not None:
                x = trajectory[i].to(device, dtype)
            if record is not None:
                record.append(x.detach().clone())
            at = torch.full((2 * generations,), index, device=device)
            gamma, sigma = sched.gamma[at], sched.sigma[at]
            model_input = torch.cat([x, x]).to(dtype)
            output = predict(model_input, sched.timesteps[at], **batch)
            eps = eps_from_prediction(output, model_input, gamma, sigma, kind)
            eps_null, eps_cond = eps.chunk(2)
            tracks[:, i] = (eps_cond - eps_null).to(torch.float64).flatten(1).norm(dim=1)
            if trajectory is None and i + 1 < len(steps):  # a guided DDIM step (eta 0)
                out_null, out_cond = output.chunk(2)
                guided = out_null + w * (out_cond - out_null)
                g, s = gamma[:generations], sigma[:generations]
                eps_hat = eps_from_prediction(guided, x, g, s, kind)
                x0_hat = x0_from_prediction(guided, x, g, s, kind)
                nxt = steps[i + 1]
                x = (sched.gamma[nxt] * x0_hat + sched.sigma[nxt] * eps_hat).to(dtype)
            bar.update(1)
    return tracks


def noise_magnitude_score(
    eps_model: object,
    schedule: object,
    latents: Tensor | Sequence[int] | None,
    prompt_embeds: Tensor,
    null_embeds: Tensor,
    *,
    num_inference_steps: int = 50,
    num_steps: int = 50,
    guidance_scale: float = 7.5,
    generator: torch.Generator | None = None,
    prediction_type: str | None = None,
    embeds_key: str = "encoder_hidden_states",
    conditioning: Mapping[str, Any] | None = None,
    null_conditioning: Mapping[str, Any] | None = None,
    return_steps: bool = False,
    progress: bool = False,
    trajectory: Tensor | None = None,
) -> Tensor:
    """Wen et al.'s (ICLR 2024) memorization score of a prompt, one per generation (seed).

    For each starting noise ``x_T^{(g)}``, the mean over the first ``num_steps`` steps of a
    guided DDIM run of ``||eps(x_t, c) - eps(x_t, null)||_2`` (norm over the whole latent).
    All generations go through the model together (``2 G`` rows per step: unconditional, then
    conditional).

    Args:
        eps_model: a ``UNet2DConditionModel`` (through ``siss.adapters.adapter_for``), a
            ``ModelAdapter``, or a callable ``(x_t, t, **{embeds_key: embeds, ...})``.
        schedule: a ``siss.NoiseSchedule`` or a diffusers scheduler (not modified).
        latents: starting noise ``(G, C, H, W)``, or the shape ``(G, C, H, W)`` to draw it
            from ``generator`` (``G`` generations; the authors used 4 per prompt); ``None``
            with ``trajectory``.
        prompt_embeds: the prompt's text embeddings ``(1 or G, L, D)``.
        null_embeds: the empty prompt's ``(1 or G, L, D)``.
        num_inference_steps: steps of the sampler (50).
        num_steps: how many of the first steps the score averages (50: all, as the authors'
            notebook; 1 for the cheap first-step detector).
        guidance_scale: classifier-free guidance of the trajectory (7.5).
        generator: draws ``latents`` when a shape is given.
        prediction_type: ``None`` reads it from a diffusers scheduler (``"epsilon"`` for a
            ``NoiseSchedule``).
        embeds_key: the model's keyword for the embeddings.
        conditioning, null_conditioning: further model inputs for the conditional and the
            unconditional rows (e.g. SDXL's ``added_cond_kwargs``), 1 or ``G`` rows;
            ``null_conditioning`` defaults to ``conditioning``.
        return_steps: return the per-step norms ``(G, num_steps)`` instead of their mean.
        progress: show a tqdm bar over the steps.
        trajectory: fixed ``x_t`` ``(>= num_steps, G, C, H, W)``, one per step, to evaluate
            the score on instead of the model's own guided run (``latents=None``). To compare a
            model before and after unlearning on the same inputs, record the trajectory once
            with :func:`guided_trajectory` of the model before: the own-trajectory score of
            the model after also moves because its run no longer reaches the memorized image.
            ``guidance_scale`` and ``generator`` are then unused.

    Returns:
        ``(G,)`` float64 (``(G, num_steps)`` with ``return_steps``); NaN where the model
        returned NaN.

    Examples:
        >>> from siss import NoiseSchedule
        >>> schedule = NoiseSchedule.from_alphas_cumprod(
        ...     torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0))
        >>> shift = torch.full((1, 2, 2), 0.5)  # the prompt moves the prediction by this
        >>> model = lambda x, t, encoder_hidden_states: 0.1 * x + (
        ...     encoder_hidden_states.mean((1, 2)).view(-1, 1, 1, 1) * shift)
        >>> scores = noise_magnitude_score(model, schedule, (3, 1, 2, 2), torch.ones(1, 4, 8),
        ...     torch.zeros(1, 4, 8), num_inference_steps=10, num_steps=10)
        >>> scores.shape, torch.allclose(scores, torch.ones(3, dtype=torch.float64))
        (torch.Size([3]), True)
    """
    tracks = _noise_magnitude_tracks(
        eps_model,
        schedule,
        latents,
        prompt_embeds,
        null_embeds,
        num_inference_steps=num_inference_steps,
        num_steps=num_steps,
        guidance_scale=guidance_scale,
        generator=generator,
        prediction_type=prediction_type,
        embeds_key=embeds_key,
        conditioning=conditioning,
        null_conditioning=null_conditioning,
        progress=progress,
        trajectory=trajectory,
    )
    return tracks if return_steps else tracks.mean(1)


def guided_trajectory(
    eps_model: object,
    schedule: object,
    latents: Tensor | Sequence[int],
    prompt_embeds: Tensor,
    null_embeds: Tensor,
    *,
    num_inference_steps: int = 50,
    num_steps: int = 50,
    guidance_scale: float = 7.5,
    generator: torch.Generator | None = None,
    prediction_type: str | None = None,
    embeds_key: str = "encoder_hidden_states",
    conditioning: Mapping[str, Any] | None = None,
    null_conditioning: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> Tensor:
    """The ``x_t`` at which :func:`noise_magnitude_score` evaluates the model, one per step.

    The same guided DDIM run (same arguments, same draws of ``latents``) as the score's;
    pass the result as its ``trajectory=`` to score another model (the same one after
    unlearning) on these fixed inputs.

    Returns:
        ``(num_steps, G, C, H, W)`` in the embeddings' dtype; ``[0]`` is the starting noise.

    Examples:
        >>> from siss import NoiseSchedule
        >>> schedule = NoiseSchedule.from_alphas_cumprod(
        ...     torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0))
        >>> model = lambda x, t, encoder_hidden_states: 0.1 * x + (
        ...     encoder_hidden_states.mean((1, 2)).view(-1, 1, 1, 1))
        >>> args = (schedule, (3, 1, 2, 2), torch.ones(1, 4, 8), torch.zeros(1, 4, 8))
        >>> xs = guided_trajectory(model, *args, num_inference_steps=10, num_steps=10,
        ...     generator=torch.Generator().manual_seed(0))
        >>> xs.shape
        torch.Size([10, 3, 1, 2, 2])
        >>> own = noise_magnitude_score(model, *args, num_inference_steps=10, num_steps=10,
        ...     generator=torch.Generator().manual_seed(0))
        >>> fixed = noise_magnitude_score(model, schedule, None, *args[2:],
        ...     num_inference_steps=10, num_steps=10, trajectory=xs)
        >>> torch.equal(own, fixed)
        True
    """
    record: list[Tensor] = []
    _noise_magnitude_tracks(
        eps_model,
        schedule,
        latents,
        prompt_embeds,
        null_embeds,
        num_inference_steps=num_inference_steps,
        num_steps=num_steps,
        guidance_scale=guidance_scale,
        generator=generator,
        prediction_type=prediction_type,
        embeds_key=embeds_key,
        conditioning=conditioning,
        null_conditioning=null_conditioning,
        progress=progress,
        record=record,
    )
    return torch.stack(record)


def memorization_check(
    eps_model: object,
    schedule: object,
    latents: Tensor | Sequence[int],
    prompt_embeds: Tensor,
    null_embeds: Tensor,
    *,
    reference_scores: Tensor | None = None,
    threshold: float | None = None,
    image: int | None = None,
    level: float = 0.05,
    confidence: float = 0.95,
    num_inference_steps: int = 50,
    num_steps: int = 50,
    guidance_scale: float = 7.5,
    generator: torch.Generator | None = None,
    prediction_type: str | None = None,
    embeds_key: str = "encoder_hidden_states",
    conditioning: Mapping[str, Any] | None = None,
    null_conditioning: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> list[CheckResult]:
    """Does the model still memorize the prompt? Wen et al.'s score with its interval.

    Statistics (``CheckResult("memorization", image, ...)``, ``held_when="higher"``):

    * ``"noise_magnitude"``: the mean of ``noise_magnitude_score`` over the ``G``
      generations, with a Student-t interval over them (``n = G``; no interval for ``G = 1``).
      Non-finite scores: status ``"non-finite"``, never a pass.
    * ``"percentile"`` (with ``reference_scores``, the mean scores of comparable prompts that
      are not memorized, computed with the same settings): the fraction of reference scores
      below this prompt's (ties count against "held"), exact Clopper-Pearson interval over the
      ``P`` reference prompts.

    Verdict: with ``reference_scores``, ``held`` if the conformal p-value
    ``(1 + #{reference >= score}) / (P + 1)`` is at most ``level`` (the prompt scores above the
    reference's ``1 - level`` quantile; needs ``P >= 1 / level - 1``), ``overshot`` if the mirror
    p-value ``(1 + #{reference <= score}) / (P + 1)`` is (the prompt's noise magnitude lies below
    almost all non-memorized prompts'), else ``not held``; else with ``threshold``, ``held`` if
    the mean score exceeds it (Wen et al. detect by thresholding this score; the threshold is
    model-specific), ``not held`` otherwise (no mirror without references); else undecided
    (``held = None``).

    Args:
        eps_model, schedule, latents, prompt_embeds, null_embeds, num_inference_steps,
            num_steps, guidance_scale, generator, prediction_type, embeds_key, conditioning,
            null_conditioning, progress: as in ``noise_magnitude_score``.
        reference_scores: ``(P,)`` reference prompts' scores.
        threshold: a score above which the prompt counts as memorized.
        image: the forget image this prompt belongs to (``None``: the forget set's prompt).
        level: the p-value at or below which the prompt is "held".
        confidence: level of the intervals.

    Returns:
        A list with one ``CheckResult``; ``details`` holds the per-generation scores and the
        per-step norms averaged over generations.

    Examples:
        >>> from siss import NoiseSchedule
        >>> schedule = NoiseSchedule.from_alphas_cumprod(
        ...     torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0))
        >>> model = lambda x, t, encoder_hidden_states: 0.1 * x  # ignores the prompt
        >>> [result] = memorization_check(model, schedule, (4, 1, 2, 2), torch.ones(1, 3, 8),
        ...     torch.zeros(1, 3, 8), num_inference_steps=5, num_steps=5)
        >>> result.statistics["noise_magnitude"].format(), result.held
        ('0 [0, 0] (n=4)', None)
    """
    level = check_fraction(level, "level")
    confidence = check_fraction(confidence, "confidence")
    if image is not None and (isinstance(image, bool) or not isinstance(image, Integral)):
        raise TypeError(f"`image` must be an int index or None, got {image!r}")
    if threshold is not None and (
        isinstance(threshold, bool)
        or not isinstance(threshold, Real)
        or not math.isfinite(float(threshold))
    ):
        raise ValueError(f"`threshold` must be a finite number or None, got {threshold!r}")
    if reference_scores is not None:
        if not isinstance(reference_scores, Tensor) or reference_scores.ndim != 1:
            raise TypeError("`reference_scores` must be a 1-D tensor (P,) of prompts' scores")
        if reference_scores.numel() == 0:
            raise ValueError("`reference_scores` is empty: give at least one reference prompt")
    tracks = noise_magnitude_score(
        eps_model,
        schedule,
        latents,
        prompt_embeds,
        null_embeds,
        num_inference_steps=num_inference_steps,
        num_steps=num_steps,
        guidance_scale=guidance_scale,
        generator=generator,
        prediction_type=prediction_type,
        embeds_key=embeds_key,
        conditioning=conditioning,
        null_conditioning=null_conditioning,
        return_steps=True,
        progress=progress,
    ).cpu()
    scores = tracks.mean(1)
    g = scores.numel()
    details: dict[str, Any] = {
        "per_generation": [float(v) for v in scores],
        "per_step": [float(v) for v in tracks.mean(0)],
        "num_inference_steps": num_inference_steps,
        "num_steps": num_steps,
        "guidance_scale": float(guidance_scale),
    }
    method = (
        f"Wen et al. (2024) ||eps(x_t, c) - eps(x_t, null)||, mean over the first {num_steps} "
        f"of {num_inference_steps} guided DDIM steps (scale {guidance_scale:g})"
    )
    if not bool(torch.isfinite(scores).all()):
        why = "the model's prediction held NaN or inf along the trajectory"
        stats = {"noise_magnitude": Estimate.missing(why, "higher", n=g, status="non-finite")}
        if reference_scores is not None:
            stats["percentile"] = Estimate.missing(
                why, "higher", n=reference_scores.numel(), status="non-finite"
            )
        return [CheckResult("memorization", image, stats, None, f"no verdict: {why}", details)]
    value, low, high = t_interval(scores, confidence)
    note = f"{method}; " + (
        f"Student-t interval over {g} generations" if g >= 2 else "one generation: no interval"
    )
    stats = {
        "noise_magnitude": Estimate(value, low, high, g, "higher", note=note, confidence=confidence)
    }
    verdict: Verdict = "undecided"
    reason = "no verdict: give `reference_scores` (non-memorized prompts) or a `threshold`"
    if reference_scores is not None:
        stats["percentile"], _ = percentile_among(
            value, reference_scores, "higher", confidence, "reference prompts' scores"
        )
        if not stats["percentile"].measured:
            reason = "no verdict: the reference scores are non-finite"
        else:
            reference = reference_scores.detach().to("cpu", torch.float64)
            rule = f"held if the conformal p-value (1 + #reference >= score) / (P + 1) <= {level:g}"
            details["p_value"], verdict, reason, details["p_value_overshot"] = conformal_verdict(
                at_or_above(reference, value),
                reference.numel(),
                level,
                rule,
                "reference prompts",
                at_or_below(reference, value),
            )
    elif threshold is not None:
        verdict = "held" if value > float(threshold) else "not held"
        reason = (
            f"{verdict}: held if the mean score exceeds the threshold {float(threshold):g} "
            "(no reference prompts: no overshot verdict)"
        )
        details["threshold"] = float(threshold)
    return [CheckResult("memorization", image, stats, held_of(verdict), reason, details, verdict)]
