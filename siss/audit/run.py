"""Run an unlearning audit: every requested check of one model against its forget images.

``audit`` is the orchestrator behind ``python -m siss.audit``. It validates its inputs once,
then runs each requested check through a small runner of its own (the table ``_RUNNERS``: check
name to runner, each given one shared context and that check's options), which calls the
check's public function (``siss.audit.sampling.generate``, ``generation_check``,
``likelihood_check``, ``reconstruction_check``, ``reconstruction_sweep``, ``membership_check``,
``memorization_check``) with one seeded generator each; it returns an ``AuditReport`` whose
``config`` records what it was run with.

Checks (``checks=``; the default runs the first five, plus ``"memorization"`` when text
conditioning and its null conditioning are given):

* ``"generation"``: ``num_samples`` DDIM samples (``num_inference_steps``), the rate at which
  they reproduce each forget image (exact Clopper-Pearson interval) and its nearest samples;
* ``"likelihood"``: the PF-ODE NLL in bits/dim and its percentile among the reference NLLs;
* ``"reconstruction"``: noise to ``t = 250`` (``T / 4`` for a scheduler of ``T`` steps),
  denoise, SSIM against the reference's;
* ``"reconstruction_sweep"``: the same at ``t in (50, 100, 250, 500, 750)`` (those fractions of
  ``T``), Bonferroni-corrected: it needs 104 reference images to say "held" at 5%;
* ``"membership"``: the loss-based attack (Carlini et al.), per-image percentile and conformal
  p-value, and the set-level AUC / TPR@1%FPR when members and non-members are both available;
* ``"memorization"``: Wen et al.'s noise-magnitude score (text-conditional models only).

Defaults, chosen for the 16x16 digits models on a CPU (each overridable per check, see
``**options``): 1,000 samples (a rate of 0.5% is then missed with probability 0.7%), 50 DDIM
steps, batch 64; the checks' own defaults otherwise (likelihood: 4 Hutchinson repeats of each
forget image, ``rtol = atol = 1e-5``; reconstruction: 4 noise draws, SSIM; membership: loss at
``t = 50, 100`` with 8 draws; percentile 5% and confidence 95% throughout). "Held" and
"overshot" need enough reference images: at least 72 for the likelihood and reconstruction
percentiles (so that an interval can exclude 5%; 104 for the sweep), 19 for the membership
p-value, 100 for TPR@1%FPR. With fewer, a percentile check can only say "not held" or
"undecided", and its reason says so.

Seeds: each check draws from its own ``torch.Generator`` seeded from ``(seed, check)``
(``numpy.random.SeedSequence``), so a check gives the same numbers whichever other checks run.

What a figure needs is kept JSON-serialisable: the generation results' ``details`` hold the
gallery (indices into the samples) and, for images of at most 4,096 values, the gallery images
themselves (``"gallery_images"``, nested lists in the data range, 4 decimals).
"""

from __future__ import annotations

import inspect
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from siss.audit._inputs import check_fraction, check_int
from siss.audit._models import config_sample_shape, model_device_dtype, scheduler_kind
from siss.audit.report import AuditReport, CheckResult, Estimate

__all__ = [
    "ALL_CHECKS",
    "DEFAULT_CHECKS",
    "audit",
    "check_option_values",
    "check_options",
    "check_seed",
    "parse_options",
]

ALL_CHECKS = (
    "generation",
    "likelihood",
    "reconstruction",
    "reconstruction_sweep",
    "membership",
    "memorization",
)
"""The checks ``audit`` can run (its ``checks=``), in the order its report lists them; a check's
position also seeds its generator (``check_seed``).

Examples:
    >>> ALL_CHECKS
    ('generation', 'likelihood', 'reconstruction', 'reconstruction_sweep', 'membership',
     'memorization')
"""
DEFAULT_CHECKS = ALL_CHECKS[:5]
"""The checks ``audit`` runs with ``checks=None``: all but ``"memorization"``, which it adds when
``conditioning`` holds ``encoder_hidden_states`` and ``null_conditioning`` is given.

Examples:
    >>> DEFAULT_CHECKS
    ('generation', 'likelihood', 'reconstruction', 'reconstruction_sweep', 'membership')
"""
# Options the orchestrator passes itself (they cannot be set through ``**options``).
_RESERVED = {
    "model",
    "eps_model",
    "scheduler",
    "schedule",
    "forget",
    "reference",
    "members",
    "samples",
    "generator",
    "progress",
    "conditioning",
    "reference_conditioning",
    "member_conditioning",
    "null_conditioning",
    "prompt_embeds",
    "null_embeds",
    "latents",
    "image",
    "num_samples",
    "device",
}
GALLERY_IMAGE_LIMIT = 4096
# The reconstruction sweep's noise levels as fractions of T: (50, 100, 250, 500, 750) of 1000.
SWEEP_FRACTIONS = (0.05, 0.1, 0.25, 0.5, 0.75)


def parse_options(values: Sequence[str], flag: str = "--option") -> dict[str, dict[str, Any]]:
    """Command-line ``CHECK.KEY=VALUE`` strings as ``audit``'s per-check options.

    ``VALUE`` is read as JSON (a list becomes a tuple), else kept as a bare string:
    ``["likelihood.repeats=8", "reconstruction_sweep.ts=[100,500]"]`` gives
    ``{"likelihood": {"repeats": 8}, "reconstruction_sweep": {"ts": (100, 500)}}``. A malformed
    item, an unknown check or an option the check does not take (``check_options``) raises
    ``ValueError`` naming ``flag``, so that a command fails before its long work.
    """
    options: dict[str, dict[str, Any]] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        check, dot, name = key.partition(".")
        if not (sep and dot and check and name):
            raise ValueError(f"{flag} {item!r}: expected CHECK.KEY=VALUE")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw  # a bare string
        options.setdefault(check, {})[name] = tuple(value) if isinstance(value, list) else value
    try:
        check_options(options)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{flag}: {error}") from error
    return options


def check_seed(seed: int, check: str) -> int:
    """The seed of ``check``'s generator for the audit seed ``seed``."""
    index = ALL_CHECKS.index(check)
    return int(np.random.SeedSequence([int(seed), index]).generate_state(1, np.uint64)[0]) >> 1


def _functions() -> dict[str, Callable[..., Any]]:
    from siss.audit.generation import generation_check
    from siss.audit.likelihood import likelihood_check
    from siss.audit.membership import membership_check
    from siss.audit.memorization import memorization_check
    from siss.audit.reconstruction import reconstruction_check, reconstruction_sweep
    from siss.audit.sampling import generate

    return {
        "sampling": generate,
        "generation": generation_check,
        "likelihood": likelihood_check,
        "reconstruction": reconstruction_check,
        "reconstruction_sweep": reconstruction_sweep,
        "membership": membership_check,
        "memorization": memorization_check,
    }


_FRACTION_OPTIONS = frozenset({"percentile", "confidence", "level", "fpr"})


def _count_options() -> dict[str, int]:
    from siss.audit.membership import MIN_BOOTSTRAP

    counts = ("repeats", "batch_size", "noise_draws", "num_inference_steps", "num_steps")
    return {**dict.fromkeys(counts, 1), "num_probes": 1, "gallery": 0, "bootstrap": MIN_BOOTSTRAP}


def check_option_values(
    options: Mapping[str, Mapping[str, Any]], scheduler: Any | None = None
) -> None:
    """The values of ``audit``'s per-check options, checked before any check runs, each by the
    rule its check applies (the same helpers): fractions in (0, 1), counts at their minimum,
    ``membership.score``, ``generation.threshold``, and, with ``scheduler``, the given
    ``reconstruction.t`` and sweep's ``ts`` inside its training schedule (their defaults are
    scaled to it). A ``ValueError``/``TypeError`` naming ``check.option``; what needs the data
    or the model (a ``threshold`` against a custom ``features``) is still checked by the check.
    """
    from siss.audit.generation import check_threshold
    from siss.audit.reconstruction import check_timestep, check_timesteps

    counts = _count_options()
    for check, given in options.items():
        for key, value in given.items():
            name = f"{check}.{key}"
            if key in _FRACTION_OPTIONS:
                check_fraction(value, name)
            elif key in counts:
                check_int(value, name, counts[key])
        if check == "generation" and given.get("threshold") is not None:
            check_threshold(given["threshold"], "generation.threshold")
        if check == "membership" and given.get("score", "loss") not in ("loss", "pia"):
            raise ValueError(f"`membership.score` must be 'loss' or 'pia', got {given['score']!r}")
        if check == "reconstruction" and "t" in given and scheduler is not None:
            check_timestep(given["t"], scheduler, "reconstruction.t")
        if check == "reconstruction_sweep" and "ts" in given:
            ts = check_timesteps(given["ts"], "reconstruction_sweep.ts")
            for t in ts if scheduler is not None else ():
                check_timestep(t, scheduler, "reconstruction_sweep.ts")


def check_options(options: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``audit``'s per-check options, checked without running anything.

    Returns ``{check: kwargs}``; raises ``TypeError`` unless every key is a known check (or
    ``"sampling"``) and every kwarg a parameter of that check's function, and ``ValueError`` for
    a kwarg the orchestrator sets itself.
    """
    functions = _functions()
    out: dict[str, dict[str, Any]] = {}
    for name, kwargs in options.items():
        if name not in functions:
            raise TypeError(
                f"audit() got an unexpected keyword argument {name!r}; per-check options are "
                f"passed as dicts named after the check: {sorted(functions)}"
            )
        if not isinstance(kwargs, Mapping):
            raise TypeError(f"`{name}` must be a dict of options, got {type(kwargs).__name__}")
        signature = inspect.signature(functions[name])
        accepts_more = any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()
        )
        for key in kwargs:
            if key in _RESERVED:
                raise ValueError(
                    f"`{name}={{{key!r}: ...}}` is set by audit() itself; pass it as audit()'s "
                    "own argument (seed, progress, conditioning, members, num_samples, ...)"
                )
            if key not in signature.parameters and not accepts_more:
                known = sorted(set(signature.parameters) - _RESERVED)
                raise TypeError(f"`{name}` has no option {key!r}; its options are {known}")
        out[name] = dict(kwargs)
    return out


def _check_images(value: object, name: str, shape: tuple[int, ...] | None) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor (N, *S), got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(
            f"`{name}` must be a floating-point tensor in the model's data range, got "
            f"{value.dtype} (scale integer images first)"
        )
    if shape is not None and value.dim() == len(shape):
        value = value.unsqueeze(0)
    if value.dim() < 2 or value.shape[0] == 0 or math.prod(value.shape[1:]) == 0:
        raise ValueError(f"`{name}` must have shape (N, *S) with N >= 1, got {tuple(value.shape)}")
    if shape is not None and tuple(value.shape[1:]) != shape:
        raise ValueError(
            f"`{name}` images have shape {tuple(value.shape[1:])}, the model's samples {shape}"
        )
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"`{name}` holds NaN or inf values")
    return value


def _json_safe(value: Any) -> Any:
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, Tensor):
        if value.numel() <= 16:
            return value.detach().cpu().tolist()
        return f"tensor{tuple(value.shape)} {value.dtype}"
    if callable(value):
        return getattr(value, "__qualname__", repr(value))
    return repr(value)


def _conditioning_summary(conditioning: Mapping[str, Any] | None) -> Any:
    if not conditioning:
        return None
    return {
        k: (f"tensor{tuple(v.shape)}" if isinstance(v, Tensor) else _json_safe(v))
        for k, v in conditioning.items()
    }


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def _checked_settings(
    num_samples: Any, num_inference_steps: Any, batch_size: Any, seed: Any, data_range: Any
) -> tuple[float, float]:
    """``audit``'s integer settings checked; returns ``data_range`` as ``(lo, hi)`` floats."""
    for name, value, minimum in (
        ("num_samples", num_samples, 1),
        ("num_inference_steps", num_inference_steps, 1),
        ("batch_size", batch_size, 1),
        ("seed", seed, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, Integral):
            raise TypeError(f"`{name}` must be an int, got {value!r}")
        if value < minimum:
            raise ValueError(f"`{name}` must be >= {minimum}, got {value!r}")
    if (
        not isinstance(data_range, Sequence)
        or len(data_range) != 2
        or not float(data_range[1]) > float(data_range[0])
    ):
        raise ValueError(f"`data_range` must be (lo, hi) with hi > lo, got {data_range!r}")
    return float(data_range[0]), float(data_range[1])


def _checked_checks(checks: Sequence[str] | None, text: bool, null: bool) -> tuple[str, ...]:
    """The checks to run, without repeats; ``None`` gives the defaults (``DEFAULT_CHECKS``)."""
    if checks is None:
        checks = DEFAULT_CHECKS + (("memorization",) if text and null else ())
    if isinstance(checks, str) or not isinstance(checks, Sequence) or not checks:
        raise ValueError(f"`checks` must be a non-empty list of names from {ALL_CHECKS}")
    unknown = [c for c in checks if c not in ALL_CHECKS]
    if unknown:
        raise ValueError(f"`checks` has unknown names {unknown}; known: {list(ALL_CHECKS)}")
    return tuple(dict.fromkeys(checks))


def _checked_image_sets(
    forget: Any,
    reference: Any,
    members: Any,
    shape: tuple[int, ...] | None,
    data_range: tuple[float, float],
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The forget, reference and members images checked against the sample shape and range.

    An empty ``reference`` becomes ``None``; one forget image without its batch dimension gets
    one.
    """
    lo, hi = data_range
    forget = _check_images(forget, "forget", shape)
    shape = tuple(forget.shape[1:])
    if reference is not None:
        reference = _check_images(reference, "reference", shape) if len(reference) else None
    if members is not None:
        members = _check_images(members, "members", shape)
    for name, images in (("forget", forget), ("reference", reference), ("members", members)):
        if images is not None and (
            float(images.min()) < lo - 1e-4 or float(images.max()) > hi + 1e-4
        ):
            raise ValueError(
                f"`{name}` has values in [{float(images.min()):.3g}, {float(images.max()):.3g}], "
                f"outside the model's data range [{lo:g}, {hi:g}] (`data_range`): map the "
                "images to the model's range first"
            )
    return forget, reference, members


def _membership_set_level(
    result: CheckResult, members: Tensor | None, forget_n: int
) -> CheckResult:
    """The set-level membership result, with a plain reason when it lacked members."""
    if result.image is not None or members is not None or forget_n >= 2:
        return result
    why = (
        f"no members: {forget_n} forget image and no `members` (the AUC needs >= 2 member "
        "images of the reference's distribution)"
    )
    stats = {
        name: Estimate.missing(why, estimate.held_when, n=estimate.n)
        for name, estimate in result.statistics.items()
    }
    return CheckResult(result.check, None, stats, None, f"no verdict: {why}", result.details)


# ---- the checks: one runner each, sharing one context


@dataclass(frozen=True)
class _Context:
    """What every check's runner reads, built once by ``audit`` after its inputs are checked.

    The images are on ``device`` in ``dtype`` (``reference`` and ``members`` ``None`` when not
    given), the conditionings plain dicts there (empty when not given); ``sampling`` holds the
    ``sampling=`` options, ``functions`` the checks' public functions (``_functions``).
    """

    model: Any
    scheduler: Any
    forget: Tensor
    reference: Tensor | None
    members: Tensor | None
    conditioning: dict[str, Any]
    null_conditioning: dict[str, Any]
    shape: tuple[int, ...]
    device: torch.device
    dtype: torch.dtype
    seeds: dict[str, int]
    num_samples: int
    num_inference_steps: int
    batch_size: int
    data_range: tuple[float, float]
    sampling: dict[str, Any]
    progress: bool
    functions: Mapping[str, Callable[..., Any]]

    def generator(self, check: str) -> torch.Generator:
        """A fresh generator for ``check``, seeded with ``check_seed(seed, check)``."""
        return torch.Generator().manual_seed(self.seeds[check])


class _Ran(NamedTuple):
    """A runner's output: the check's results, and what the report's ``config`` notes of it."""

    results: list[CheckResult]
    resolved: dict[str, Any] | None = None  # defaults audit() set from the scheduler
    note: str | None = None  # why the check measured nothing


def _on_forget_and_reference(ctx: _Context, check: str, **options: Any) -> list[CheckResult]:
    """``check``'s function on the forget and reference images, with the shared inputs."""
    return ctx.functions[check](
        ctx.model,
        ctx.scheduler,
        ctx.forget,
        ctx.reference,
        conditioning=ctx.conditioning or None,
        generator=ctx.generator(check),
        progress=ctx.progress,
        **options,
    )


def _run_membership(ctx: _Context, options: Mapping[str, Any]) -> _Ran:
    """The loss-based attack; without reference images, "not measured" with the reason."""
    if ctx.reference is None:
        why = "no reference (non-member) images: membership inference is not measured"
        missing = [
            CheckResult(
                "membership",
                i,
                {
                    "error": Estimate.missing(why, "lower"),
                    "percentile": Estimate.missing(why, "lower"),
                },
                None,
                f"no verdict: {why}",
            )
            for i in range(ctx.forget.shape[0])
        ]
        return _Ran(missing, note=why)
    out = _on_forget_and_reference(
        ctx, "membership", members=ctx.members, **{"batch_size": ctx.batch_size, **options}
    )
    return _Ran([_membership_set_level(r, ctx.members, ctx.forget.shape[0]) for r in out])


def _run_reconstruction(ctx: _Context, options: Mapping[str, Any]) -> _Ran:
    """Noise to the paper's t = 250 of T = 1000 (scaled to the scheduler's T), denoise."""
    steps = int(ctx.scheduler.config.num_train_timesteps)
    return _reconstructed(ctx, "reconstruction", {"t": max(1, round(0.25 * steps)), **options})


def _run_reconstruction_sweep(ctx: _Context, options: Mapping[str, Any]) -> _Ran:
    """The reconstruction at the paper's t = 50 .. 750 of T = 1000 (``SWEEP_FRACTIONS`` of T)."""
    steps = int(ctx.scheduler.config.num_train_timesteps)
    ts = sorted({max(1, round(f * steps)) for f in SWEEP_FRACTIONS})
    return _reconstructed(ctx, "reconstruction_sweep", {"ts": tuple(ts), **options})


def _reconstructed(ctx: _Context, check: str, options: dict[str, Any]) -> _Ran:
    """Either reconstruction check, its noise level(s) resolved in ``options``."""
    resolved = {k: options[k] for k in ("t", "ts") if k in options}
    out = _on_forget_and_reference(
        ctx,
        check,
        **{
            "num_inference_steps": ctx.num_inference_steps,
            "batch_size": ctx.batch_size,
            "data_range": ctx.data_range,
            **options,
        },
    )
    return _Ran(out, resolved=resolved)


def _run_likelihood(ctx: _Context, options: Mapping[str, Any]) -> _Ran:
    """The PF-ODE NLL of each forget image against the reference's."""
    out = _on_forget_and_reference(
        ctx, "likelihood", **{"batch_size": ctx.batch_size, "data_range": ctx.data_range, **options}
    )
    return _Ran(out)


def _attach_gallery(result: CheckResult, samples: Tensor) -> None:
    """Put the gallery's images into ``result.details`` (small images only)."""
    index = result.details.get("gallery") or []
    if not index:
        return
    per_image = math.prod(samples.shape[1:])
    if per_image > GALLERY_IMAGE_LIMIT:
        result.details["gallery_images"] = None
        result.details["gallery_images_note"] = (
            f"images of {per_image} values are not stored in the report (limit "
            f"{GALLERY_IMAGE_LIMIT}); `gallery` indexes the samples"
        )
        return
    images = samples[torch.tensor(index, device=samples.device)].detach().double().cpu()
    result.details["gallery_images"] = np.round(images.numpy(), 4).tolist()


def _run_generation(ctx: _Context, options: Mapping[str, Any]) -> _Ran:
    """Sample ``num_samples`` images, then the rate at which they reproduce each forget image;
    the gallery's images ride along in each result's ``details``."""
    samples = ctx.functions["sampling"](
        ctx.model,
        ctx.scheduler,
        ctx.num_samples,
        **{
            "num_inference_steps": ctx.num_inference_steps,
            "batch_size": ctx.batch_size,
            "generator": ctx.generator("generation"),
            "conditioning": ctx.conditioning or None,
            "progress": ctx.progress,
            **({"sample_shape": ctx.shape} if ctx.shape else {}),
            **ctx.sampling,
        },
    )
    out = ctx.functions["generation"](
        samples, ctx.forget, **{"data_range": ctx.data_range, "reference": ctx.reference, **options}
    )
    for result in out:
        _attach_gallery(result, samples)
    return _Ran(out)


def _check_memorization_inputs(
    conditioning: Mapping[str, Any] | None, null_conditioning: Mapping[str, Any] | None
) -> None:
    """Memorization needs a prompt and the empty prompt, both as ``encoder_hidden_states``."""
    text = bool(conditioning) and "encoder_hidden_states" in conditioning
    if not text or not null_conditioning or "encoder_hidden_states" not in null_conditioning:
        raise ValueError(
            "`checks` has 'memorization' (text-conditional models only): it needs "
            "`conditioning={'encoder_hidden_states': prompt_embeds}` and "
            "`null_conditioning={'encoder_hidden_states': null_embeds}`"
        )


def _run_memorization(ctx: _Context, options: Mapping[str, Any]) -> _Ran:
    """Wen et al.'s noise-magnitude score: one prompt for the whole forget set."""
    prompt = ctx.conditioning["encoder_hidden_states"]
    null = ctx.null_conditioning["encoder_hidden_states"]
    extra = {k: v for k, v in ctx.conditioning.items() if k != "encoder_hidden_states"}
    extra_null = {k: v for k, v in ctx.null_conditioning.items() if k != "encoder_hidden_states"}
    # every one of the DDIM steps is scored unless `num_steps` is given (the check's own
    # default, 50 of 50, would refuse a shorter `num_inference_steps`)
    steps = options.get("num_inference_steps", ctx.num_inference_steps)
    options = {"num_inference_steps": steps, "num_steps": steps, **options}
    out = ctx.functions["memorization"](
        ctx.model,
        ctx.scheduler,
        (4, *ctx.shape),
        prompt,
        null,
        conditioning=extra or None,
        null_conditioning=extra_null or None,
        generator=ctx.generator("memorization"),
        progress=ctx.progress,
        **options,
    )
    return _Ran(out, resolved={"num_steps": options["num_steps"]})


_RUNNERS: dict[str, Callable[[_Context, Mapping[str, Any]], _Ran]] = {
    "membership": _run_membership,
    "reconstruction": _run_reconstruction,
    "reconstruction_sweep": _run_reconstruction_sweep,
    "likelihood": _run_likelihood,
    "generation": _run_generation,
    "memorization": _run_memorization,
}
"""Each check's runner, in the order ``audit`` runs them: cheap checks first, so that a mistake
in a later check's options costs little (the report lists them in ``ALL_CHECKS``' order)."""
_INPUT_CHECKS: dict[str, Callable[[Mapping[str, Any] | None, Mapping[str, Any] | None], None]] = {
    "memorization": _check_memorization_inputs
}
"""Checks that need more of ``audit``'s inputs: ``check(conditioning, null_conditioning)``
raises before any model call."""


def audit(
    model: Any,
    scheduler: Any,
    forget: Tensor,
    reference: Tensor | None,
    *,
    members: Tensor | None = None,
    conditioning: Mapping[str, Any] | None = None,
    null_conditioning: Mapping[str, Any] | None = None,
    checks: Sequence[str] | None = None,
    num_samples: int = 1000,
    num_inference_steps: int = 50,
    batch_size: int = 64,
    data_range: tuple[float, float] = (-1.0, 1.0),
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
    label: str | None = None,
    **options: Mapping[str, Any],
) -> AuditReport:
    """Audit ``model``: does it still hold the ``forget`` images? (module docstring).

    Args:
        model: a diffusers model ``siss.adapters`` handles (``UNet2DModel``,
            ``UNet2DConditionModel``, DiT, SD3) or a callable ``model(x_t, timesteps, **cond)``.
        scheduler: its diffusers scheduler (VP or flow matching); never modified.
        forget: ``(M, *S)`` images to forget (or one ``(*S)``), floating, in ``data_range``.
        reference: ``(R, *S)`` comparable images the model never trained on (non-members), or
            ``None`` (every percentile is then "not measured", and the membership check is
            skipped with that reason).
        members: ``(m, *S)`` images the model trained on, of the reference's distribution, for
            the membership AUC and TPR@FPR (default: the forget images, if at least 2).
        conditioning: model keyword inputs shared by every image (1-row tensors), e.g.
            ``{"encoder_hidden_states": prompt_embeds}``; the prompt under which to test.
        null_conditioning: the empty prompt's inputs (same keys), for ``"memorization"``.
        checks: names from ``ALL_CHECKS``; ``None`` for ``DEFAULT_CHECKS`` (plus
            ``"memorization"`` when ``conditioning`` holds ``encoder_hidden_states`` and
            ``null_conditioning`` is given).
        num_samples: samples of the generation check.
        num_inference_steps: DDIM steps of sampling and of every denoising.
        batch_size: rows per model call (every check).
        data_range: ``(lo, hi)`` of the model's data; images outside it are refused.
        seed: the audit's seed (see the module docstring).
        device: run there (the model is moved in place); default: the model's device.
        progress: tqdm bars on the long parts.
        label: the report's ``model`` name (default: the model's class name).
        **options: per-check options as dicts, e.g. ``likelihood={"repeats": 8}``,
            ``generation={"threshold": 4.0}``, ``reconstruction_sweep={"ts": (100, 500)}``,
            ``membership={"score": "pia"}``, ``sampling={"clip_sample": False}``,
            ``memorization={"reference_scores": scores}``.

    Returns:
        An ``AuditReport``: one result per (check, forget image), set-level results with
        ``image=None``; ``config`` holds the settings, per-check seeds and run times.

    Raises:
        TypeError, ValueError: naming the argument, before any model call.

    Examples:
        The generation check alone, on an untrained 8x8 UNet (a few milliseconds on a CPU):

        >>> from diffusers import DDPMScheduler, UNet2DModel
        >>> _ = torch.manual_seed(0)
        >>> model = UNet2DModel(
        ...     sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
        ...     norm_num_groups=4, layers_per_block=1, down_block_types=("DownBlock2D",) * 2,
        ...     up_block_types=("UpBlock2D",) * 2)
        >>> g = torch.Generator().manual_seed(0)
        >>> forget = torch.rand(1, 1, 8, 8, generator=g) * 2 - 1
        >>> reference = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
        >>> report = audit(model, DDPMScheduler(), forget, reference, checks=["generation"],
        ...                num_samples=4, num_inference_steps=2, progress=False)
        >>> result = report.result("generation", image=0)
        >>> result.held, result.statistics["rate"].format()  # no sample within the threshold
        (False, '0 [0, 0.602] (n=4)')
        >>> report.config["checks"] == ["generation"]
        True
    """
    started = time.perf_counter()
    # ---- arguments, all checked before the first model call
    if not callable(model):
        raise TypeError(f"`model` must be a diffusers model or a callable, got {type(model)}")
    kind, prediction_type = scheduler_kind(scheduler)
    lo, hi = _checked_settings(num_samples, num_inference_steps, batch_size, seed, data_range)
    if conditioning is not None and not isinstance(conditioning, Mapping):
        raise TypeError(f"`conditioning` must be a dict, got {type(conditioning).__name__}")
    if null_conditioning is not None and not isinstance(null_conditioning, Mapping):
        raise TypeError(
            f"`null_conditioning` must be a dict, got {type(null_conditioning).__name__}"
        )
    text = bool(conditioning) and "encoder_hidden_states" in conditioning
    checks = _checked_checks(checks, text, bool(null_conditioning))
    per_check = check_options(options)
    check_option_values(per_check, scheduler)
    for check in checks:
        if check in _INPUT_CHECKS:
            _INPUT_CHECKS[check](conditioning, null_conditioning)
    if isinstance(model, nn.Module) and device is not None:
        model.to(device)
    model_device, model_dtype = model_device_dtype(model, device)
    sampling = per_check.get("sampling", {})
    given = sampling.get("sample_shape")
    shape = tuple(int(v) for v in given) if given is not None else config_sample_shape(model)
    forget, reference, members = _checked_image_sets(forget, reference, members, shape, (lo, hi))
    dtype = model_dtype if model_dtype in (torch.float32, torch.float64) else torch.float32
    ctx = _Context(
        model=model,
        scheduler=scheduler,
        forget=forget.to(model_device, dtype),
        reference=reference.to(model_device, dtype) if reference is not None else None,
        members=members.to(model_device, dtype) if members is not None else None,
        conditioning=_to(dict(conditioning or {}), model_device),
        null_conditioning=_to(dict(null_conditioning or {}), model_device),
        shape=tuple(forget.shape[1:]),
        device=model_device,
        dtype=dtype,
        seeds={check: check_seed(seed, check) for check in checks},
        num_samples=num_samples,
        num_inference_steps=num_inference_steps,
        batch_size=batch_size,
        data_range=(lo, hi),
        sampling=sampling,
        progress=progress,
        functions=_functions(),
    )

    # ---- the checks, in the runners' order
    results: dict[str, list[CheckResult]] = {}
    timings: dict[str, float] = {}
    notes: dict[str, str] = {}
    resolved: dict[str, Any] = {}
    for check, run in _RUNNERS.items():
        if check not in checks:
            continue
        t0 = time.perf_counter()
        ran = run(ctx, per_check.get(check, {}))
        results[check] = list(ran.results)
        if ran.resolved is not None:
            resolved[check] = ran.resolved
        if ran.note is not None:
            notes[check] = ran.note
        timings[check] = round(time.perf_counter() - t0, 2)

    ordered = [r for check in ALL_CHECKS if check in results for r in results[check]]
    config = {
        "checks": list(checks),
        "seed": int(seed),
        "check_seeds": ctx.seeds,
        "num_samples": int(num_samples) if "generation" in checks else None,
        "num_inference_steps": int(num_inference_steps),
        "batch_size": int(batch_size),
        "data_range": [lo, hi],
        "image_shape": list(ctx.shape),
        "forget_n": int(ctx.forget.shape[0]),
        "reference_n": 0 if ctx.reference is None else int(ctx.reference.shape[0]),
        "members_n": 0 if ctx.members is None else int(ctx.members.shape[0]),
        "conditioning": _conditioning_summary(ctx.conditioning),
        "options": _json_safe(per_check),
        "resolved_defaults": _json_safe(resolved),
        "model_class": type(model).__name__,
        "scheduler": type(scheduler).__name__,
        "scheduler_kind": kind,
        "prediction_type": prediction_type,
        "device": str(ctx.device),
        "dtype": str(ctx.dtype),
        "torch": torch.__version__,
        "seconds": {**timings, "total": round(time.perf_counter() - started, 2)},
        "notes": notes,
    }
    return AuditReport(label or type(model).__name__, ordered, config)
