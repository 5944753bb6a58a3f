"""When to stop unlearning: when the forget set is denoised like data the model never saw.

Retraining without ``A`` does not make ``A`` *unlikely*; it makes ``A`` look like any image the
model did not train on. A forget image's denoising error (Carlini et al.'s 2023 loss attack, the
statistic of ``siss.audit``'s membership check) ranks it among comparable non-member images: a
memorized image sits at percentile ~0 (denoised better than every non-member), a retrained model
puts it where non-members sit (the digits pair's retrained model: 0.46-0.56 at ``t`` = 50, 100,
250, 500), and unlearning that goes on past that point ranks it above the non-members, the
"overshot" tail the audit reports. ``NonmemberStop`` measures that percentile every few steps and
says when it reaches ``target`` (the non-members' median by default): the point where continuing
would move the forget set from "like retrain" to "treated specially".

In a loop built on ``siss.Unlearner``::

    stop = NonmemberStop(unet, noise_scheduler, forget_images, reference_images)
    stop.start()  # scores the references once, before the first step
    for step, (batch, forget_batch) in enumerate(paired_batches(...), 1):
        unlearner.step(batch, forget_batch)
        check = stop(step)
        if check is not None and stop.steer(unlearner, check):
            break

``rule`` says what a check does besides measuring: ``"mean"`` stops the run once the mean
percentile over the noise levels reaches ``target``; ``"per_level"`` turns the forget term off
at the levels already there and stops once every level is; ``"level"`` never stops the run but
drives the forget term to the non-members' level (``steer`` applies it); ``"anneal"`` never stops
the run either but turns the forget term off for good once the mean reaches ``target``, leaving
the keep term alone (with the teacher target, naive deletion) for the remaining steps;
``"track"`` never stops the run but weighs the forget term at each noise level by how long that
level has been below or past ``target``, reversing it where a level stays past.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from siss._checks import check_choice, check_fraction, check_int, check_tensor
from siss.targets import eps_error_scale, eps_from_prediction

if TYPE_CHECKING:
    from siss.recipe import Unlearner

__all__ = [
    "DEFAULT_STOP_TIMESTEPS",
    "LEVEL_TIMESTEPS",
    "STOP_RULES",
    "TRACK_GAIN",
    "TRACK_LIMIT",
    "TRACK_TIMESTEPS",
    "NonmemberCheck",
    "NonmemberStop",
]

DEFAULT_STOP_TIMESTEPS: tuple[int, ...] = (50, 100, 250, 500)
"""Noise levels the statistic averages over, as ranks on a 1000-step grid (the 50th, 100th, ...
least noisy entry; scaled to other grid lengths). The membership check's (50, 100) and two
mid-range levels, where the issue-23 audit found today's unlearning overshooting first."""


LEVEL_TIMESTEPS: tuple[int, ...] = (10, 25, 50, 100, 175, 250, 375, 500, 750, 950)
"""Noise ranks to measure for ``NonmemberStop.forget_level``: the default four and six more,
so that the level follows the error's shape over ``t``."""

STOP_RULES: tuple[str, ...] = ("mean", "per_level", "level", "anneal", "track")
"""``NonmemberStop``'s ``rule`` values (the commands' ``--stop_rule`` choices)."""

TRACK_TIMESTEPS: tuple[int, ...] = LEVEL_TIMESTEPS[1:]
"""Noise ranks ``rule="track"`` steers: ``LEVEL_TIMESTEPS`` but the least noisy (rank 10, below
any level an audit ranks at). Steered too, it went past the target early, and its weight,
reversed, held the next levels below it (docs/results.md, "Each noise level steered")."""

TRACK_GAIN = 2.0
"""``rule="track"``'s integral gain: a check at percentile 1 (target 0.5) takes a level's
weight from 1 to 0, a second one to -1. Set a priori, not tuned; gain 1 was tried on the digits
pair and settled the levels below the target with a worse quality row (docs/results.md)."""

TRACK_LIMIT = 1.0
"""``rule="track"``'s weights stay in ``[-TRACK_LIMIT, TRACK_LIMIT]``: at most the forget term
as configured, at least that term reversed. A limit of 2 was tried on the digits pair: FID-style
31.6 against 21.4 before unlearning (docs/results.md)."""


class NonmemberCheck(NamedTuple):
    """One measurement of ``NonmemberStop``.

    Attributes:
        step: the optimizer step it was taken after (0: before unlearning).
        percentile: the forget set's mean percentile among the references, averaged over the
            noise levels; NaN when the model returned a non-finite prediction on a forget image.
        per_timestep: the same per noise level, in ``timesteps`` order.
        entered: ``percentile >= target`` (``False`` when not measured).
        per_timestep_start_references: ``per_timestep`` against the references as they were
            scored at the start: how far the references themselves moved.
    """

    step: int
    percentile: float
    per_timestep: tuple[float, ...]
    entered: bool
    per_timestep_start_references: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        """The fields, JSON-ready (the tuples as lists)."""
        return {
            name: list(value) if isinstance(value, tuple) else value
            for name, value in self._asdict().items()
        }


def _rows(conditioning: Mapping[str, Any], index: Tensor) -> dict[str, Any]:
    """The conditioning's rows for image ``index`` (a 1-row tensor is shared by every image)."""
    taken = {}
    for name, value in conditioning.items():
        if isinstance(value, Tensor) and value.ndim > 0:
            taken[name] = (
                value.expand(len(index), *value.shape[1:]) if len(value) == 1 else value[index]
            )
        else:
            taken[name] = value
    return taken


def _unwrapped(model: Any) -> Any:
    """``model``'s call with a diffusers output's ``.sample`` (or a tuple's first item) taken."""

    def predict(noisy: Tensor, timesteps: Tensor, **conditioning: Any) -> Tensor:
        output = model(noisy, timesteps, **conditioning)
        if isinstance(output, tuple | list):
            return output[0]
        return getattr(output, "sample", output)

    return predict


class NonmemberStop:
    """Stop when the forget images' denoising error ranks like a non-member's (issue 23 §2).

    The statistic, per noise level ``t``: each image's noise-prediction error
    ``||eps_m - eps_hat(gamma_t x + sigma_t eps_m, t)||^2 / D`` averaged over ``noise_draws``
    draws ``eps_m``. The draws are drawn once and shared by every image and every check (common
    random numbers): a change between two checks is the model's, not the noise's, and forget and
    reference images are compared on the same noise. The forget set's percentile at ``t`` is
    the fraction of (forget image, reference) pairs in which the reference's error is lower
    (ties count half); ``percentile`` averages it over the levels.

    The references are scored again at every check, under the model as it is then: the
    audit ranks the forget image among references scored by the *final* model, and unlearning
    one image moves images like it too. On the digits pair (docs/results.md, "Stopping at the
    non-member level") the T-shirt variants' own errors rose so much during SISS that, against
    their scores at the start, the T-shirt read 0.60 where against their current scores it read
    0.21. A check costs ``R + k`` images' rows (``rescore_references=False``: ``k``, with the
    start's scores kept), so keep ``R`` to a few dozen; each check also records the percentile
    against the start's scores (``per_timestep_start_references``).

    Args:
        model: the diffusers model being unlearned (any model ``siss.adapters.adapter_for``
            takes; a DDP wrapper is looked through), or a callable
            ``(x_t (B, ...), t (B,), **conditioning) -> prediction (B, ...)``.
        noise_scheduler: the diffusers scheduler it trains with (forward process and prediction
            type, as ``siss.Unlearner`` reads them).
        forget: the images to forget ``(k, C, H, W)`` in the model's input space (latents for a
            latent model).
        references: comparable images the model never trained on ``(R, C, H, W)``, ``R >= 2``.
            They must not be the references an audit will judge the result on: a rule stopped on
            the audit's own references would pass it by construction.
        timesteps: noise levels as ranks on a 1000-step grid (default
            ``DEFAULT_STOP_TIMESTEPS``; ``LEVEL_TIMESTEPS`` with ``rule="level"`` and
            ``TRACK_TIMESTEPS`` with ``"track"``, so that the rule follows the error's shape
            over ``t``).
        noise_draws: draws per level and image.
        target: the percentile at which ``entered`` becomes true (0.5: the non-members' median,
            where retraining puts a forget image on average).
        every: check every ``every`` optimizer steps (``__call__`` returns ``None`` otherwise).
        seed: seed of the noise draws.
        conditioning: the forget images' model inputs (e.g. ``{"encoder_hidden_states":
            embeds}``), each with ``k`` rows or 1 (shared).
        reference_conditioning: the references' inputs (``R`` rows or 1); default
            ``conditioning`` when it is shared (1 row), else none.
        batch_size: rows per model call.
        autocast: a context manager factory for the model call (``accelerator.autocast``), or
            ``None``.
        rescore_references: score the references at every check (default), or once, at the
            start.
        rule: what a check does besides measuring, applied by ``steer`` (one of
            ``STOP_RULES``). ``"mean"``: ``entered`` when the mean percentile over the levels
            reaches ``target``, and the run stops there. ``"per_level"``: ``entered`` only when
            *every* level's percentile has, not their mean; until then the forget term is off
            at the noise levels already there (``forget_timestep_weights``), since unlearning
            does not reach every level at once. ``"level"``: ``entered`` as with ``"mean"``,
            but the run never stops; the forget term is driven to the non-members' level
            (``forget_level``) and held there, because stopping does not bring back the levels
            that already went past it (docs/results.md). ``"anneal"``: ``entered`` as with
            ``"mean"``; from then on the forget term is off at every ``t`` and the run goes on
            to its last step with the keep term alone (issue 23 §2's alternative to stopping:
            with the teacher target that is naive deletion, whose fixed point is retraining's).
            ``"track"``: ``entered`` as with ``"mean"``, but the run never stops; each level's
            forget weight follows its own percentile (``tracking_weights``: an integral
            controller, lowered while the level is past ``target`` and reversed, pulling the
            level back, if it stays there), so that every level, not only their mean, settles
            at ``target``.

    Raises:
        ValueError: ``rule`` not one of ``STOP_RULES``.

    Examples:
        >>> from diffusers import DDPMScheduler, UNet2DModel
        >>> unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1,
        ...     block_out_channels=(8, 8), norm_num_groups=4, layers_per_block=1,
        ...     down_block_types=("DownBlock2D", "DownBlock2D"),
        ...     up_block_types=("UpBlock2D", "UpBlock2D"))
        >>> stop = NonmemberStop(unet, DDPMScheduler(), torch.zeros(1, 1, 8, 8),
        ...     torch.randn(16, 1, 8, 8), noise_draws=2, every=5)
        >>> check = stop.start()
        >>> check.step, 0.0 <= check.percentile <= 1.0, len(check.per_timestep)
        (0, True, 4)
        >>> stop(3) is None, stop(5).step
        (True, 5)
        >>> NonmemberStop(unet, DDPMScheduler(), torch.zeros(1, 1, 8, 8),
        ...     torch.randn(16, 1, 8, 8), rule="level").timesteps == LEVEL_TIMESTEPS
        True
    """

    def __init__(
        self,
        model: nn.Module,
        noise_scheduler: Any,
        forget: Tensor,
        references: Tensor,
        *,
        timesteps: Sequence[int] | None = None,
        noise_draws: int = 8,
        target: float = 0.5,
        every: int = 10,
        seed: int = 0,
        conditioning: Mapping[str, Any] | None = None,
        reference_conditioning: Mapping[str, Any] | None = None,
        batch_size: int = 256,
        autocast: Any | None = None,
        rescore_references: bool = True,
        rule: Literal["mean", "per_level", "level", "anneal", "track"] = "mean",
    ) -> None:
        from siss.adapters import adapter_for, prediction_type_from_scheduler
        from siss.adapters.schedulers import schedule_from_scheduler

        rule = check_choice(rule, "rule", STOP_RULES)
        self.rule = rule
        if timesteps is None:
            timesteps = {"level": LEVEL_TIMESTEPS, "track": TRACK_TIMESTEPS}.get(
                rule, DEFAULT_STOP_TIMESTEPS
            )
        forget = check_tensor(forget, "forget", min_dim=2)
        references = check_tensor(references, "references", min_dim=2)
        if references.shape[1:] != forget.shape[1:]:
            raise ValueError(
                f"`references` must be shaped like `forget` per image, got "
                f"{tuple(references.shape[1:])} and {tuple(forget.shape[1:])}"
            )
        if len(references) < 2 or len(forget) < 1:
            raise ValueError(
                f"`NonmemberStop` needs >= 1 forget image and >= 2 references, got "
                f"{len(forget)} and {len(references)}"
            )
        self.noise_draws = check_int(noise_draws, "noise_draws", minimum=1)
        self.every = check_int(every, "every", minimum=1)
        self.batch_size = check_int(batch_size, "batch_size", minimum=1)
        self.target = check_fraction(target, "target")
        ranks = [check_int(rank, "timesteps", minimum=0) for rank in timesteps]
        if not ranks or max(ranks) >= 1000:
            raise ValueError(f"`timesteps` must be ranks in 0..999, got {list(timesteps)}")
        self.model = model
        while isinstance(self.model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            self.model = self.model.module
        self.adapter = None
        try:
            self.adapter = adapter_for(self.model)
            self.predict = self.adapter.predict
        except TypeError:  # a plain callable (x_t, t, **conditioning) -> prediction
            self.predict = _unwrapped(self.model)
        self.prediction_type = prediction_type_from_scheduler(noise_scheduler)
        schedule = schedule_from_scheduler(noise_scheduler)
        length = len(schedule.sigma)
        order = schedule.sigma.argsort()  # least noisy first, whatever the grid's direction
        self.indices = order[[min(length - 1, round(rank * length / 1000)) for rank in ranks]]
        self.timesteps = tuple(ranks)
        # Each grid index follows the measured level nearest to it in log noise rank.
        grid_rank = torch.empty(length, dtype=torch.float64)
        grid_rank[order] = torch.arange(length, dtype=torch.float64) * 1000 / length
        measured = torch.tensor([float(min(rank, 999)) for rank in ranks], dtype=torch.float64)
        distance = (grid_rank.log1p()[:, None] - measured.log1p()[None, :]).abs()
        self.level_of_index = distance.argmin(1)  # (T,)
        self.grid_rank = grid_rank
        self.error_scale = eps_error_scale(self.prediction_type, schedule.gamma, schedule.sigma)
        device = forget.device
        self.gamma = schedule.gamma[self.indices].to(device, torch.float32)
        self.sigma = schedule.sigma[self.indices].to(device, torch.float32)
        self.model_timesteps = schedule.timesteps[self.indices].to(device)
        generator = torch.Generator().manual_seed(seed)
        draws = (len(ranks) * self.noise_draws, *forget.shape[1:])
        self.noise = torch.randn(draws, generator=generator).to(device)  # float32
        self.forget, self.references = forget, references.to(device)
        self.conditioning = dict(conditioning or {})
        if reference_conditioning is None:
            shared = all(
                not isinstance(v, Tensor) or v.ndim == 0 or len(v) == 1
                for v in self.conditioning.values()
            )
            reference_conditioning = self.conditioning if shared else {}
        self.reference_conditioning = dict(reference_conditioning)
        self.autocast = autocast
        self.rescore = bool(rescore_references)
        self.start_reference_errors: Tensor | None = None  # (levels, R), float64
        self.reference_errors: Tensor | None = None  # the last check's, (levels, R')
        self.history: list[NonmemberCheck] = []

    @property
    def per_level(self) -> bool:
        """Whether ``entered`` needs every level at ``target`` (``rule="per_level"``)."""
        return self.rule == "per_level"

    @torch.no_grad()
    def errors(self, images: Tensor, conditioning: Mapping[str, Any]) -> Tensor:
        """The statistic of ``images`` ``(N, C, H, W)``: ``(levels, N)`` float64 errors averaged
        over the draws, under the model as it is now (eval mode for the call)."""
        levels, draws = len(self.timesteps), self.noise_draws
        rows = len(images) * levels * draws
        out = torch.empty(rows, dtype=torch.float64, device=images.device)
        parameter = None if self.adapter is None else self.adapter._parameter()
        dtype = images.dtype if parameter is None else parameter.dtype  # bf16 weights: bf16 rows
        was_training = getattr(self.model, "training", False)
        if isinstance(self.model, nn.Module):
            self.model.eval()
        try:
            for start in range(0, rows, self.batch_size):
                row = torch.arange(start, min(start + self.batch_size, rows), device=images.device)
                image, draw = row // (levels * draws), row % (levels * draws)
                level = draw // draws
                gamma, sigma = self.gamma[level], self.sigma[level]
                noise = self.noise[draw]
                shape = (-1,) + (1,) * (images.ndim - 1)
                noisy = gamma.view(shape) * images[image].float() + sigma.view(shape) * noise
                noisy = noisy.to(dtype)
                inputs = _rows(conditioning, image)
                context = nullcontext() if self.autocast is None else self.autocast()
                with context:
                    output = self.predict(noisy, self.model_timesteps[level], **inputs)
                eps_hat = eps_from_prediction(output, noisy, gamma, sigma, self.prediction_type)
                out[row] = (noise.double() - eps_hat.double()).square().flatten(1).mean(1)
        finally:
            if was_training:
                self.model.train()
        return out.view(len(images), levels, draws).mean(2).T

    def _scored_references(self) -> Tensor:
        """The references' errors under the model as it is now, ``(levels, R')`` over the
        ``R'`` references with a finite error at every level."""
        errors = self.errors(self.references, self.reference_conditioning)
        finite = torch.isfinite(errors).all(0)
        if int(finite.sum()) < 2:
            raise ValueError(
                "fewer than 2 references have a finite denoising error under this model: no "
                "non-member level to stop at"
            )
        return errors[:, finite]

    def percentiles(self, forget_errors: Tensor, reference_errors: Tensor) -> Tensor:
        """Per level, the forget set's mean percentile among the references ``(levels,)``:
        ``forget_errors`` ``(levels, k)``, ``reference_errors`` ``(levels, R)``; NaN where a
        forget error is not finite."""
        forget = forget_errors.unsqueeze(2)  # (levels, k, 1)
        reference = reference_errors.unsqueeze(1)  # (levels, 1, R)
        below = (reference < forget).double().mean(2)
        share = below + 0.5 * (reference == forget).double().mean(2)
        share = torch.where(torch.isfinite(forget_errors), share, torch.nan)
        return share.mean(1)

    def check(self, step: int) -> NonmemberCheck:
        """Measures now (after optimizer step ``step``) and records the result."""
        if self.start_reference_errors is None or self.rescore:
            references = self._scored_references()
            if self.start_reference_errors is None:
                self.start_reference_errors = references
        else:
            references = self.start_reference_errors
        self.reference_errors = references
        forget = self.errors(self.forget, self.conditioning)
        per_level = self.percentiles(forget, references).tolist()
        start = self.percentiles(forget, self.start_reference_errors).tolist()
        percentile = sum(per_level) / len(per_level)
        reached = min(per_level) if self.per_level else percentile
        result = NonmemberCheck(
            step=step,
            percentile=percentile,
            per_timestep=tuple(per_level),
            entered=math.isfinite(percentile) and reached >= self.target,
            per_timestep_start_references=tuple(start),
        )
        self.history.append(result)
        return result

    def forget_timestep_weights(self, check: NonmemberCheck | None = None) -> Tensor:
        """Where the forget term should still act after ``check`` (default: the last one):
        ``(T,)`` float32 over the scheduler's grid, 0 at the grid indices whose nearest measured
        level (in log noise rank) has reached ``target``, 1 elsewhere (and everywhere before
        the first check, or at a level that could not be measured). With ``rule="track"``:
        each grid index takes its nearest level's ``tracking_weights``, in [-1, 1].

        Why: unlearning does not reach the non-member level at every noise level at once. On
        the digits pair SISS brought the mean percentile to 0.5 with the least noisy levels
        still below it and the middle ones past it (docs/results.md, "Stopping at the
        non-member level"). With the forget term off where a level has arrived, only the keep
        term acts there, which pulls the model back toward the teacher, so a level that went
        past the target comes back, while the levels still below it go on being forgotten.
        ``siss.Unlearner.restrict_forget`` takes the result.
        """
        check = check if check is not None else (self.history[-1] if self.history else None)
        if check is None:
            return torch.ones(len(self.level_of_index))
        if self.rule == "track":
            return self.tracking_weights(check)[self.level_of_index].float()
        per_level = torch.tensor(check.per_timestep, dtype=torch.float64)
        still = ~(per_level >= self.target)  # NaN: not measured, the forget term stays on
        return still[self.level_of_index].float()

    def tracking_weights(self, check: NonmemberCheck) -> Tensor:
        """``rule="track"``'s forget weight per measured level after ``check``: ``(levels,)``
        float64 in [-1, 1], an integral controller on each level's percentile.

        Every level starts at 1 (the forget term in full) and each check up to ``check`` adds
        ``TRACK_GAIN * (target - percentile)``, clipped to [-1, 1]: a level still below the
        target keeps its weight, one past it loses weight and, held past it, turns negative (the
        forget term reversed there: the forget set's error at that level is descended, pulled
        back). Replayed from ``history``, so a resumed run steers as an uninterrupted one.
        A level that could not be measured leaves its weight as it was.
        """
        weights = torch.ones(len(self.timesteps), dtype=torch.float64)
        for past in self.history:
            if past.step > check.step:
                break
            error = self.target - torch.tensor(past.per_timestep, dtype=torch.float64)
            weights = (weights + TRACK_GAIN * error.nan_to_num(0.0)).clamp(
                -TRACK_LIMIT, TRACK_LIMIT
            )
        return weights

    def forget_level(self) -> Tensor:
        """The non-member level of the forget term's squared error at every grid index:
        ``(T,)`` float32, for ``siss.Unlearner.set_forget_level``.

        At each measured level, the references' median denoising error at the last check
        (under the model as it was then), divided by ``siss.targets.eps_error_scale`` there,
        which turns a noise error into the error against the model's own target (what the
        loss's ``l_a`` is); between levels, interpolated linearly in log error against log noise
        rank, and held flat beyond the least and the most noisy level.

        Why: SISS's forget term is gradient *ascent*, which does not stop where retraining
        would have left the forget set: on the digits pair its error went past the non-members'
        at the middle noise levels before reaching them at the small ones, and stopping, or
        turning the term off per level, did not bring those back (docs/results.md). With the
        term driven to this level (``SISSLoss``'s ``forget_level``), a noise level that goes
        past it is pulled back. Measure more levels than the default four (``timesteps``, e.g.
        ``LEVEL_TIMESTEPS``) for a level that follows the error's shape over ``t``.

        Raises:
            ValueError: before the first check.
        """
        if self.reference_errors is None:
            raise ValueError("`forget_level` needs a check first (`start()`)")
        ranks = torch.tensor(self.timesteps, dtype=torch.float64).clamp(max=999).log1p()
        # in the loss's own units at each measured level, so that what is held flat beyond the
        # measured levels is an error the loss can reach (a noise error held flat and divided by
        # a scale that vanishes with the signal at the noisiest indices of a v or flow schedule
        # was 30 to 1e8 times the references' error there)
        scale = self.error_scale[self.indices].double().clamp(min=1e-12)
        median = (self.reference_errors.median(1).values / scale).clamp(min=1e-30).log()
        order = ranks.argsort()
        ranks, median = ranks[order], median[order]
        where = self.grid_rank.log1p().clamp(ranks[0], ranks[-1])
        if len(ranks) == 1:
            log_error = median.expand(len(where))
        else:
            right = torch.searchsorted(ranks, where).clamp(1, len(ranks) - 1)
            left = right - 1
            share = (where - ranks[left]) / (ranks[right] - ranks[left]).clamp(min=1e-12)
            log_error = median[left] + share * (median[right] - median[left])
        level = log_error.exp()
        return level.clamp(min=1e-30, max=torch.finfo(torch.float32).max).float()

    def stops(self, check: NonmemberCheck | None = None) -> bool:
        """Whether the run ends at ``check`` (default: the last one; ``False`` before any):
        ``check.entered``, except with ``rule="level"``, ``"anneal"`` or ``"track"``, which go
        on to the last step. ``steer``'s answer, without touching an unlearner (e.g. for the
        last check of a resumed run, already steered)."""
        check = check if check is not None else (self.history[-1] if self.history else None)
        return check is not None and check.entered and self.rule not in ("level", "anneal", "track")

    @property
    def annealed_at(self) -> int | None:
        """The step at which ``rule="anneal"`` turned the forget term off: the first check that
        ``entered`` (it stays off if the forget set falls back below ``target``); ``None``
        before that, and with any other rule."""
        if self.rule != "anneal":
            return None
        return next((check.step for check in self.history if check.entered), None)

    @property
    def annealed(self) -> bool:
        """Whether ``rule="anneal"`` has turned the forget term off (``annealed_at`` is set)."""
        return self.annealed_at is not None

    def steer(self, unlearner: Unlearner, check: NonmemberCheck) -> bool:
        """Does to ``unlearner``'s forget term what ``rule`` says after ``check``, and says
        whether the run stops now (``stops``).

        ``"per_level"``: ``unlearner.restrict_forget(forget_timestep_weights(check))``, a
        ``(T,)`` 0/1 mask over the scheduler's grid, the term off where the forget set ranks
        like a non-member. ``"level"``: ``unlearner.set_forget_level(forget_level())``, the
        ``(T,)`` non-member level of the last check. ``"anneal"``, once ``annealed``:
        ``unlearner.restrict_forget`` with zeros, the forget term off at every ``t`` for the
        rest of the run. ``"track"``: ``unlearner.restrict_forget(forget_timestep_weights(check))``,
        the ``(T,)`` signed weights of ``tracking_weights``. ``"mean"``: nothing. Call it after
        every check (``start`` included), so that the forget term follows the newest
        measurement.

        Args:
            unlearner: the ``siss.Unlearner`` being run (anything with its
                ``restrict_forget`` and ``set_forget_level``).
            check: the check just taken (``check``, ``start`` or ``__call__``'s result).

        Returns:
            ``True`` when the run should stop at ``check``: it has ``entered`` and the rule is
            ``"mean"`` or ``"per_level"``.

        Examples:
            >>> from diffusers import DDPMScheduler
            >>> class Recorder:  # stands in for siss.Unlearner: says what it was told
            ...     def restrict_forget(self, weights):
            ...         print(f"forget term on at {int(weights.sum())} of {len(weights)} t")
            >>> stop = NonmemberStop(lambda x, t: torch.zeros_like(x), DDPMScheduler(),
            ...     torch.zeros(1, 1, 4, 4), torch.randn(8, 1, 4, 4), rule="per_level")
            >>> check = stop.start()  # predicting 0 ranks every image alike: percentile 0.5
            >>> check.percentile, stop.steer(Recorder(), check)
            forget term on at 0 of 1000 t
            (0.5, True)
        """
        if self.rule in ("per_level", "track"):
            unlearner.restrict_forget(self.forget_timestep_weights(check))
        elif self.rule == "level":
            unlearner.set_forget_level(self.forget_level())
        elif self.annealed:
            unlearner.restrict_forget(torch.zeros(len(self.level_of_index)))
        return self.stops(check)

    def start(self) -> NonmemberCheck:
        """Scores the references and the forget set before unlearning (step 0)."""
        return self.check(0)

    def state_dict(self) -> dict[str, Any]:
        """The references' scores at the start and the checks so far: what a resumed run needs
        to go on as an uninterrupted one would (``accelerator.register_for_checkpointing``
        takes the object)."""
        return {
            "start_reference_errors": self.start_reference_errors,
            "history": [check._asdict() for check in self.history],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores ``state_dict``'s result (the scores may be nested lists)."""
        errors = state["start_reference_errors"]
        if errors is not None:
            errors = torch.as_tensor(errors, dtype=torch.float64, device=self.forget.device)
        self.start_reference_errors = errors
        self.history = [
            NonmemberCheck(
                **{
                    **check,
                    "per_timestep": tuple(check["per_timestep"]),
                    "per_timestep_start_references": tuple(check["per_timestep_start_references"]),
                }
            )
            for check in state["history"]
        ]

    def __call__(self, step: int) -> NonmemberCheck | None:
        """``check(step)`` every ``every`` steps, else ``None``."""
        if step % self.every:
            return None
        return self.check(step)
