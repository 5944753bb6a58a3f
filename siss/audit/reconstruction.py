"""Reconstruction check (the paper's Figure 2 / Table 1 test): noise, denoise, compare.

Each image is noised to training timestep ``t`` with the scheduler's forward process and
denoised back to ``t = 0``; a model that holds an image pulls the noisy point back to it, so its
reconstruction is closer to the original than a non-member's is. Per forget image the check
reports its mean similarity over ``noise_draws`` noise draws and its percentile among the
reference (non-member) images' mean similarities.

Forward process and denoiser:

* VP schedulers: ``DDIMScheduler.from_config(scheduler.config)`` (a copy): ``x_t =
  add_noise(x_0, eps, t)`` (``sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) eps``), then deterministic DDIM
  (``eta = 0``) steps ``t, t - r, ..., > 0`` with DDIM's stride ``r = T // num_inference_steps``
  (the stride ``siss.audit.sampling.generate`` uses over the whole schedule; 13 steps from
  ``t = 250`` at the default 50), the last one landing on ``x_0``. The config's ``clip_sample``
  applies (override with ``clip_sample``).
* ``FlowMatchEulerDiscreteScheduler``: ``t`` is the model's timestep value, ``sigma = t / T``
  (``x_t = (1 - sigma) x_0 + sigma eps``), denoised by the scheduler's Euler steps on
  ``ceil(t / r)`` equally spaced sigmas from ``sigma`` to 0.

Similarity (``similarity``):

* ``"ssim"`` (default): torchmetrics' SSIM (Gaussian window, ``sigma = 1.5``, 11 taps; for
  images under 11 pixels a side ``sigma = p / 3.5`` with ``p = (min(H, W) - 1) // 2``, the
  widest window that fits: 7 taps at 8x8) on both images mapped from
  ``data_range`` to ``[0, 1]`` by ``(x - lo) / (hi - lo)`` with ``data_range=1``. Reconstructions
  are not clamped: values outside the range lower the SSIM, as they should;
* ``"neg_mse"``: minus the mean squared pixel difference, in ``[0, 1]`` units;
* a callable ``similarity(reconstructed (B, *S), original (B, *S)) -> (B,)``, larger = more
  similar (SSCD, DINO or CLIP cosine similarity when you have their weights).

Statistics per forget image: ``"similarity"`` (``held_when="higher"``; mean over the draws, with
the Student-t interval over the draws) and ``"percentile"`` (``held_when="higher"``: the fraction
of reference images whose mean similarity is below it, ties against "held", exact
Clopper-Pearson interval). Verdict with ``p = percentile``: held when the percentile's interval
lies above ``1 - p`` (the forget image is reconstructed better than the non-members'
``(1 - p)``-quantile); overshot, the mirror tail, when the share of reference images
reconstructed at least as badly has its interval below ``p`` (the forget image is reconstructed
worse than almost all non-members); not held when the percentile's interval lies below
``1 - p`` otherwise; undecided otherwise (see ``siss.audit._stats.rank_against_reference``).
NaN reconstructions (a diverged model) give status ``"non-finite"`` and ``held = None``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from siss._checks import check_index
from siss._optional import needs
from siss.audit._inputs import (
    check_conditioning,
    check_fraction,
    check_generator,
    check_images,
    check_int,
    check_range,
)
from siss.audit._models import check_model_device, eval_mode, progress_bar, scheduler_kind
from siss.audit._stats import rank_against_reference, t_interval
from siss.audit.report import CheckResult, Estimate, Verdict, held_of
from siss.audit.sampling import (
    ddim_denoise_from,
    flow_denoise_from,
    initial_noise,
    prediction_fn,
    sample_seeds,
    sampler_for,
)

__all__ = ["negative_mse", "reconstruction_check", "reconstruction_sweep", "ssim"]

Similarity = Callable[[Tensor, Tensor], Tensor]


def ssim(
    reconstructed: Tensor, original: Tensor, data_range: tuple[float, float] = (-1.0, 1.0)
) -> Tensor:
    """Per-image SSIM (torchmetrics) of ``(B, C, H, W)`` images mapped from ``data_range`` to
    ``[0, 1]``; ``(B,)`` float64. NaN images give NaN."""
    with needs("siss.audit.reconstruction"):
        from torchmetrics.functional.image import structural_similarity_index_measure

    lo, hi = data_range
    side = min(original.shape[-2:])
    # torchmetrics sizes its Gaussian window from sigma (2 * int(3.5 sigma + 0.5) + 1 taps):
    # sigma 1.5 gives the standard 11 taps; smaller images get the widest window that fits.
    sigma = 1.5 if side >= 11 else max((side - 1) // 2, 1) / 3.5
    a = (reconstructed.double() - lo) / (hi - lo)
    b = (original.double() - lo) / (hi - lo)
    values = structural_similarity_index_measure(
        a, b, data_range=1.0, reduction="none", sigma=sigma
    )
    return values.reshape(-1)


def negative_mse(
    reconstructed: Tensor, original: Tensor, data_range: tuple[float, float] = (-1.0, 1.0)
) -> Tensor:
    """Minus the per-image mean squared difference in ``[0, 1]`` units; ``(B,)`` float64."""
    lo, hi = data_range
    diff = (reconstructed.double() - original.double()) / (hi - lo)
    return -(diff * diff).flatten(1).mean(1)


def _similarity(similarity: object, data_range: tuple[float, float], shape: tuple) -> tuple:
    if similarity == "ssim":
        if len(shape) != 3 or min(shape[1:]) < 3:
            raise ValueError(
                f"`similarity`='ssim' needs (C, H, W) images with H, W >= 3, got {shape}; "
                "use 'neg_mse' or a callable"
            )
        return (lambda a, b: ssim(a, b, data_range)), "SSIM (torchmetrics) in [0, 1] units"
    if similarity == "neg_mse":
        return (lambda a, b: negative_mse(a, b, data_range)), "negative pixel MSE in [0, 1] units"
    if isinstance(similarity, str) or not callable(similarity):
        raise ValueError(
            f"`similarity` must be 'ssim', 'neg_mse' or a callable (a, b) -> (N,), got "
            f"{similarity!r}"
        )
    return similarity, getattr(similarity, "__name__", type(similarity).__name__)


def reconstruct(
    model: object,
    scheduler: Any,
    images: Tensor,
    *,
    t: int = 250,
    num_inference_steps: int = 50,
    conditioning: Mapping[str, Any] | None = None,
    clip_sample: bool | None = None,
    seeds: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Noise ``images`` ``(B, *S)`` to timestep ``t`` and denoise them (module docstring).

    Row ``i``'s noise is drawn from ``seeds[i]`` (or seeds drawn from ``generator``).

    Returns:
        ``(B, *S)`` reconstructions in the images' dtype, unclamped.
    """
    sampler, kind, _ = sampler_for(scheduler, num_inference_steps, clip_sample, images.device)
    total = int(scheduler.config.num_train_timesteps)
    if seeds is None:
        seeds = sample_seeds(images.shape[0], generator)
    noise = initial_noise(seeds, tuple(images.shape[1:]), images.device, images.dtype)
    predict = prediction_fn(model, conditioning, scheduler)
    stride = total // sampler.num_inference_steps
    if kind == "flow":
        sigma = t / total
        x_t = (1 - sigma) * images + sigma * noise
        return flow_denoise_from(predict, scheduler, x_t, sigma, max(1, math.ceil(t / stride)))
    timesteps = torch.full((images.shape[0],), t, dtype=torch.long, device=images.device)
    x_t = sampler.add_noise(images, noise, timesteps)
    return ddim_denoise_from(predict, sampler, x_t, t)


def check_timestep(t: object, scheduler: Any, name: str = "t") -> int:
    """``t`` as an int in ``[1, T - 1]`` (``[1, T]`` on a flow grid) of ``scheduler``'s training
    schedule; a ``ValueError`` naming ``name`` otherwise."""
    kind, _ = scheduler_kind(scheduler)
    total = int(scheduler.config.num_train_timesteps)
    highest = total if kind == "flow" else total - 1
    t = check_index(t, name)
    if not 1 <= t <= highest:
        raise ValueError(f"`{name}` must be in [1, {highest}] for this scheduler, got {t!r}")
    return t


def check_timesteps(ts: object, name: str = "ts") -> Sequence[Any]:
    """The sweep's ``ts``: a non-empty sequence of distinct values (each checked as ``t``)."""
    if isinstance(ts, (str, bytes)) or not isinstance(ts, Sequence) or not ts:
        raise ValueError(f"`{name}` must be a non-empty sequence of int timesteps, got {ts!r}")
    if len(set(ts)) != len(ts):
        raise ValueError(f"`{name}` must be distinct, got {ts!r}")
    return ts


def reconstruction_check(
    model: object,
    scheduler: Any,
    forget: Tensor,
    reference: Tensor | None,
    *,
    t: int = 250,
    similarity: str | Similarity = "ssim",
    num_inference_steps: int = 50,
    noise_draws: int = 4,
    percentile: float = 0.05,
    confidence: float = 0.95,
    data_range: tuple[float, float] = (-1.0, 1.0),
    conditioning: Mapping[str, Any] | None = None,
    clip_sample: bool | None = None,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> list[CheckResult]:
    """Per forget image: how well it is reconstructed from timestep ``t``, against non-members.

    Args:
        model: a diffusers model or a callable ``model(x_t, timesteps) -> prediction`` in the
            scheduler's ``prediction_type`` (``siss.audit.sampling.prediction_fn``).
        scheduler: the model's diffusers scheduler (VP or flow matching); not modified.
        forget: ``(M, *S)`` finite floating images in ``data_range``, on the model's device.
        reference: ``(R, *S)`` comparable non-member images, or ``None`` / ``R = 0`` (the
            percentile is then not measured, with the reason).
        t: training timestep to noise to, an int in ``[1, T - 1]`` (``[1, T]`` for flow
            matching); the paper's 250 of 1000 by default.
        similarity: ``"ssim"``, ``"neg_mse"`` or a callable ``(a, b) -> (N,)`` (module
            docstring).
        num_inference_steps: fixes DDIM's stride ``T // num_inference_steps``.
        noise_draws: noise draws per image (``>= 1``); the similarity is their mean.
        percentile: ``p`` of the verdict, in ``(0, 1)``.
        confidence: level of every interval.
        data_range: ``(lo, hi)`` of the images.
        conditioning: one conditioning shared by every image (1-row tensors).
        clip_sample: override the scheduler config's ``clip_sample`` (VP).
        batch_size: rows per model call.
        generator: source of the noise seeds (each row's noise depends on its seed only).
        progress: a tqdm bar over the rows.

    Returns:
        One ``CheckResult("reconstruction", i, {"similarity", "percentile"}, held, reason,
        details)`` per forget image; ``details`` holds ``t``, the per-draw similarities and the
        reference quantile.

    Raises:
        ValueError, TypeError: naming the argument, before any model call.
    """
    forget = check_images(forget, "forget")
    if reference is not None:
        reference = check_images(reference, "reference", rows=0, like=forget)
    lo, hi = check_range(data_range)
    similarity_fn, similarity_name = _similarity(similarity, (lo, hi), tuple(forget.shape[1:]))
    noise_draws = check_int(noise_draws, "noise_draws")
    num_inference_steps = check_int(num_inference_steps, "num_inference_steps")
    batch_size = check_int(batch_size, "batch_size")
    percentile = check_fraction(percentile, "percentile")
    confidence = check_fraction(confidence, "confidence")
    check_generator(generator)
    sampler, _, _ = sampler_for(scheduler, num_inference_steps, clip_sample, forget.device)
    total = int(scheduler.config.num_train_timesteps)
    t = check_timestep(t, scheduler)
    check_model_device(model, forget, "forget")
    conditioning = check_conditioning(conditioning, "conditioning", rows=None)

    num_forget = forget.shape[0]
    images = forget
    if reference is not None and len(reference):
        images = torch.cat([forget, reference.to(forget.device, forget.dtype)])
    rows = images.repeat_interleave(noise_draws, dim=0)  # image-major: (K * D, *S)
    seeds = sample_seeds(rows.shape[0], generator)
    values = torch.empty(rows.shape[0], dtype=torch.float64)

    with (
        eval_mode(model),
        torch.inference_mode(),
        progress_bar(rows.shape[0], f"reconstruction from t={t}", progress) as bar,
    ):
        for start in range(0, rows.shape[0], batch_size):
            batch = rows[start : start + batch_size]
            out = reconstruct(
                model,
                scheduler,
                batch,
                t=t,
                num_inference_steps=num_inference_steps,
                conditioning=conditioning,
                clip_sample=clip_sample,
                seeds=seeds[start : start + batch_size],
            )
            score = similarity_fn(out, batch)
            if not isinstance(score, Tensor) or score.shape != (batch.shape[0],):
                raise ValueError(
                    f"`similarity` must return a ({batch.shape[0]},) tensor, got "
                    f"{getattr(score, 'shape', type(score).__name__)}"
                )
            values[start : start + batch.shape[0]] = score.detach().double().cpu()
            bar.update(batch.shape[0])

    per_image = values.reshape(-1, noise_draws)
    means = per_image.mean(1)  # NaN if any draw is NaN
    reference_means = means[num_forget:] if reference is not None else None
    results = []
    for i in range(num_forget):
        draws = per_image[i]
        details: dict[str, Any] = {
            "t": t,
            "similarity": similarity_name,
            "draws": draws.tolist(),
            "steps": math.ceil(t / (total // sampler.num_inference_steps)),
            "reference_values": (
                [float(v) for v in reference_means.tolist()] if reference_means is not None else []
            ),
        }
        if not bool(torch.isfinite(draws).all()):
            why = (
                f"{int((~torch.isfinite(draws)).sum())} of {noise_draws} reconstructions are "
                "non-finite (a diverged model?)"
            )
            results.append(
                CheckResult(
                    "reconstruction",
                    i,
                    {
                        "similarity": Estimate.missing(
                            why, "higher", n=noise_draws, status="non-finite"
                        ),
                        "percentile": Estimate.missing(why, "higher", status="non-finite"),
                    },
                    None,
                    f"undecided: {why}",
                    details,
                )
            )
            continue
        mean, low, high = t_interval(draws, confidence)
        if noise_draws > 1:
            note = (
                f"mean {similarity_name} over {noise_draws} noise draws from t={t}; Student-t "
                "interval over the draws"
            )
        else:
            note = f"{similarity_name} of one noise draw from t={t}: no interval (noise_draws=1)"
        estimate = Estimate(
            mean, low, high, noise_draws, "higher", note=note, confidence=confidence
        )
        rank, verdict, reason, more = rank_against_reference(
            mean,
            reference_means,
            held_when="higher",
            percentile=percentile,
            confidence=confidence,
            statistic=f"reconstruction similarity (t={t})",
        )
        details.update(more)
        results.append(
            CheckResult(
                "reconstruction",
                i,
                {"similarity": estimate, "percentile": rank},
                held_of(verdict),
                reason,
                details,
                verdict,
            )
        )
    return results


def reconstruction_sweep(
    model: object,
    scheduler: Any,
    forget: Tensor,
    reference: Tensor | None,
    *,
    ts: Sequence[int] = (50, 100, 250, 500, 750),
    confidence: float = 0.95,
    **kwargs: Any,
) -> list[CheckResult]:
    """``reconstruction_check`` at each ``t`` in ``ts``, one result per forget image.

    Each ``t``'s intervals are at the Bonferroni-corrected level ``1 - (1 - confidence) /
    len(ts)``, so that the sweep's verdict holds at ``confidence``: held if held at some ``t``,
    not held if not held at every ``t``, undecided otherwise.

    Args:
        ts: distinct timesteps (each as ``t`` of ``reconstruction_check``), non-empty.
        confidence: the sweep's overall level.
        **kwargs: the other arguments of ``reconstruction_check``.

    Returns:
        One ``CheckResult("reconstruction_sweep", i, statistics, held, reason, details)`` per
        forget image, statistics ``"similarity@t=<t>"`` and ``"percentile@t=<t>"`` for each
        ``t``, ``details["per_t"]`` the per-``t`` reasons and details.
    """
    check_timesteps(ts)
    confidence = check_fraction(confidence, "confidence")
    level = 1 - (1 - confidence) / len(ts)
    per_t = {
        t: reconstruction_check(
            model, scheduler, forget, reference, t=t, confidence=level, **kwargs
        )
        for t in ts
    }
    results = []
    for i in range(len(per_t[ts[0]])):
        statistics: dict[str, Estimate] = {}
        verdicts: list[Verdict] = []
        details = {}
        for t in ts:
            result = per_t[t][i]
            statistics[f"similarity@t={t}"] = result.statistics["similarity"]
            statistics[f"percentile@t={t}"] = result.statistics["percentile"]
            verdicts.append(result.verdict)
            details[str(t)] = {
                "held": result.held,
                "verdict": result.verdict,
                "reason": result.reason,
                **result.details,
            }
        if "held" in verdicts:
            word: Verdict = "held"
        elif "overshot" in verdicts:
            word = "overshot"
        elif all(v == "not held" for v in verdicts):
            word = "not held"
        else:
            word = "undecided"
        pairs = list(zip(ts, verdicts, strict=True))
        reason = (
            f"{word}: held at t in {[t for t, v in pairs if v == 'held']}, overshot at "
            f"{[t for t, v in pairs if v == 'overshot']}, not held at "
            f"{[t for t, v in pairs if v == 'not held']}; each t at the Bonferroni level "
            f"{level:.4g} (overall {confidence:.0%}): held if held at some t, else overshot if "
            "overshot at some t, not held if not held at every t"
        )
        first = per_t[ts[0]][i].details
        needed, total = first.get("references_to_decide", 0), first.get("reference_n", 0)
        if needed > total:
            reason += (
                f"; with {total} references no t can reach held or overshot at this level (each "
                f"needs at least {needed}): this test can only say not held or undecided"
            )
        results.append(
            CheckResult(
                "reconstruction_sweep",
                i,
                statistics,
                held_of(word),
                reason,
                {"per_t": details, "ts": list(ts)},
                word,
            )
        )
    return results
