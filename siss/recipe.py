"""The unlearning recipe: one configuration and one training-step object for any diffusers model.

The loss (``SISSLoss``) is exact; what makes unlearning *keep the model* is the recipe around it:

- **the teacher keep target** (``keep_target="teacher"``, SISS's default at ``0 < lam < 1``):
  the keep term matches the frozen model's prediction on the same noisy batch instead of the
  drawn noise. It has Lemma 1's expected gradient where the teacher is stationary for the loss
  under the run's timestep distribution and weighting, and no regression on the drawn noise;
  near the pretrained weights what noise is left is NegGrad's (``teacher_siss_terms``,
  docs/math.md). The teacher is a frozen copy of the model, or, for a PEFT LoRA, the same model
  with its adapters disabled (no copy); it runs under ``torch.inference_mode``;
- **a calibrated forget scale**: with a teacher the keep gradient starts at about 0, so the
  paper's rule (the forget gradient at ~``ratio`` of the naive-deletion gradient, §5) is held
  against the naive-deletion gradient's norm measured once, over the first
  ``calibration_batches`` optimizer steps' batches, before any weight moves
  (``NormBalancer(mode="absolute")``), and refreshed every ``balance_every`` steps;
- **accelerate**: processes, gradient accumulation (the balancer steps on ``sync_gradients``
  only), mixed precision (fp16 steps whose norms overflow are skipped and the loss scale
  lowered), gradient clipping, EMA, and the state a resume needs (registered with
  ``accelerator.register_for_checkpointing``: a resumed run is bit-identical to an
  uninterrupted one).

In a diffusers training loop, after ``accelerator.prepare(...)``::

    unlearner = Unlearner(unet, noise_scheduler, UnlearningConfig(), n=n, k=k,
                          accelerator=accelerator, optimizer=optimizer, lr_scheduler=lr_scheduler)
    for batch, forget_batch in paired_batches(train_dataloader, forget_loader):
        result = unlearner.step(latents, forget_latents, encoder_hidden_states=embeds)

``step`` enters ``accelerator.accumulate`` itself: do not wrap it in another one.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from siss._checks import check_choice
from siss._optional import needs
from siss.balancer import BalanceStats, NormBalancer, _global_norm
from siss.loop import derived_seed, process_index
from siss.losses import LossTerms
from siss.registry import METHODS, RULES
from siss.retrack import DEFAULT_NEIGHBORS
from siss.schedule import TimestepSpec

KeepTarget = Literal["teacher", "noise"]
KEEP_TARGETS: tuple[str, ...] = ("teacher", "noise")
BALANCE_MODES: tuple[str, ...] = ("fix", "clip", "absolute")
LR_SCHEDULERS: tuple[str, ...] = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
)
CALIBRATION_FLOOR = 1e-3
"""A calibration batch whose naive-deletion gradient norm is below this fraction of the largest
measured is not a measurement (its rows all drew the forget point, ``w_x ≈ 0``); measured
norms spanned a factor of 50 at one row a batch (docs/numerics.md, "Small batches")."""
ABSOLUTE_FORGET_FLOOR = 1e-3
"""``NormBalancer``'s ``forget_floor`` in ``"absolute"`` mode, as a fraction of ``ρ`` times the
calibrated naive-deletion gradient norm: a forget gradient below it comes from a batch whose rows
all drew the keep point (``w_a ≈ 0``), and its coefficient would be 1e3 times too large or more."""
DEFAULT_BALANCE_EVERY = 10
"""``balance_every`` of the calibrated ('absolute') rule: the forget-gradient norm is measured
(a second backward) once every 10 optimizer steps; docs/benchmarks.md gives the cost and
docs/choosing_hyperparameters.md how it was chosen."""


def _field_error(name: str, message: str) -> ValueError:
    return ValueError(f"UnlearningConfig.{name}: {message}")


@dataclasses.dataclass(frozen=True)
class UnlearningConfig:
    """The settings of one unlearning run, validated once; every error names its field.

    Defaults left at ``None`` are resolved from the method's rules (``siss.registry.RULES``):
    ``keep_target`` is ``"teacher"`` for SISS at ``0 < lam < 1`` and ``"noise"`` otherwise
    (SISS at ``lam`` 0 or 1 included: the unbounded importance weight would enter the teacher's
    keep term and bias it, so an explicit ``keep_target="teacher"`` there is a ``ValueError``);
    a teacher with ``timesteps`` or ``snr_gamma`` set warns (``UserWarning``): it is unbiased
    only if stationary for the loss under that timestep distribution and weighting;
    ``balance_mode`` is ``"absolute"`` (calibrated) with a teacher and ``"fix"`` (per step, the
    paper's) otherwise; ``balance_every`` is ``DEFAULT_BALANCE_EVERY`` for ``"absolute"`` and 1
    otherwise.

    Args:
        method: one of ``siss.METHODS``.
        lam: SISS's mixture weight ``λ`` in ``[0, 1]`` (SISS only).
        keep_target: ``"teacher"`` or ``"noise"`` (see the module docstring).
        superfactor: a fixed superfactor ``s``, which turns the balancer off; ``None``: the
            balancer's rule sets it each step.
        ratio: ``||s g_forget||`` as a fraction of the keep gradient's norm (``"fix"``,
            ``"clip"``) or of the calibrated naive-deletion gradient's norm (``"absolute"``).
        balance_mode: ``"fix"``, ``"clip"`` or ``"absolute"`` (``NormBalancer``'s modes).
        balance_every: refresh the balancer's coefficient every this many optimizer steps.
        calibration_batches: optimizer steps' batches whose median naive-deletion gradient norm
            sets ``"absolute"``'s scale.
        timesteps: ``None`` (uniform), a fixed grid index, or an inclusive ``(low, high)`` window.
        x_from: ``"retain"`` when the keep batches come from ``X \\ A`` (Eq. 15), ``"all"``
            when from ``X`` (Eq. 8).
        snr_gamma: min-SNR-γ weighting (diffusers' ``--snr_gamma``); ``None``: none.
        learning_rate: AdamW's peak learning rate (the paper's 5e-5).
        lr_scheduler: diffusers' ``get_scheduler`` name; ``"cosine"`` anneals to 0 by
            ``max_train_steps``, as pretraining usually did.
        lr_warmup_steps: linear warmup steps of ``lr_scheduler``.
        max_train_steps: optimizer steps of the run (the schedule's length).
        adam_weight_decay: AdamW's weight decay (0: the fine-tune is not pulled toward 0).
        ema_decay: largest decay of an EMA of the trained weights (diffusers' ``EMAModel`` with
            warmup); 0: no EMA.
        ema_power: the EMA warmup's power.
        max_grad_norm: gradient clipping after the balancer; 0: none.
        seed: seed of every draw (timesteps, mixture coins, noise): draw ``i`` of process ``r``
            uses ``derived_seed(seed, "draw", i, r)``, so a resume draws what an uninterrupted
            run draws.
        num_neighbors: ReTrack's ``k``, the kept neighbours each forget point is redirected to
            (``siss.ReTrackLoss``); ``None``: its default (5) for ``method="retrack"``; it must
            stay ``None`` for the other methods.
        forget_timesteps: SISS only: an inclusive ``(low, high)`` window of grid indices
            outside which the forget term is 0 (``SISSLoss(forget_timesteps=)``, the
            time-restricted variant); ``None``: every timestep.

    Examples:
        >>> config = UnlearningConfig()
        >>> config.keep_target, config.balance_mode, config.balance_every
        ('teacher', 'absolute', 10)
        >>> UnlearningConfig(max_train_steps=-5)
        Traceback (most recent call last):
        ...
        ValueError: UnlearningConfig.max_train_steps: must be >= 1, got -5
    """

    method: str = "siss"
    lam: float = 0.5
    keep_target: KeepTarget | None = None
    superfactor: float | None = None
    ratio: float = 0.1
    balance_mode: Literal["fix", "clip", "absolute"] | None = None
    balance_every: int | None = None
    calibration_batches: int = 8
    timesteps: TimestepSpec = None
    x_from: Literal["retain", "all"] = "retain"
    snr_gamma: float | None = None
    learning_rate: float = 5e-5
    lr_scheduler: str = "cosine"
    lr_warmup_steps: int = 0
    max_train_steps: int = 300
    adam_weight_decay: float = 0.0
    ema_decay: float = 0.0
    ema_power: float = 0.75
    max_grad_norm: float = 1.0
    seed: int = 0
    num_neighbors: int | None = None
    forget_timesteps: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise _field_error(
                "method", f"{self.method!r} is not one of {', '.join(map(repr, METHODS))}"
            )
        rules = RULES[self.method]
        _number(self, "lam", low=0.0, high=1.0)
        _number(self, "ratio", low=0.0)
        _number(self, "learning_rate", low=0.0, open_low=True)
        _number(self, "adam_weight_decay", low=0.0)
        _number(self, "max_grad_norm", low=0.0)
        _number(self, "ema_power", low=0.0, open_low=True)
        _number(self, "ema_decay", low=0.0, high=1.0, open_high=True)
        if self.superfactor is not None:
            _number(self, "superfactor", low=0.0)
        if self.snr_gamma is not None:
            _number(self, "snr_gamma", low=0.0, open_low=True)
        _integer(self, "calibration_batches", low=1)
        _integer(self, "lr_warmup_steps", low=0)
        _integer(self, "max_train_steps", low=1)
        _integer(self, "seed", low=0)
        if self.method == "retrack":
            if self.num_neighbors is None:
                object.__setattr__(self, "num_neighbors", DEFAULT_NEIGHBORS)
            _integer(self, "num_neighbors", low=1)
        elif self.num_neighbors is not None:
            raise _field_error(
                "num_neighbors",
                f"ReTrack's k (method='retrack'); method {self.method!r} takes none, got "
                f"{self.num_neighbors!r}",
            )
        if self.forget_timesteps is not None:
            if self.method != "siss":
                raise _field_error(
                    "forget_timesteps",
                    f"the time-restricted forget term is SISS's; method {self.method!r} takes none",
                )
            window = self.forget_timesteps
            if not isinstance(window, list | tuple) or len(window) != 2:
                raise _field_error(
                    "forget_timesteps", f"must be a (low, high) window, got {window!r}"
                )
            _check_timesteps(tuple(window), "forget_timesteps")
            object.__setattr__(self, "forget_timesteps", tuple(window))
        _choice(self, "lr_scheduler", LR_SCHEDULERS)
        _choice(self, "x_from", ("retain", "all"))
        _check_timesteps(self.timesteps)
        if isinstance(self.timesteps, list | tuple):  # e.g. a JSON or argparse list
            values = tuple(self.timesteps)
            object.__setattr__(self, "timesteps", values[0] if len(values) == 1 else values)

        keep_target = self.keep_target
        extreme = self.method == "siss" and self.lam in (0.0, 1.0)
        if keep_target is None:  # λ ∈ {0, 1}: the paper's ablations, with its noise target
            keep_target = "teacher" if rules.teacher and not extreme else "noise"
        _choice(self, "keep_target", KEEP_TARGETS, keep_target)
        if keep_target == "teacher" and not rules.teacher:
            raise _field_error(
                "keep_target",
                f"'teacher' needs SISS's keep term; method {self.method!r} has none "
                "(use method='siss', or keep_target='noise')",
            )
        if keep_target == "teacher" and extreme:
            why = (
                "the unbounded importance weight w_a enters its keep term, while the noise "
                "keep term is exact there (w_x = 1)"
                if self.lam == 0.0
                else "the unbounded importance weight w_x enters its keep term (the paper's "
                "NegGrad-like ablation, run with the noise target)"
            )
            raise _field_error(
                "keep_target",
                f"'teacher' is biased at lam={self.lam:g}: {why}; use keep_target='noise' "
                "(the default at lam 0 and 1) or 0 < lam < 1",
            )
        if keep_target == "teacher" and (self.timesteps is not None or self.snr_gamma is not None):
            _warn_teacher_weighting(self.timesteps, self.snr_gamma)
        mode = self.balance_mode
        if mode is None:
            mode = "absolute" if keep_target == "teacher" else "fix"
        _choice(self, "balance_mode", BALANCE_MODES, mode)
        every = self.balance_every
        if every is None:
            every = DEFAULT_BALANCE_EVERY if mode == "absolute" else 1
        object.__setattr__(self, "keep_target", keep_target)
        object.__setattr__(self, "balance_mode", mode)
        _integer(self, "balance_every", low=1, value=every)
        object.__setattr__(self, "balance_every", every)

    @property
    def balancer(self) -> str | None:
        """The ``NormBalancer`` mode of the run: ``None`` with a fixed superfactor or for a
        method with nothing to balance, ``"bilevel"`` for EraseDiff, ``balance_mode``
        otherwise."""
        rule = RULES[self.method].balancer
        if self.superfactor is not None or rule is None:
            return None
        return "bilevel" if rule == "bilevel" else self.balance_mode

    @property
    def calibrated(self) -> bool:
        """Whether the run measures the naive-deletion gradient's norm before training."""
        return self.balancer == "absolute"

    def loss_kwargs(self, n: int | None, k: int | None) -> dict[str, Any]:
        """The keyword arguments of the method's loss (``siss.make_loss``)."""
        rules = RULES[self.method]
        kwargs: dict[str, Any] = {
            "superfactor": rules.superfactor if self.superfactor is None else self.superfactor,
            "snr_gamma": self.snr_gamma,
        }
        if self.balancer is not None:  # the balancer sets the forget term's weight
            kwargs["superfactor"] = 0.0
        if self.method == "siss":
            kwargs["lam"] = self.lam
        if self.forget_timesteps is not None:
            kwargs["forget_timesteps"] = self.forget_timesteps
        if self.num_neighbors is not None:
            kwargs["num_neighbors"] = self.num_neighbors
        if rules.subsets:
            kwargs.update(n=n, k=k, x_from=self.x_from)
        return kwargs

    def check_prediction_type(self, prediction_type: str) -> None:
        """A ``ValueError`` naming ``method`` if the method cannot train that prediction type."""
        reason = RULES[self.method].refused.get(prediction_type)
        if reason is not None:
            raise _field_error("method", f"{self.method!r} cannot train this model: {reason}")

    def to_dict(self) -> dict[str, Any]:
        """The resolved settings, JSON-ready (a ``(low, high)`` window as a list)."""
        values = dataclasses.asdict(self)
        for name in ("timesteps", "forget_timesteps"):
            if isinstance(values[name], tuple):
                values[name] = list(values[name])
        return values


def _number(
    config: UnlearningConfig,
    name: str,
    *,
    low: float,
    high: float = math.inf,
    open_low: bool = False,
    open_high: bool = False,
) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _field_error(name, f"must be a finite number, got {value!r}")
    below = value <= low if open_low else value < low
    above = value >= high if open_high else value > high
    if below or above:
        left, right = "(" if open_low else "[", ")" if open_high else "]"
        raise _field_error(name, f"must be in {left}{low:g}, {high:g}{right}, got {value!r}")


def _integer(
    config: UnlearningConfig, name: str, *, low: int, value: object = dataclasses.MISSING
) -> None:
    value = getattr(config, name) if value is dataclasses.MISSING else value
    if isinstance(value, bool) or not isinstance(value, int):
        raise _field_error(name, f"must be an int, got {value!r}")
    if value < low:
        raise _field_error(name, f"must be >= {low}, got {value}")


def _choice(
    config: UnlearningConfig,
    name: str,
    choices: tuple[str, ...],
    value: object = dataclasses.MISSING,
) -> None:
    value = getattr(config, name) if value is dataclasses.MISSING else value
    try:
        check_choice(value, name, choices)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise _field_error(
            name, f"{value!r} is not one of {', '.join(map(repr, choices))}"
        ) from None


def _warn_teacher_weighting(timesteps: TimestepSpec, snr_gamma: float | None) -> None:
    """The teacher keep target is unbiased where the teacher is stationary for ``L_X`` under
    unlearning's own timestep distribution and weighting; pretraining rarely used these."""
    settings = []
    if timesteps is not None:
        settings.append(f"timesteps={timesteps!r}")
    if snr_gamma is not None:
        settings.append(f"snr_gamma={snr_gamma!r}")
    warnings.warn(
        f"UnlearningConfig: keep_target='teacher' with {' and '.join(settings)}: at the "
        "pretrained weights the teacher's keep gradient is off Lemma 1's by -n/(n-k) times the "
        "gradient of L_X under this timestep distribution and weighting, which is 0 only if the "
        "teacher was trained to a stationary point of that same loss (a model pretrained on "
        "uniform timesteps without min-SNR weighting is not). Use keep_target='noise', or the "
        "timesteps and weighting the teacher was trained with (docs/math.md, 'Where the "
        "assumption fails').",
        UserWarning,
        stacklevel=4,
    )


def _check_timesteps(value: object, name: str = "timesteps") -> None:
    if value is None:
        return
    values = value if isinstance(value, tuple | list) else (value,)
    if len(values) not in (1, 2) or any(
        isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values
    ):
        raise _field_error(
            name,
            f"must be None, a grid index >= 0 or a (low, high) window of them, got {value!r}",
        )
    if len(values) == 2 and values[0] > values[1]:
        raise _field_error(name, f"the window {tuple(values)} has low > high")


class StepResult(NamedTuple):
    """What one ``Unlearner.step`` call did. Tensors are detached; reading them syncs the host.

    Attributes:
        terms: the micro-batch's ``LossTerms(loss, keep, forget)``; during calibration the
            naive-deletion keep term (noise target) whose gradient was measured.
        stats: the balancer's ``BalanceStats`` on a step that ended an optimizer step with a
            balancer; ``None`` otherwise.
        calibrating: the batch measured the naive-deletion gradient norm; no weight moved.
        optimizer_step: an optimizer step ended with this micro-batch (``sync_gradients``,
            after calibration); the weights moved unless ``skipped``.
        skipped: the step's gradient norms were not finite (an fp16 overflow, a NaN in a
            batch or in the model's output), with or without a balancer: nothing moved (weights,
            optimizer state, EMA, the held coefficient), the fp16 loss scale was lowered.

    Examples:
        >>> result = StepResult(LossTerms(*torch.zeros(3)), None, True, False, False)
        >>> result.calibrating, result.optimizer_step
        (True, False)
    """

    terms: LossTerms
    stats: BalanceStats | None
    calibrating: bool
    optimizer_step: bool
    skipped: bool


def _listed(weights: Tensor | None) -> list[float] | None:
    """A per-timestep weight tensor as a list (float32 values are exact as floats)."""
    return None if weights is None else weights.tolist()


def _inner(model: nn.Module) -> nn.Module:
    """``model`` without a ``DistributedDataParallel`` wrapper (DDP's forward would prepare a
    gradient reduction and broadcast buffers for a prediction that needs neither)."""
    while isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
        model = model.module
    return model


def _is_fsdp(model: nn.Module) -> bool:
    """Whether ``model`` is sharded by FSDP (FSDP2's ``fully_shard`` or FSDP1's wrapper)."""
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(model, FSDPModule | FullyShardedDataParallel)


def _has_peft_adapters(model: nn.Module) -> bool:
    return bool(getattr(model, "_hf_peft_config_loaded", False)) or callable(
        getattr(model, "disable_adapter", None)
    )


def _adapters_change_nothing(model: nn.Module) -> bool:
    """Whether every PEFT adapter layer of ``model`` is a LoRA whose ``B`` is zero (peft's default
    initialisation, what ``add_adapter(LoraConfig(...))`` makes), so that the model with its
    adapters disabled is the model. ``False`` for a LoRA already trained or loaded
    (``load_lora_weights``), another initialisation, DoRA's magnitude or another tuner, whose
    contribution this cannot tell from their weights. One host sync, at build time."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    zero_when_fresh: list[Tensor] = []
    for module in model.modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        for name in module.adapter_layer_names:
            held = getattr(module, name, None)
            if held is None or len(held) == 0:
                continue
            if name in ("lora_B", "lora_embedding_B"):
                for value in held.values():
                    is_module = isinstance(value, nn.Module)
                    zero_when_fresh += value.parameters() if is_module else [value]
            elif name not in ("lora_A", "lora_embedding_A"):
                return False
    if not zero_when_fresh:
        return True
    sharded = any(hasattr(t, "to_local") for t in zero_when_fresh)  # DTensors under FSDP2
    local = [(t.to_local() if hasattr(t, "to_local") else t).detach() for t in zero_when_fresh]
    largest = torch.stack(torch._foreach_norm(local)).amax()
    if sharded and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(largest, op=torch.distributed.ReduceOp.MAX)
    return bool(largest == 0)


class _AdaptersDisabled:
    """A teacher that is the model itself with its PEFT adapters disabled: the base model of a
    LoRA, with no copy of its weights."""

    def __init__(self, adapter: Any, model: nn.Module) -> None:
        self.adapter, self.model = adapter, model

    def predict(self, noisy: Tensor, timesteps: Tensor, **conditioning: Any) -> Tensor:
        if callable(getattr(self.model, "disable_adapter", None)):  # a peft.PeftModel
            with self.model.disable_adapter():
                return self.adapter.predict(noisy, timesteps, **conditioning)
        self.model.disable_adapters()  # diffusers' PeftAdapterMixin
        try:
            return self.adapter.predict(noisy, timesteps, **conditioning)
        finally:
            self.model.enable_adapters()


class _OutsideInferenceMode:
    """A teacher sharded by FSDP2, run under ``torch.no_grad`` instead of the adapters'
    ``torch.inference_mode``: FSDP2 gathers a module's weights into buffers it keeps and reuses,
    and buffers first made under inference mode are inference tensors, which the next training
    forward of that module cannot write ("Inplace update to inference tensor outside
    InferenceMode", seen with a LoRA whose teacher forward came first; tests/test_fsdp.py)."""

    def __init__(self, teacher: Any) -> None:
        self.teacher, self.model = teacher, getattr(teacher, "model", None)

    def predict(self, noisy: Tensor, timesteps: Tensor, **conditioning: Any) -> Tensor:
        with torch.inference_mode(False), torch.no_grad():
            return self.teacher.predict(noisy, timesteps, **conditioning)


class _Autocast:
    """A teacher run under ``accelerator.autocast()``: the mixed precision of the prepared model,
    which accelerate applies to the prepared model's own forward only."""

    def __init__(self, teacher: Any, accelerator: Any) -> None:
        self.teacher, self.accelerator = teacher, accelerator

    def predict(self, noisy: Tensor, timesteps: Tensor, **conditioning: Any) -> Tensor:
        with self.accelerator.autocast():
            return self.teacher.predict(noisy, timesteps, **conditioning)


def teacher_for(model: nn.Module, *, channels_last: bool = False) -> Any:
    """The frozen model before unlearning, as something with the adapters' ``predict``.

    A model carrying fresh PEFT LoRA adapters (``unet.add_adapter(LoraConfig(...))``, whose
    ``B`` is zero, or such a ``PeftModel``) is its own teacher with the adapters disabled: the
    base weights do not train, so they are the model before unlearning, and no copy is made. A
    model whose adapters already change its output (a LoRA trained or loaded with
    ``load_lora_weights``, DoRA, another tuner) is copied as any other model is: disabling them
    would give the base model, not the model before unlearning. Sharded by FSDP2, the teacher
    of fresh adapters is sharded with the model; it then runs under ``torch.no_grad`` rather
    than ``torch.inference_mode``, and the root FSDP module is set to reshard after every
    forward (both for FSDP2's gathered weight buffers, which the teacher's and the training
    forward share: docs/sharded.md). Any other model is copied (``copy.deepcopy``), frozen and
    put in eval mode: build the teacher before the first step, and before
    ``accelerator.load_state`` on a resume, so that it holds the starting weights.

    FSDP (a ``fully_shard``-ed model) forbids ``deepcopy``, and a gathered copy would undo the
    sharding, so a sharded model without adapters raises ``ValueError``: call ``teacher_for``
    *before* sharding, shard the teacher's frozen module the same way (``fully_shard`` on its
    blocks and on ``teacher.model``, which shards it in place: a ``1/N`` share of its weights at
    rest, gathered a block at a time in its forward), and pass it as ``Unlearner(...,
    teacher=teacher)`` (docs/sharded.md).

    Args:
        model: the diffusers model being unlearned (wrapped by DDP or not; sharded by FSDP only
            with PEFT adapters).
        channels_last: store a copy's 4-D weights channels-last, whose forward oneDNN runs
            faster on the CPU (the prediction changes by float rounding only). Not for a copy
            you will shard: FSDP refuses non-contiguous parameters. ``Unlearner`` sets it for
            the copy it makes itself on the CPU. No effect on a PEFT model's teacher.

    Examples:
        >>> from diffusers import UNet2DModel
        >>> unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1,
        ...     block_out_channels=(8, 8), norm_num_groups=4, layers_per_block=1,
        ...     down_block_types=("DownBlock2D", "DownBlock2D"),
        ...     up_block_types=("UpBlock2D", "UpBlock2D"))
        >>> teacher = teacher_for(unet)
        >>> teacher.model is unet, teacher.model.training
        (False, False)
    """
    from siss.adapters import adapter_for

    inner = _inner(model)
    if _has_peft_adapters(inner) and _adapters_change_nothing(inner):
        teacher = _AdaptersDisabled(adapter_for(inner), inner)
        if not _is_fsdp(inner):
            return teacher
        # The root FSDP2 module keeps its weights gathered after a forward by default; gathered by
        # the teacher's no-grad forward and reused by the training one, they gave the balancer's
        # second (forget) backward wrong gradients for the root's own parameters (torch 2.13,
        # tests/test_fsdp.py). Resharding the root after every forward avoids that.
        set_reshard = getattr(inner, "set_reshard_after_forward", None)
        if set_reshard is not None:
            set_reshard(True, recurse=False)
        return _OutsideInferenceMode(teacher)
    if _is_fsdp(inner):
        peft = _has_peft_adapters(inner)
        trained = " and its PEFT adapters already change its output" if peft else ""
        raise ValueError(
            f"teacher_for: the model is sharded by FSDP{trained}, which cannot be copied: build "
            "the teacher with teacher_for(model) before sharding (before accelerator.prepare), "
            "shard teacher.model the same way, and pass Unlearner(..., teacher=teacher)"
        )
    frozen = copy.deepcopy(inner).requires_grad_(False).eval()
    if channels_last:  # 4-D weights only (docs/benchmarks.md: the recipe's step)
        frozen.to(memory_format=torch.channels_last)
    return adapter_for(frozen)


class Unlearner:
    """One unlearning training step for any diffusers model: the recipe behind ``SISSLoss``.

    Build it after ``accelerator.prepare(...)`` (the model, optimizer and lr scheduler are the
    prepared ones) and, on a resume, before ``accelerator.load_state``: it registers itself for
    checkpointing, so accelerate saves and restores its state (the draw counter, the calibrated
    scale, the balancer's held coefficient, the EMA) with the rest.

    Args:
        model: the diffusers model (``UNet2DModel``, ``UNet2DConditionModel``, DiT, SD3 or
            any model ``siss.adapters.adapter_for`` takes), possibly prepared by accelerate and
            carrying PEFT adapters (only the trainable parameters train).
        noise_scheduler: the diffusers scheduler the model was trained with: the forward
            process and the prediction type come from it (``loss_from_scheduler``).
        config: the run's ``UnlearningConfig``.
        n: ``|X|``, the whole training set with the forget set (SISS and SISS (No IS)).
        k: ``|A|``, the number of points to forget.
        accelerator: an ``accelerate.Accelerator``; ``None``: one process, no accumulation,
            plain ``backward``.
        optimizer: the (prepared) optimizer; ``None``: AdamW over the trainable parameters at
            ``config.learning_rate`` (prepared with ``accelerator``), refused for float16
            trainable parameters (``ValueError``: train float32 weights under mixed precision).
        lr_scheduler: the (prepared) learning-rate scheduler; ``None``: diffusers'
            ``get_scheduler(config.lr_scheduler, ...)`` over ``config.max_train_steps``.
        retain: ReTrack only: the kept points ``X \\ A`` (or a subset), ``(N, C, H, W)``, among
            which each forget point's ``num_neighbors`` nearest are found
            (``ReTrackLoss(retain=)``); moved to the model's device. ``None``: the keep batch.
        teacher: the teacher keep target's frozen model, as ``teacher_for`` returns it;
            ``None``: ``teacher_for(model)``, channels-last on the CPU. Needed under FSDP for a
            model without adapters:
            ``teacher_for`` before sharding, then shard ``teacher.model`` (``teacher_for``).

    Attributes:
        loss_fn: the method's loss; ``teacher``: the teacher (``None`` for the noise target);
        balancer: the ``NormBalancer`` (``None`` without one); ``ema``: the ``EMAModel`` or
        ``None``; ``optimizer_steps``: optimizer steps taken (calibration excluded);
        ``scale``: the calibrated naive-deletion gradient norm (``None`` before);
        ``forget_weight``: the product of ``back_off``'s factors (1 at the start).

    Examples:
        >>> from diffusers import DDPMScheduler, UNet2DModel
        >>> unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1,
        ...     block_out_channels=(8, 8), norm_num_groups=4, layers_per_block=1,
        ...     down_block_types=("DownBlock2D", "DownBlock2D"),
        ...     up_block_types=("UpBlock2D", "UpBlock2D"))
        >>> config = UnlearningConfig(calibration_batches=1, max_train_steps=2)
        >>> unlearner = Unlearner(unet, DDPMScheduler(), config, n=101, k=1)
        >>> keep, forget = torch.randn(4, 1, 8, 8), torch.ones(1, 1, 8, 8)
        >>> tuple(unlearner.step(keep, forget).calibrating for _ in range(3))
        (True, False, False)
        >>> unlearner.optimizer_steps
        2
    """

    def __init__(
        self,
        model: nn.Module,
        noise_scheduler: Any,
        config: UnlearningConfig | None = None,
        *,
        n: int | None = None,
        k: int | None = None,
        accelerator: Any | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        lr_scheduler: Any | None = None,
        retain: Tensor | None = None,
        teacher: Any | None = None,
    ) -> None:
        from siss.adapters import adapter_for, loss_from_scheduler, trainable_parameters
        from siss.adapters.schedulers import prediction_type_from_scheduler

        config = UnlearningConfig() if config is None else config
        if not isinstance(config, UnlearningConfig):
            raise TypeError(f"`config` must be an UnlearningConfig, got {type(config).__name__}")
        config.check_prediction_type(prediction_type_from_scheduler(noise_scheduler))
        if config.keep_target == "teacher" and (n is None or k is None):
            raise ValueError(
                "`n` and `k` (|X| and |A|) are needed with keep_target='teacher': its keep term "
                "weighs the forget rows by the true k/(n-k); pass Unlearner(..., n=, k=) or "
                "UnlearningConfig(keep_target='noise')"
            )
        self.config = config
        self.model = model
        self.accelerator = accelerator
        self.adapter = adapter_for(model)
        self.params = trainable_parameters(model)
        if not self.params:
            raise ValueError("`model` has no trainable parameter (requires_grad=True)")
        if optimizer is None and any(p.dtype == torch.float16 for p in self.params):
            raise ValueError(
                "`model` has float16 trainable parameters: the AdamW that Unlearner builds "
                "would overflow and underflow in float16 (its eps=1e-8 is 0 there) and write "
                "inf into the weights. Train float32 weights under mixed precision (accelerate's "
                "mixed_precision='fp16'; diffusers.training_utils.cast_training_params(model, "
                "torch.float32) for a LoRA), as diffusers' training scripts do, or pass your "
                "own `optimizer`"
            )
        device = self.params[0].device
        self.loss_fn = loss_from_scheduler(
            config.method, noise_scheduler, **config.loss_kwargs(n, k)
        ).to(device)
        if retain is not None:
            if config.method != "retrack":
                raise ValueError(
                    f"`retain` is ReTrack's neighbour pool; method {config.method!r} takes none"
                )
            self.loss_fn.set_retain(retain.to(device) if isinstance(retain, Tensor) else retain)
        self.teacher = None
        if teacher is not None and config.keep_target != "teacher":
            raise ValueError(f"`teacher` is for keep_target='teacher', not {config.keep_target!r}")
        if config.keep_target == "teacher":
            if teacher is None:  # its own copy: channels-last where oneDNN runs it faster
                on_cpu = all(p.device.type == "cpu" for p in _inner(model).parameters())
                self.teacher = teacher_for(model, channels_last=on_cpu)
            elif _is_fsdp(getattr(teacher, "model", None)):
                self.teacher = _OutsideInferenceMode(teacher)
            else:
                self.teacher = teacher
            if accelerator is not None:  # a prepared model's autocast does not reach the teacher
                self.teacher = _Autocast(self.teacher, accelerator)
        self._backward = Tensor.backward if accelerator is None else accelerator.backward

        if optimizer is None:
            optimizer = torch.optim.AdamW(
                self.params, lr=config.learning_rate, weight_decay=config.adam_weight_decay
            )
            if accelerator is not None:
                optimizer = accelerator.prepare(optimizer)
        if lr_scheduler is None:
            with needs("siss.recipe"):
                from diffusers.optimization import get_scheduler

            # A prepared scheduler steps once per process per optimizer step, as in diffusers'
            # training scripts.
            processes = 1 if accelerator is None else accelerator.num_processes
            lr_scheduler = get_scheduler(
                config.lr_scheduler,
                optimizer,
                num_warmup_steps=config.lr_warmup_steps * processes,
                num_training_steps=config.max_train_steps * processes,
            )
            if accelerator is not None:
                lr_scheduler = accelerator.prepare(lr_scheduler)
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler

        self.ema = None
        if config.ema_decay > 0:
            with needs("siss.recipe"):
                from diffusers.training_utils import EMAModel

            self.ema = EMAModel(
                self.params, decay=config.ema_decay, use_ema_warmup=True, power=config.ema_power
            )
        self.balancer: NormBalancer | None = None
        self.scale: float | None = None
        self._norms: list[Tensor] = []
        self.draws = 0  # micro-batches drawn, calibration included: the draw seeds' counter
        self.optimizer_steps = 0
        self.forget_weight = 1.0  # back_off's factors so far
        self._superfactor = getattr(self.loss_fn, "superfactor", None)
        if not config.calibrated:
            self.balancer = self._build_balancer()
        if accelerator is not None:
            accelerator.register_for_checkpointing(self)

    def __repr__(self) -> str:
        return (
            f"Unlearner(method={self.config.method!r}, keep_target={self.config.keep_target!r}, "
            f"balancer={self.config.balancer!r}, scale={self.scale}, "
            f"optimizer_steps={self.optimizer_steps})"
        )

    @property
    def calibrating(self) -> bool:
        """Whether the next batches measure the naive-deletion gradient norm (no training)."""
        return self.config.calibrated and self.scale is None

    def _build_balancer(self) -> NormBalancer | None:
        mode, config = self.config.balancer, self.config
        if mode is None:
            return None
        kwargs: dict[str, Any] = {"every": config.balance_every, "backward": self._backward}
        if mode == "absolute":
            kwargs["target_norm"] = self._target_norm()
            kwargs["forget_floor"] = self._forget_floor()
        elif mode != "bilevel":
            kwargs["ratio"] = config.ratio * self.forget_weight
        return NormBalancer(self.params, mode=mode, **kwargs)

    def _target_norm(self) -> float:
        """``"absolute"``'s ``||c g_forget||``: ``ratio`` times the calibrated naive-deletion
        gradient norm, times ``back_off``'s factors."""
        return self.config.ratio * self.scale * self.forget_weight

    def _forget_floor(self) -> float:
        """``"absolute"``'s ``forget_floor``: ``ABSOLUTE_FORGET_FLOOR`` times the size of a
        forget gradient whose batch holds forget rows, ``ρ = k/(n-k)`` times the calibrated
        naive-deletion gradient norm (0 for a loss without ``ρ``)."""
        forget_ratio = getattr(self.loss_fn, "forget_ratio", None)
        return 0.0 if forget_ratio is None else ABSOLUTE_FORGET_FLOOR * forget_ratio * self.scale

    def _generator(self) -> torch.Generator:
        """Draw ``draws``'s generator: a function of (seed, draw, process), no state to save."""
        seed = derived_seed(self.config.seed, "draw", self.draws, process_index())
        return torch.Generator(self.params[0].device).manual_seed(seed)

    @contextmanager
    def _accumulate(self) -> Iterator[None]:
        if self.accelerator is None:
            yield
            return
        with self.accelerator.accumulate(self.model):
            if self.config.balancer is not None and _is_fsdp(self.model):
                # accelerate turns FSDP2's gradient sync off on accumulation micro-batches; FSDP
                # would then sum the keep and forget backward passes in one unsharded buffer,
                # which the balancer must keep apart: reduce every micro-batch.
                set_sync = getattr(self.model, "set_requires_gradient_sync", None)
                if set_sync is not None:
                    set_sync(True)
            yield

    def _sync(self) -> bool:
        return self.accelerator is None or bool(self.accelerator.sync_gradients)

    def _loss_scale(self) -> Tensor | float:
        """The fp16 ``GradScaler``'s current scale (a device tensor, no host sync), else 1."""
        scaler = getattr(self.accelerator, "scaler", None)
        scale = getattr(scaler, "_scale", None)
        return 1.0 if scale is None else scale

    def step(
        self,
        x0: Tensor | None,
        a0: Tensor,
        *,
        generator: torch.Generator | None = None,
        weights: Tensor | Any | None = None,
        **conditioning: Any,
    ) -> StepResult:
        """One micro-batch: draw, one forward pass (and the teacher's, without gradient),
        backward, and on ``sync_gradients`` the balancer, clipping, the optimizer and lr steps.

        While ``calibrating`` (the first ``calibration_batches`` optimizer steps' batches with
        the calibrated rule), the batch's naive-deletion gradient norm is measured instead and no
        weight moves; the optimizer and the lr schedule do not step.

        Args:
            x0: keep points ``(B, C, H, W)`` (pixels or latents; ``None`` for NegGrad).
            a0: forget points, shape of ``x0`` or ``(1, C, H, W)``.
            generator: the draw's generator; ``None``: the run's own, seeded by
                ``(config.seed, draw, process)``.
            weights: per-row loss weights ``(B,)`` or a callable of the draw.
            **conditioning: the model's conditioning (``encoder_hidden_states=...``), as for
                ``ModelAdapter.loss``.

        Returns:
            ``StepResult``.
        """
        generator = self._generator() if generator is None else generator
        self.draws += 1
        with self._accumulate():
            if self.calibrating:
                return self._calibration_step(x0, a0, generator, weights, conditioning)
            terms = self._terms(x0, a0, generator, weights, conditioning, self.teacher)
            if self.balancer is None:
                self._backward(terms.loss)
            else:
                self.balancer.backward(terms.keep, terms.forget)
            terms = LossTerms(*(t.detach() for t in terms))
            if not self._sync():
                return StepResult(terms, None, False, False, False)
            if self.balancer is not None and self.balancer.mode == "absolute":
                # fp16: both gradients carry the loss scale, so the target and the floor must too
                loss_scale = self._loss_scale()
                self.balancer.target_norm = self._target_norm() * loss_scale
                self.balancer.forget_floor = self._forget_floor() * loss_scale
            if self.balancer is not None:
                stats = self.balancer.step()
                skipped = stats.skipped  # non-finite norms: .grad already None
                if not skipped and self.config.max_grad_norm > 0:
                    self._clip()
            else:  # a fixed superfactor, or a method with nothing to balance
                stats = None
                norm = self._clip() if self.config.max_grad_norm > 0 else self._grad_norm()
                skipped = not bool(torch.isfinite(norm))  # host sync: the skip decision
                if skipped:
                    self.optimizer.zero_grad(set_to_none=True)
            if skipped:
                self._skip()
            else:
                self.optimizer.step()
                self.lr_scheduler.step()
                if self.ema is not None:
                    self.ema.step(self.params)
            self.optimizer.zero_grad(set_to_none=True)
            self.optimizer_steps += 1
            return StepResult(terms, stats, False, True, skipped)

    def _calibration_step(
        self,
        x0: Tensor | None,
        a0: Tensor,
        generator: torch.Generator,
        weights: Any,
        conditioning: dict[str, Any],
    ) -> StepResult:
        """Accumulate the naive-deletion (noise-target keep) gradient; on ``sync_gradients``
        record its norm (the reduced gradient's, unscaled) and clear ``.grad``."""
        terms = self._terms(x0, a0, generator, weights, conditioning, teacher=None)
        self._backward(terms.keep)
        terms = LossTerms(*(t.detach() for t in terms))
        if not self._sync():
            return StepResult(terms, None, True, False, False)
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = _global_norm(grads, self.params[0].device) / self._loss_scale()
        self._norms.append(norm.detach().reshape(()).cpu())
        self.optimizer.zero_grad(set_to_none=True)
        if len(self._norms) >= self.config.calibration_batches:
            self._finish_calibration()
        return StepResult(terms, None, True, False, False)

    def _terms(
        self,
        x0: Tensor | None,
        a0: Tensor,
        generator: torch.Generator,
        weights: Any,
        conditioning: dict[str, Any],
        teacher: Any,
    ) -> LossTerms:
        """The draw, the model's one forward pass (and the teacher's), the loss terms."""
        return self.adapter.loss(
            x0,
            a0,
            self.loss_fn,
            timesteps=self.config.timesteps,
            generator=generator,
            weights=weights,
            teacher=teacher,
            **conditioning,
        )

    def _finish_calibration(self) -> None:
        """The scale once ``calibration_batches`` batches measured it: the median of their
        norms. Not measured, and made up by more batches (at most 4x as many in all): a
        non-finite norm (fp16 overflow), and one below ``CALIBRATION_FLOOR`` times the largest,
        a batch whose rows all drew the forget point, where ``w_x ≈ 0`` (common with a row or
        two per step: at one, the scale was below 1e-3 in 4 runs of 16 at 3x16x16, 5 at 3x32x32)."""
        norms = torch.stack(self._norms)
        finite = norms[torch.isfinite(norms)]
        if finite.numel():
            finite = finite[finite > CALIBRATION_FLOOR * finite.max()]
        if finite.numel() < self.config.calibration_batches:
            if len(norms) < 4 * self.config.calibration_batches:
                return  # measure more batches
            if finite.numel() == 0:
                raise ValueError(
                    f"calibration: no finite, non-zero naive-deletion gradient norm in "
                    f"{len(norms)} batches: the model or the data gives non-finite losses, or "
                    "every batch's rows drew the forget point (raise the batch size or lower "
                    "lam)"
                )
        self.scale = finite.median().item()
        self._norms = []
        self.balancer = self._build_balancer()

    def _clip(self) -> Tensor:
        """Clip to ``max_grad_norm``; the total norm before clipping."""
        if self.accelerator is not None:
            norm = self.accelerator.clip_grad_norm_(self.params, self.config.max_grad_norm)
        else:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        if norm is None:  # a backend whose clipping reports no norm
            return self._grad_norm()
        if hasattr(norm, "full_tensor"):  # FSDP2: a replicated DTensor
            norm = norm.full_tensor()
        return torch.as_tensor(norm)

    def _grad_norm(self) -> Tensor:
        grads = [p.grad for p in self.params if p.grad is not None]
        return _global_norm(grads, self.params[0].device)

    def _skip(self) -> None:
        """A step whose norms were not finite: ``.grad`` is already ``None``; lower the fp16
        loss scale as ``GradScaler`` does on an overflow (it saw no gradient to find it)."""
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            scaler.update(scaler.get_scale() * scaler.get_backoff_factor())

    def back_off(self, factor: float = 0.5) -> None:
        """Weigh the forget term ``factor`` times as much from the next step on.

        What a caller does when the behaviour it keeps drifts too far while the forget set is not
        gone yet (the Stable Diffusion job's keep prompts, ``siss.stable_diffusion.watch``): the
        balancer's target (``ratio``, or the calibrated absolute norm) or the fixed superfactor is
        scaled, the balancer starting afresh at the next step. ``forget_weight`` holds the product
        of the factors so far and is saved in ``state_dict``.

        Raises:
            ValueError: ``factor`` outside ``(0, 1]``, or a method whose forget weight is its own
                rule (EraseDiff's bilevel one) or that has no forget term.
        """
        if not 0 < factor <= 1:
            raise ValueError(f"`factor` must be in (0, 1], got {factor!r}")
        if self.config.balancer == "bilevel" or (
            self.config.balancer is None and not self._superfactor
        ):
            raise ValueError(f"method {self.config.method!r} has no forget weight to back off")
        self.forget_weight *= factor
        self._apply_forget_weight()

    def restrict_forget(self, weights: Tensor | None) -> None:
        """Weigh the forget term by ``weights[t]`` per grid index from the next step on (SISS
        only; ``None``: every ``t``, as configured). Saved in ``state_dict``.

        ``siss.stopping.NonmemberStop.forget_timestep_weights`` gives the weights that turn the
        forget term off at the noise levels where the forget set already ranks like a
        non-member.

        Args:
            weights: ``(T,)`` finite weights, one per grid index of the scheduler (negative:
                the forget term reversed there, descent on the forget set's error).

        Raises:
            ValueError: a method without SISS's time-restricted forget term, or weights of
                another shape.
        """
        if not hasattr(self.loss_fn, "restrict_forget"):
            raise ValueError(
                f"method {self.config.method!r} has no per-timestep forget weights (SISS only)"
            )
        self.loss_fn.restrict_forget(weights)

    def set_forget_level(self, level: Tensor | None) -> None:
        """Drive the forget term's squared error to ``level[t]`` per grid index from the next
        step on, pulling it back past it (SISS only; ``None``: plain NegGrad). Saved in
        ``state_dict``.

        ``siss.stopping.NonmemberStop.forget_level`` gives the non-member level. Pair it with a
        coefficient that does not refresh (``UnlearningConfig(balance_every=max_train_steps)``):
        a refresh would scale the forget gradient, small near the level by design, back up
        (``SISSLoss``'s ``forget_level``).

        Args:
            level: ``(T,)`` finite positive values, in the loss's own squared error.

        Raises:
            ValueError: a method without SISS's forget term, or values of another shape.
        """
        if not hasattr(self.loss_fn, "set_forget_level"):
            raise ValueError(f"method {self.config.method!r} has no forget level (SISS only)")
        self.loss_fn.set_forget_level(level)

    def _apply_forget_weight(self) -> None:
        if self.config.balancer is None and self._superfactor is not None:
            self.loss_fn.superfactor = self._superfactor * self.forget_weight
        elif not self.calibrating:
            self.balancer = self._build_balancer()

    @contextmanager
    def averaged_weights(self) -> Iterator[None]:
        """The EMA's weights in the model for the block, the trained ones back after it (no-op
        without an EMA)."""
        if self.ema is None:
            yield
            return
        self.ema.store(self.params)
        self.ema.copy_to(self.params)
        try:
            yield
        finally:
            self.ema.restore(self.params)

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs beyond the model, optimizer and lr scheduler.

        Raises:
            RuntimeError: between the micro-batches of one optimizer step (gradient
                accumulation), whose gradient no checkpoint holds.
        """
        if not self._sync():
            raise RuntimeError(
                "Unlearner.state_dict() (accelerator.save_state) between the micro-batches of "
                "one optimizer step, whose accumulated gradient a checkpoint does not hold: save "
                "after a step whose result has optimizer_step=True (accelerator.sync_gradients), "
                "as diffusers' training scripts do"
            )
        return {
            "config": self.config.to_dict(),
            "draws": self.draws,
            "optimizer_steps": self.optimizer_steps,
            "scale": self.scale,
            "calibration_norms": [n.item() for n in self._norms],
            "balancer": None if self.balancer is None else self.balancer.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(),
            "forget_weight": self.forget_weight,
            "forget_timestep_weights": _listed(
                getattr(self.loss_fn, "forget_timestep_weights", None)
            ),
            "forget_level": _listed(getattr(self.loss_fn, "forget_level", None)),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``; a ``ValueError`` naming every setting that differs from
        this run's configuration."""
        saved, current = state["config"], self.config.to_dict()
        differ = [
            f"{k}: saved {saved.get(k)!r}, now {v!r}"
            for k, v in current.items()
            if saved.get(k) != v
        ]
        if differ:
            raise ValueError(
                "the checkpoint was written by an unlearning run with other settings ("
                + "; ".join(differ)
                + "): resume with those, or start again in another output folder"
            )
        self.draws, self.optimizer_steps = int(state["draws"]), int(state["optimizer_steps"])
        self.scale = state["scale"]
        self._norms = [torch.tensor(v) for v in state["calibration_norms"]]
        self.forget_weight = float(state.get("forget_weight", 1.0))
        if hasattr(self.loss_fn, "restrict_forget") and "forget_timestep_weights" in state:
            weights = state["forget_timestep_weights"]
            self.loss_fn.restrict_forget(None if weights is None else torch.tensor(weights))
        if hasattr(self.loss_fn, "set_forget_level") and "forget_level" in state:
            level = state["forget_level"]
            self.loss_fn.set_forget_level(None if level is None else torch.tensor(level))
        if self.config.balancer is None and self._superfactor is not None:
            self.loss_fn.superfactor = self._superfactor * self.forget_weight
        self.balancer = None if self.calibrating else self._build_balancer()
        if self.balancer is not None and state["balancer"] is not None:
            self.balancer.load_state_dict(state["balancer"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
