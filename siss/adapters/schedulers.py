"""Read the forward process and the prediction type from a diffusers scheduler.

A diffusers scheduler carries two things a training loss needs: the *training* noise schedule
(``num_train_timesteps`` points, fixed at construction) and what the model predicts
(``config.prediction_type``). Both are read here without touching the scheduler's state: nothing
is called that could move its tensors or step counters, and ``set_timesteps`` (which replaces
``timesteps``/``sigmas`` by an inference grid) has no effect on what is read.

* DDPM-style schedulers (``DDPMScheduler``, ``DDIMScheduler``, ``PNDMScheduler``,
  ``EulerDiscreteScheduler``, ``DPMSolverMultistepScheduler``, ...) share the variance-preserving
  process ``x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) eps`` with ``ᾱ = cumprod(1 - betas)`` and integer
  timesteps ``0 .. T-1``. Euler-type schedulers write the same process in the variance-exploding
  form ``x_0 + s_t eps`` and divide the model input by ``sqrt(s_t^2 + 1)`` (``scale_model_input``);
  the draw's ``noisy`` is that scaled model input.
* ``FlowMatchEulerDiscreteScheduler`` (SD3, Flux) is rectified flow, ``x_t = (1 - s) x_0 + s eps``,
  with float timesteps ``s * num_train_timesteps`` after its ``shift``.

Grid indices (what ``loss_fn.sample(..., timesteps=...)`` takes) follow the scheduler's own order,
so index ``i`` is the scheduler's training-grid entry ``i``:

* DDPM-style: ascending noise, index ``i`` is timestep ``i`` (0 = least noise, ``T - 1`` = most);
  ``timesteps=999`` is the authors' fixed t = 999.
* Flow matching: DESCENDING noise, as diffusers stores it: index ``i`` is
  ``scheduler.sigmas[i]`` / ``scheduler.timesteps[i]`` of a freshly built scheduler (index 0 is
  ``sigma = 1``, pure noise; ``T - 1`` is the least noise). Code ported from diffusers' SD3/Flux
  training scripts (``indices = (u * T).long(); timesteps = scheduler.timesteps[indices]``) passes
  the same ``indices`` as ``timesteps=indices`` and gets the same noise levels. A fixed
  ``timesteps=0`` is the noisiest point; a window ``(low, high)`` spans ``sigmas[high]`` (least
  noise) to ``sigmas[low]`` (most), so "the noisiest 10%" is ``(0, T // 10 - 1)`` here and
  ``(T - T // 10, T - 1)`` for a DDPM-style scheduler.
"""

from __future__ import annotations

from collections.abc import Callable
from numbers import Real
from typing import Any

import torch
from torch import Tensor

from siss._optional import needs
from siss.losses import UnlearningLoss
from siss.schedule import NoiseSchedule
from siss.targets import PREDICTION_TYPES

# Schedulers whose training process is the variance-preserving one defined by `betas`.
VP_SCHEDULERS: tuple[str, ...] = (
    "DDPMScheduler",
    "DDIMScheduler",
    "PNDMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "UniPCMultistepScheduler",
    "DEISMultistepScheduler",
    "LMSDiscreteScheduler",
    "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "LCMScheduler",
    "TCDScheduler",
)
# Schedulers whose training process is rectified flow with `shift`.
FLOW_SCHEDULERS: tuple[str, ...] = ("FlowMatchEulerDiscreteScheduler",)
SUPPORTED_SCHEDULERS: tuple[str, ...] = VP_SCHEDULERS + FLOW_SCHEDULERS
"""Class names of the diffusers schedulers whose training process ``schedule_from_scheduler``
reads: the variance-preserving (DDPM-style) ones, then rectified flow.

Examples:
    >>> SUPPORTED_SCHEDULERS[0], SUPPORTED_SCHEDULERS[-1]
    ('DDPMScheduler', 'FlowMatchEulerDiscreteScheduler')
"""

_VP_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# Diffusers' Euler-family schedulers accept "original_sample" as a synonym of "sample".
_PREDICTION_ALIASES = {"original_sample": "sample"}


def _scheduler_kind(scheduler: object) -> str:
    """``"vp"`` or ``"flow"``; a ``ValueError`` naming the supported schedulers otherwise."""
    with needs("siss.adapters.schedulers"):
        import diffusers

    for names, kind in ((FLOW_SCHEDULERS, "flow"), (VP_SCHEDULERS, "vp")):
        classes = tuple(getattr(diffusers, name) for name in names if hasattr(diffusers, name))
        if isinstance(scheduler, classes):
            if kind == "vp" and _config(scheduler).get("use_flow_sigmas", False):
                raise ValueError(
                    f"{type(scheduler).__name__} with `use_flow_sigmas=True` is an inference "
                    "sampler for a flow-matching model and carries no training schedule; build the "
                    "loss from a FlowMatchEulerDiscreteScheduler with the model's `shift` instead"
                )
            return kind
    if isinstance(scheduler, type):
        raise TypeError(
            f"`scheduler` must be a scheduler instance, got the class {scheduler.__name__}: "
            f"build one, e.g. {scheduler.__name__}() or {scheduler.__name__}.from_config(...)"
        )
    raise ValueError(
        f"unsupported scheduler {type(scheduler).__name__} (`scheduler`); supported: "
        f"{', '.join(SUPPORTED_SCHEDULERS)} (or build a `siss.NoiseSchedule` by hand)"
    )


def _config(scheduler: Any) -> dict[str, Any]:
    return dict(scheduler.config)


def schedule_from_scheduler(scheduler: Any) -> NoiseSchedule:
    """The training forward process of a diffusers scheduler, as a ``NoiseSchedule``.

    DDPM-style schedulers give ``ᾱ = cumprod(1 - betas)`` formed in float64 from the scheduler's
    ``betas`` (never from the inference grid that ``set_timesteps`` installs), ``gamma = sqrt(ᾱ)``,
    ``sigma = sqrt(1 - ᾱ)`` and timesteps ``0 .. T-1`` (int64), or ``0.25 log(sigma_VE)`` (float)
    for an ``EulerDiscreteScheduler`` with ``timestep_type="continuous"`` and v-prediction. With
    ``rescale_betas_zero_snr`` the last step has ``gamma = 0`` exactly.

    ``FlowMatchEulerDiscreteScheduler`` gives ``sigma_i = shift s_i / (1 + (shift - 1) s_i)`` with
    ``s_i = (T - i) / T`` for ``i = 0 .. T-1`` (no shift when ``use_dynamic_shifting``, as in the
    scheduler itself: Flux shifts per resolution at inference only), ``gamma = 1 - sigma`` and the
    float timesteps ``sigma * T``: bit-for-bit the ``sigmas`` and ``timesteps`` of a freshly built
    scheduler, index for index (so ``scale_noise`` finds them).

    Grid indices follow the scheduler's own order: ascending noise for DDPM-style schedulers
    (index ``i`` is timestep ``i``), DESCENDING noise for flow matching, as in diffusers (index 0 is
    ``sigma = 1``; ``timesteps=scheduler_indices`` from a diffusers SD3/Flux training script gives
    the same sigmas). ``timesteps=int`` and a ``(low, high)`` window pick indices in that order;
    see the module docstring.

    The schedule is built on the CPU; move the loss with ``.to(device)``.

    Args:
        scheduler: a diffusers scheduler instance; it is not modified.

    Returns:
        A ``NoiseSchedule`` of length ``num_train_timesteps``.

    Raises:
        ValueError: for a scheduler that is not in ``SUPPORTED_SCHEDULERS``, or whose config
            gives no valid training schedule (``num_train_timesteps < 1``, betas outside
            ``(0, 1]``, ``shift <= 0``, ...); the message names ``scheduler``.
        TypeError: for a scheduler class instead of an instance.

    Examples:
        >>> from diffusers import DDPMScheduler
        >>> schedule = schedule_from_scheduler(DDPMScheduler(num_train_timesteps=1000))
        >>> len(schedule), schedule.timesteps.dtype
        (1000, torch.int64)
        >>> from diffusers import FlowMatchEulerDiscreteScheduler
        >>> flow = schedule_from_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0))
        >>> flow.sigma[0].item(), flow.timesteps[0].item()  # index 0: pure noise, as in diffusers
        (1.0, 1000.0)
    """
    kind = _scheduler_kind(scheduler)
    name = type(scheduler).__name__
    config = _config(scheduler)
    num_train_timesteps = config.get("num_train_timesteps")
    if (
        isinstance(num_train_timesteps, bool)
        or not isinstance(num_train_timesteps, int)
        or num_train_timesteps < 1
    ):
        raise ValueError(
            f"`scheduler` ({name}) has num_train_timesteps={num_train_timesteps!r}; it must be an "
            "int >= 1"
        )
    try:
        return _training_schedule(scheduler, kind, config, num_train_timesteps)
    except ValueError as error:
        if "`scheduler`" in str(error):
            raise
        raise ValueError(f"`scheduler` ({name}) has no valid training schedule: {error}") from error


def _training_schedule(
    scheduler: Any, kind: str, config: dict[str, Any], num_train_timesteps: int
) -> NoiseSchedule:
    name = type(scheduler).__name__
    if kind == "flow":
        # FlowMatchEulerDiscreteScheduler.__init__'s own float32 arithmetic and order (descending
        # noise), so that sigma and timesteps equal a fresh scheduler's `sigmas`/`timesteps` bit
        # for bit at every index, whatever `set_timesteps` has since done to this one.
        sigmas = torch.arange(num_train_timesteps, 0, -1, dtype=torch.float32) / num_train_timesteps
        if not config.get("use_dynamic_shifting", False):
            shift = config.get("shift", 1.0)
            if isinstance(shift, bool) or not isinstance(shift, Real) or not shift > 0:
                raise ValueError(f"`scheduler` ({name}) has shift={shift!r}; it must be > 0")
            sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
            if not (torch.isfinite(sigmas).all() and (sigmas > 0).all() and (sigmas <= 1).all()):
                raise ValueError(
                    f"`scheduler` ({name}) has shift={shift!r}, whose sigmas fall outside (0, 1] "
                    "in the scheduler's float32 arithmetic"
                )
        return NoiseSchedule.from_flow_sigmas(sigmas, sigmas * num_train_timesteps)

    betas = getattr(scheduler, "betas", None)
    if not isinstance(betas, torch.Tensor) or not betas.is_floating_point():
        raise ValueError(f"`scheduler` ({name}) has no floating-point `betas` tensor")
    betas = betas.detach().to("cpu", torch.float64)
    if betas.shape != (num_train_timesteps,):
        raise ValueError(
            f"`scheduler` ({name}): betas has shape {tuple(betas.shape)}, expected "
            f"({num_train_timesteps},) from `num_train_timesteps`"
        )
    if not (torch.isfinite(betas).all() and (betas > 0).all() and (betas <= 1).all()):
        raise ValueError(f"`scheduler` ({name}): betas must lie in (0, 1] at every timestep")
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    if not bool(alphas_cumprod[0] < 1):
        raise ValueError(
            f"`scheduler` ({name}): beta_0={betas[0].item()!r} is too small, 1 - alphas_cumprod "
            "rounds to 0 at the first timestep (no noise, no density to importance-weight)"
        )
    gamma, sigma = alphas_cumprod.sqrt(), (1 - alphas_cumprod).sqrt()
    to_model = model_timesteps(scheduler)
    timesteps = None if to_model is None else to_model(torch.arange(len(betas)))
    return NoiseSchedule(gamma, sigma, timesteps)


def model_timesteps(scheduler: Any) -> Callable[[Tensor], Tensor] | None:
    """The timesteps a model takes at grid indices, when they are not the indices themselves:
    ``None`` for every discrete diffusers scheduler and flow matching; for an
    ``EulerDiscreteScheduler`` with ``timestep_type="continuous"`` and v-prediction (EDM-style
    preconditioning), ``index (any shape, fractional too) -> 0.25 log σ(index)``, float32, with
    ``σ = sqrt((1 - ᾱ) / ᾱ)`` from the scheduler's own ``alphas_cumprod`` and, between grid
    indices, interpolated linearly in the index as the scheduler interpolates its sigmas.

    Why: the audit's samplers and its likelihood ODE step through grid indices; a model trained
    on ``0.25 log σ`` given an index (0 ... 999 instead of about -3 ... 3) is far outside what it
    learned (``schedule_from_scheduler`` uses the same map).

    Examples:
        >>> from diffusers import DDPMScheduler, EulerDiscreteScheduler
        >>> model_timesteps(DDPMScheduler()) is None
        True
        >>> edm = EulerDiscreteScheduler(prediction_type="v_prediction", timestep_type="continuous")
        >>> [round(v, 3) for v in model_timesteps(edm)(torch.tensor([0.0, 500.5, 999.0])).tolist()]
        [-1.151, 0.31, 1.265]
    """
    config = _config(scheduler)
    if not (
        config.get("timestep_type", "discrete") == "continuous"
        and config.get("prediction_type") == "v_prediction"
    ):
        return None
    alphas_cumprod = scheduler.alphas_cumprod.detach().to("cpu", torch.float32)
    sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
    last = len(sigmas) - 1

    def to_model(index: Tensor) -> Tensor:
        where = torch.as_tensor(index).detach().to("cpu", torch.float64).clamp(0, last)
        low = where.floor().long()
        high = (low + 1).clamp(max=last)
        share = (where - low).float()
        between = sigmas[low] * (1 - share) + sigmas[high] * share
        sigma = torch.where(share == 0, sigmas[low], between)  # exact (and finite) on the grid
        return (0.25 * sigma.log()).to(torch.as_tensor(index).device)

    return to_model


def prediction_type_from_scheduler(scheduler: Any) -> str:
    """What the model predicts, read from ``scheduler.config.prediction_type``.

    Returns ``"epsilon"``, ``"v_prediction"`` or ``"sample"`` for DDPM-style schedulers and
    ``"flow_prediction"`` (the velocity ``eps - x_0``) for ``FlowMatchEulerDiscreteScheduler``.

    Args:
        scheduler: a diffusers scheduler instance.

    Raises:
        ValueError: for an unsupported scheduler or prediction type, naming the supported ones.

    Examples:
        >>> from diffusers import DDIMScheduler
        >>> prediction_type_from_scheduler(DDIMScheduler(prediction_type="v_prediction"))
        'v_prediction'
    """
    if _scheduler_kind(scheduler) == "flow":
        return "flow_prediction"
    prediction_type = _config(scheduler).get("prediction_type", "epsilon")
    if isinstance(prediction_type, str):
        prediction_type = _PREDICTION_ALIASES.get(prediction_type, prediction_type)
    if not isinstance(prediction_type, str) or prediction_type not in _VP_PREDICTION_TYPES:
        raise ValueError(
            f"unsupported prediction_type {prediction_type!r} on {type(scheduler).__name__}; "
            f"supported: {', '.join(_VP_PREDICTION_TYPES)} (and flow_prediction through "
            "FlowMatchEulerDiscreteScheduler)"
        )
    return prediction_type


def loss_from_scheduler(
    method: type[UnlearningLoss] | str, scheduler: Any, **kwargs: Any
) -> UnlearningLoss:
    """Build an unlearning loss whose schedule and prediction type come from ``scheduler``.

    Args:
        method: an ``UnlearningLoss`` subclass (e.g. ``siss.SISSLoss``) or a registered method
            name (``"siss"``, ``"siss-nois"``, ``"naive"``, ``"neggrad"``, ``"erasediff"``; see
            ``siss.registry.make_loss``).
        scheduler: a diffusers scheduler (see ``SUPPORTED_SCHEDULERS``); it is not modified.
        **kwargs: the method's own options (``lam``, ``superfactor``, ``n``, ``k``, ...). An
            explicit ``prediction_type`` overrides the scheduler's.

    Returns:
        The loss, on the CPU; move it with ``.to(device)``.

    Examples:
        >>> from diffusers import DDPMScheduler
        >>> from siss import SISSLoss
        >>> loss_fn = loss_from_scheduler(SISSLoss, DDPMScheduler(), lam=0.5, superfactor=0.1)
        >>> loss_fn.prediction_type, len(loss_fn.schedule)
        ('epsilon', 1000)
    """
    schedule = schedule_from_scheduler(scheduler)
    kwargs.setdefault("prediction_type", prediction_type_from_scheduler(scheduler))
    if kwargs["prediction_type"] not in PREDICTION_TYPES:
        raise ValueError(
            f"`prediction_type` must be one of {', '.join(PREDICTION_TYPES)}, "
            f"got {kwargs['prediction_type']!r}"
        )
    if isinstance(method, str):
        from siss.registry import make_loss

        return make_loss(method, schedule, **kwargs)
    if isinstance(method, type) and issubclass(method, UnlearningLoss):
        return method(schedule, **kwargs)
    raise TypeError(
        "`method` must be an UnlearningLoss subclass (e.g. siss.SISSLoss) or a method name, got "
        f"{method!r}"
    )
