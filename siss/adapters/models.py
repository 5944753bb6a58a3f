"""Model adapters: one unlearning loss evaluation per call, for each diffusers model family.

Every adapter wraps a model and implements one hook, ``predict(noisy, timesteps, **conditioning)``,
that calls the model once and returns its prediction with the shape of ``noisy``. The shared
``loss`` method does the rest of a training step's forward half::

    draw = loss_fn.sample(x0, a0, timesteps=timesteps, generator=generator)
    prediction = adapter.predict(draw.noisy, draw.timesteps, **conditioning)  # ONE model call
    return loss_fn.terms(prediction, draw)                                    # LossTerms

Conditioning is given per row of the batch (``B`` rows, one per ``(x0, a0)`` pair; a batch of 1
is broadcast to every row). When a method's draw holds ``2B`` rows (``torch.cat([keep, forget])``,
e.g. EraseDiff or SISS without importance sampling), every conditioning tensor is duplicated the
same way, so both halves see the same prompt or class.

Conditioning and SISS: one conditioning per ``(x, a)`` pair, so x and a must share it. SISS makes
one model call per pair: row ``j`` is ONE noisy point (from ``x_j`` or ``a_j``) scored under ONE
conditioning ``cond_j`` against both ``x_j``'s and ``a_j``'s targets. The importance-sampling
identity (Lemma 1) holds for the conditional model only when ``x_j`` and ``a_j`` share
``cond_j``, as in the paper's Stable Diffusion experiment (one fixed memorized prompt for every
row). With different prompts the forget term is evaluated under ``x_j``'s prompt, which is not
NegGrad on ``(a_j, prompt_a)``. Use the same prompt for both; or, for different prompts, a
two-pass method (``"siss-nois"``, ``"erasediff"``: rows ``cat([x_t, a_t])``) with the model
called directly on ``torch.cat([cond_x, cond_a])``::

    draw = loss_fn.sample(x0, a0)  # siss-nois: 2B rows
    output = adapter.predict(draw.noisy, draw.timesteps, encoder_hidden_states=torch.cat([ex, ea]))
    terms = loss_fn.terms(output, draw)

The model may be wrapped by ``DistributedDataParallel``, ``torch.compile`` or a PEFT model; it may
run in fp16/bf16 under ``torch.autocast``: the loss reduces in float32 whatever the output dtype.
Without autocast, pass ``x0``/``a0`` in the model's dtype (the draw's ``noisy`` has their dtype).

Errors: before the model is called, ``loss`` checks what the model family needs (``(B, C, H, W)``
with the model's ``in_channels``, a spatial size the model can take, the model's device and dtype,
conditioning rows, shapes and dtypes) and raises a ``ValueError``/``TypeError`` naming the
argument, rather than letting a shape error escape from a kernel. NaN or inf *values* in ``x0``,
``a0`` or the conditioning propagate to a NaN loss unless
``siss.debug.set_validate_values(True)`` is in force; then they, and a non-finite model
prediction from finite inputs, raise a ``ValueError`` naming the input.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from numbers import Real
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from siss import _checks
from siss._optional import needs
from siss.losses import LossTerms, UnlearningLoss
from siss.schedule import NoiseSchedule, TimestepSpec


def _autocast_enabled(device_type: str) -> bool:
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except TypeError:  # pragma: no cover - torch < 2.4 takes no device type
        if device_type == "cpu":
            return bool(torch.is_autocast_cpu_enabled())
        return bool(torch.is_autocast_enabled())


def _describe(value: object) -> str:
    """``type name`` (``the class X`` for a class) for error messages, never a long repr."""
    if isinstance(value, type):
        return f"the class {value.__name__} (pass an instance)"
    return type(value).__name__


def _tensors(value: Any, name: str = "") -> list[tuple[str, Tensor]]:
    """Every tensor inside a conditioning value (dicts, lists), with its name."""
    if isinstance(value, Tensor):
        return [(name, value)]
    if isinstance(value, Mapping):
        return [
            item
            for key, v in value.items()
            for item in _tensors(v, f"{name}[{key!r}]" if name else str(key))
        ]
    if isinstance(value, list | tuple):
        return [item for i, v in enumerate(value) for item in _tensors(v, f"{name}[{i}]")]
    return []


def _check_finite_prediction(prediction: Tensor) -> None:
    if prediction.device.type != "meta" and not bool(torch.isfinite(prediction).all()):
        raise ValueError(
            "the model's prediction holds NaN or inf although `x0`, `a0` and the conditioning are "
            "finite: their values overflow the model's dtype (rescale the data, or check the "
            "model's weights)"
        )


def _unwrap(model: nn.Module) -> nn.Module:
    """The diffusers model inside DDP (``.module``), ``torch.compile`` and PEFT wrappers."""
    seen = 0
    while seen < 8:
        seen += 1
        if hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        else:
            break
    return model


def _mean_prediction(output: Tensor, noisy: Tensor) -> Tensor:
    """Drop a learned-variance half (``2C`` output channels, as DiT-XL/2 and IF emit)."""
    channels = noisy.shape[1]
    if output.shape[1] == 2 * channels and output.shape[2:] == noisy.shape[2:]:
        return output[:, :channels]
    return output


def _match_batch(value: Any, name: str, batch: int, rows: int) -> Any:
    """Bring one conditioning value from ``batch`` (or 1) rows to the draw's ``rows`` rows."""
    if isinstance(value, Tensor):
        if value.ndim == 0:
            return value
        if value.shape[0] == 1 and batch != 1:
            return value.expand(rows, *value.shape[1:])
        if value.shape[0] != batch:
            expected = f"{batch} (one per (x0, a0) pair)"
            if batch != 1:
                expected += " or 1 (shared by every row)"
            raise ValueError(
                f"conditioning `{name}` has {value.shape[0]} rows; expected {expected}"
            )
        return value if rows == batch else torch.cat([value, value])
    if isinstance(value, Mapping):
        return {key: _match_batch(v, f"{name}[{key!r}]", batch, rows) for key, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(
            _match_batch(v, f"{name}[{i}]", batch, rows) for i, v in enumerate(value)
        )
    return value


def _expect_rows(value: Tensor, name: str, rows: int) -> None:
    if value.shape[0] != rows:
        raise ValueError(
            f"`{name}` has {value.shape[0]} rows but the noisy batch has {rows}: one per row"
        )


class ModelAdapter(nn.Module):
    """Base of the model adapters: one ``predict`` hook, one ``loss`` call per training step.

    Subclasses set ``model_classes`` (the diffusers class names they accept) and implement
    ``predict``; they may override ``check_input(value, name)`` to reject, with an error naming
    ``name``, a clean batch their model cannot take (the built-in adapters check the shape, the
    channels and the spatial size against the model's config), and use ``check_embedding`` /
    ``check_labels`` on conditioning in ``predict``. The adapter registers the model as a
    submodule, so ``adapter.parameters()`` and ``adapter.to(device)`` reach it.

    Args:
        model: the diffusers model (possibly wrapped by DDP, ``torch.compile`` or PEFT).

    Raises:
        TypeError: when the (unwrapped) model is not one of ``model_classes``.

    Examples:
        >>> from diffusers import DDPMScheduler
        >>> from siss import SISSLoss
        >>> from siss.adapters import loss_from_scheduler
        >>> class MLPAdapter(ModelAdapter):  # any model mapping (noisy, timesteps) to a prediction
        ...     def predict(self, noisy, timesteps, **conditioning):
        ...         return self.model(noisy)
        >>> loss_fn = loss_from_scheduler(SISSLoss, DDPMScheduler(), lam=0.5, superfactor=0.1)
        >>> adapter = MLPAdapter(torch.nn.Linear(4, 4))
        >>> adapter.loss(torch.randn(8, 4), torch.randn(1, 4), loss_fn).loss.shape
        torch.Size([])
    """

    model_classes: ClassVar[tuple[str, ...]] = ()
    shared_conditioning: ClassVar[tuple[str, ...]] = ()
    """Conditioning keys that are not per row (no batch dimension, e.g. Flux's ``txt_ids``
    ``(L, 3)``): ``loss`` passes them to ``predict`` as they are, never matched to the rows."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"`model` must be a torch.nn.Module (a diffusers model instance), got "
                f"{_describe(model)}"
            )
        inner = _unwrap(model)
        names = {cls.__name__ for cls in type(inner).__mro__}
        if self.model_classes and not names.intersection(self.model_classes):
            raise TypeError(
                f"{type(self).__name__} wraps {' or '.join(self.model_classes)}, got "
                f"{type(inner).__name__}; see `siss.adapters.adapter_for`"
            )
        self.model = model

    def predict(self, noisy: Tensor, timesteps: Tensor, **conditioning: Any) -> Tensor:
        """The model's prediction on ``noisy``: one model call.

        Args:
            noisy: model input ``(R, C, H, W)``.
            timesteps: the model's timestep input ``(R,)``.
            **conditioning: model-specific inputs with ``R`` rows.

        Returns:
            Shape of ``noisy``.
        """
        raise NotImplementedError  # pragma: no cover - abstract

    def forward(self, noisy: Tensor, timesteps: Tensor, **conditioning: Any) -> Tensor:
        return self.predict(noisy, timesteps, **conditioning)

    def training_conditioning(
        self, conditioning: dict[str, Any], generator: torch.Generator | None
    ) -> dict[str, Any]:
        """The conditioning ``loss`` trains on, drawn from ``conditioning`` (its rows matched to
        the draw's) with ``generator``: unchanged here. ``DiTAdapter`` drops class labels as the
        model's own training does, so that the model and the teacher see the same labels."""
        return conditioning

    @property
    def config(self) -> Mapping[str, Any]:
        """The (unwrapped) model's diffusers config; empty for a model without one."""
        config = getattr(_unwrap(self.model), "config", None)
        return config if isinstance(config, Mapping) else {}

    def _parameter(self) -> Tensor | None:
        """The model's first floating parameter: where and in which dtype it takes its input.

        ``None`` (nothing to check against) for a model without one, or one whose weights
        accelerate moves in at call time (CPU offload hooks, weights on the meta device).
        """
        if any(hasattr(m, "_hf_hook") for m in (self.model, _unwrap(self.model))):
            return None
        parameter = next((p for p in self.model.parameters() if p.is_floating_point()), None)
        if parameter is None or parameter.device.type == "meta":
            return None
        return parameter

    def check_like_model(self, value: Tensor, name: str, *, dtype: bool = True) -> None:
        """A named error when tensor ``value`` is not on the model's device or, with ``dtype`` and
        outside ``torch.autocast``, is floating but not in the model's dtype: the model would fail
        inside a kernel.
        """
        parameter = self._parameter()
        if parameter is None:
            return
        if value.device != parameter.device:
            raise ValueError(
                f"`{name}` is on {value.device} but the model is on {parameter.device}: move it "
                "(and the loss, with `loss_fn.to(device)`) to the model's device"
            )
        if not dtype or not value.is_floating_point() or value.dtype == parameter.dtype:
            return
        if _autocast_enabled(value.device.type) and value.dtype != torch.float64:
            return  # autocast casts float32/16 inputs to its dtype; it never casts float64
        raise TypeError(
            f"`{name}` has dtype {value.dtype} but the model's parameters are {parameter.dtype}: "
            "pass it in the model's dtype, or run the model under torch.autocast"
        )

    def check_embedding(
        self, value: object, name: str, rows: int, ndim: int, width: object = None
    ) -> Tensor:
        """A named error unless ``value`` is a floating tensor ``(rows, ..., width)`` of ``ndim``
        dimensions on the model's device and in its dtype (conditioning such as prompt embeds)."""
        if not isinstance(value, Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {_describe(value)}")
        if not value.is_floating_point():
            raise TypeError(f"`{name}` must be a floating-point tensor, got dtype {value.dtype}")
        if value.ndim != ndim:
            raise ValueError(f"`{name}` must have {ndim} dimensions, got {tuple(value.shape)}")
        _expect_rows(value, name, rows)
        if isinstance(width, int) and value.shape[-1] != width:
            model = type(_unwrap(self.model)).__name__
            raise ValueError(
                f"`{name}` has last dimension {value.shape[-1]}; {model} expects {width} "
                f"(shape {tuple(value.shape)})"
            )
        self.check_like_model(value, name)
        return value

    def _check_joint_text(
        self, encoder_hidden_states: object, pooled_projections: object, rows: int
    ) -> None:
        """The text conditioning of the joint-attention transformers (SD3, Flux):
        ``encoder_hidden_states`` ``(rows, L, joint_attention_dim)`` and ``pooled_projections``
        ``(rows, pooled_projection_dim)``, each width checked where the config states it."""
        config = self.config
        self.check_embedding(
            encoder_hidden_states,
            "encoder_hidden_states",
            rows,
            3,
            config.get("joint_attention_dim"),
        )
        self.check_embedding(
            pooled_projections, "pooled_projections", rows, 2, config.get("pooled_projection_dim")
        )

    def check_labels(self, value: object, name: str, rows: int, classes: object) -> Tensor:
        """A named error unless ``value`` is an integer tensor ``(rows,)`` of class indices in
        ``[0, classes)`` (the range is checked on CPU tensors only: no host sync)."""
        if not isinstance(value, Tensor):
            raise TypeError(
                f"`{name}` must be a torch.Tensor of class indices, got {_describe(value)}"
            )
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"`{name}` must hold integer class indices, got dtype {value.dtype}")
        if value.ndim != 1:
            raise ValueError(f"`{name}` must have shape ({rows},), got {tuple(value.shape)}")
        _expect_rows(value, name, rows)
        self.check_like_model(value, name)
        if (
            isinstance(classes, int)
            and value.device.type == "cpu"
            and value.numel()
            and (int(value.min()) < 0 or int(value.max()) >= classes)
        ):
            raise ValueError(f"`{name}` must lie in [0, {classes - 1}]")
        return value

    def check_input(self, value: Tensor, name: str) -> None:
        """A named error when the clean batch ``value`` (``x0`` or ``a0``) cannot go through the
        model. The base class checks the device; subclasses add what their family needs (shape,
        channels, spatial size). The dtype is checked on ``x0``, whose dtype the draw takes.
        """
        self.check_like_model(value, name, dtype=False)

    def _check_image(self, value: Tensor, name: str, multiple: int = 1) -> None:
        """``(B, C, H, W)``, ``in_channels`` channels, ``H`` and ``W`` multiples of ``multiple``."""
        model = type(_unwrap(self.model)).__name__
        if value.ndim != 4:
            raise ValueError(
                f"`{name}` must have shape (B, C, H, W) for {model}, got {tuple(value.shape)}"
            )
        channels = self.config.get("in_channels")
        if isinstance(channels, int) and value.shape[1] != channels:
            raise ValueError(
                f"`{name}` has {value.shape[1]} channels but {model} takes in_channels={channels} "
                f"(shape {tuple(value.shape)})"
            )
        height, width = value.shape[2:]
        if min(height, width) < multiple or height % multiple or width % multiple:
            raise ValueError(
                f"`{name}` has spatial size {height}x{width}; {model} needs a height and width "
                f"that are positive multiples of {multiple}"
            )
        ModelAdapter.check_input(self, value, name)

    def loss(
        self,
        x0: Tensor | None,
        a0: Tensor,
        loss_fn: UnlearningLoss,
        *,
        timesteps: TimestepSpec = None,
        generator: torch.Generator | None = None,
        weights: Tensor | Callable[[Any], Tensor] | None = None,
        teacher: ModelAdapter | None = None,
        **conditioning: Any,
    ) -> LossTerms:
        """Sample a draw, call the model once on it and return the loss terms.

        Args:
            x0: clean keep points (pixels or latents), shape ``(B, C, H, W)``; ``None`` only for
                losses that take none (NegGrad), the batch then being ``a0``'s.
            a0: clean forget points, shape of ``x0`` or ``(1, C, H, W)``.
            loss_fn: any ``UnlearningLoss`` (e.g. from ``loss_from_scheduler``), on the device
                of ``x0``.
            timesteps: grid indices, as in ``loss_fn.sample`` (``None``: uniform).
            generator: source of all randomness of the draw.
            weights: per-row loss weights ``(B,)``, or a callable ``draw -> (B,)`` for weights
                that depend on the draw's timesteps, e.g.
                ``lambda draw: compute_snr(noise_scheduler, draw.timesteps)``; see
                ``UnlearningLoss.terms`` (``snr_gamma`` in the loss needs neither). On a ``2B``-row
                draw (``"siss-nois"``, ``"erasediff"``, ``"retrack"``), whose keep row ``j`` and
                forget row ``B + j`` share timestep ``j``, the callable may return ``(2B,)``
                weights, one a row: the first ``B``, the pairs', are used.
            teacher: the frozen model before unlearning, as an adapter (``siss.recipe.teacher_for``
                builds one): its prediction on the same noisy rows and conditioning, taken under
                ``torch.inference_mode``, is the keep term's target
                (``SISSLoss.terms(..., teacher_output=)``); ``SISSLoss`` only.
            **conditioning: the model's conditioning, ``B`` rows each (or 1, shared), e.g.
                ``encoder_hidden_states=(B, L, D)``; duplicated when the draw has ``2B`` rows.
                Row ``j`` conditions BOTH ``x0[j]`` and ``a0[j]``: with SISS's one call per pair
                the noisy point of row ``j`` is scored under this one conditioning against both
                clean points' targets, so the importance-sampling identity (Lemma 1) holds for
                the conditional model only when ``x0[j]`` and ``a0[j]`` share it (e.g. the
                paper's fixed memorized prompt). Different prompts for ``x0`` and ``a0`` would
                evaluate the forget term under ``x0``'s prompt, which is not NegGrad on
                ``(a0, prompt_a)``: pass the same prompt, or use ``"siss-nois"`` and call
                ``predict`` yourself with ``torch.cat([cond_x, cond_a])`` (module docstring).

        Returns:
            ``LossTerms(loss, keep, forget)``; call ``.loss.backward()``.

        Raises:
            ValueError, TypeError: naming the argument, for inputs the loss or the model cannot
                take (see the module docstring); the model is not called then.
        """
        if isinstance(loss_fn, type) or not (
            callable(getattr(loss_fn, "sample", None)) and callable(getattr(loss_fn, "terms", None))
        ):
            raise TypeError(
                "`loss_fn` must be an unlearning loss with `sample` and `terms` (e.g. from "
                f"`loss_from_scheduler`), got {_describe(loss_fn)}"
            )
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(
                f"`generator` must be a torch.Generator or None, got {_describe(generator)}"
            )
        for value, name in ((x0, "x0"), (a0, "a0")):
            if isinstance(value, Tensor) and value.is_floating_point():
                self.check_input(value, name)
        first = x0 if x0 is not None else a0
        if isinstance(first, Tensor) and first.is_floating_point():
            self.check_like_model(first, "x0" if x0 is not None else "a0")
            schedule = getattr(loss_fn, "schedule", None)
            if isinstance(schedule, NoiseSchedule) and schedule.gamma.device != first.device:
                raise ValueError(
                    f"`loss_fn` is on {schedule.gamma.device} but the batch is on {first.device}: "
                    "move it with `loss_fn.to(device)`"
                )
        draw = loss_fn.sample(x0, a0, timesteps=timesteps, generator=generator)
        batch, rows = first.shape[0], draw.noisy.shape[0]
        if rows not in (batch, 2 * batch):
            raise ValueError(
                f"`loss_fn`: the draw of {type(loss_fn).__name__} has {rows} rows for a batch of "
                f"{batch}; adapters support {batch} (one forward row per pair) or {2 * batch} "
                "(torch.cat([keep rows, forget rows]))"
            )
        conditioning = {
            k: v if k in self.shared_conditioning else _match_batch(v, k, batch, rows)
            for k, v in conditioning.items()
        }
        conditioning = self.training_conditioning(conditioning, generator)
        if _checks.validate_values_enabled():
            for name, value in _tensors(conditioning):
                _checks.check_finite_values(value, name)
        extra = {}
        if teacher is not None:
            with torch.inference_mode():  # no graph, no saved activations
                extra["teacher_output"] = teacher.predict(
                    draw.noisy, draw.timesteps, **conditioning
                )
        prediction = self.predict(draw.noisy, draw.timesteps, **conditioning)
        if _checks.validate_values_enabled() and isinstance(prediction, Tensor):
            _check_finite_prediction(prediction)
        if callable(weights):
            weights = weights(draw)
            if rows != batch and isinstance(weights, Tensor) and weights.shape == (rows,):
                weights = weights[:batch]  # a paired draw: pair j's two rows share timestep j
        return loss_fn.terms(prediction, draw, weights=weights, **extra)


class UNet2DAdapter(ModelAdapter):
    """Unconditional (or class-conditional) ``UNet2DModel``: DDPM, CelebA-HQ, MNIST models.

    Examples:
        >>> from diffusers import DDPMScheduler, UNet2DModel
        >>> from siss import SISSLoss
        >>> from siss.adapters import loss_from_scheduler
        >>> unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1,
        ...     block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1,
        ...     down_block_types=("DownBlock2D", "DownBlock2D"),
        ...     up_block_types=("UpBlock2D", "UpBlock2D"))
        >>> loss_fn = loss_from_scheduler(SISSLoss, DDPMScheduler(), lam=0.5, superfactor=0.1)
        >>> x0, a0 = torch.randn(4, 1, 8, 8), torch.randn(1, 1, 8, 8)
        >>> terms = UNet2DAdapter(unet).loss(x0, a0, loss_fn)
        >>> terms.loss.backward()
    """

    model_classes = ("UNet2DModel",)

    def check_input(self, value: Tensor, name: str) -> None:
        # Every down block but the last halves the size, and the up path must double it back.
        blocks = self.config.get("down_block_types") or ()
        self._check_image(value, name, 2 ** max(len(blocks) - 1, 0))

    def predict(
        self, noisy: Tensor, timesteps: Tensor, class_labels: Tensor | None = None, **kwargs: Any
    ) -> Tensor:
        """``model(noisy, timesteps, class_labels)``; ``class_labels`` shape ``(R,)`` if used."""
        config = self.config
        conditional = (
            config.get("class_embed_type") is not None or config.get("num_class_embeds") is not None
        )
        if class_labels is None and conditional:  # diffusers' own error comes after a call
            raise ValueError(
                "a class-conditional UNet2DModel (num_class_embeds="
                f"{config.get('num_class_embeds')}, class_embed_type="
                f"{config.get('class_embed_type')!r}) needs `class_labels` (B,): one class per row"
            )
        if class_labels is not None:
            if not conditional:
                raise ValueError(
                    "`class_labels` given to an unconditional UNet2DModel (no `class_embed_type` "
                    "or `num_class_embeds` in its config): leave them out"
                )
            if config.get("class_embed_type") is None:
                self.check_labels(
                    class_labels, "class_labels", noisy.shape[0], config.get("num_class_embeds")
                )
        output = self.model(
            noisy, timesteps, class_labels=class_labels, return_dict=False, **kwargs
        )
        return _mean_prediction(output[0], noisy)


class UNet2DConditionAdapter(ModelAdapter):
    """``UNet2DConditionModel``: Stable Diffusion 1.x/2.x and SDXL.

    Conditioning: ``encoder_hidden_states`` ``(B, L, D)`` (the text encoder's last hidden state);
    for SDXL also ``added_cond_kwargs={"text_embeds": (B, D_pool), "time_ids": (B, 6)}``.

    Examples:
        >>> from diffusers import DDPMScheduler, UNet2DConditionModel
        >>> from siss import SISSLoss
        >>> from siss.adapters import loss_from_scheduler
        >>> unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4,
        ...     block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1,
        ...     cross_attention_dim=8, attention_head_dim=2,
        ...     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        ...     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
        >>> loss_fn = loss_from_scheduler(SISSLoss, DDPMScheduler(), lam=0.5, superfactor=0.1)
        >>> latents_x, latents_a = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
        >>> prompt_embeds = torch.randn(2, 5, 8)
        >>> adapter = UNet2DConditionAdapter(unet)
        >>> terms = adapter.loss(latents_x, latents_a, loss_fn, encoder_hidden_states=prompt_embeds)
        >>> terms.loss.shape
        torch.Size([])
    """

    model_classes = ("UNet2DConditionModel",)

    def check_input(self, value: Tensor, name: str) -> None:
        # UNet2DConditionModel pads its up path to any size (`forward_upsample_size`).
        self._check_image(value, name)

    def predict(
        self,
        noisy: Tensor,
        timesteps: Tensor,
        encoder_hidden_states: Tensor | None = None,
        added_cond_kwargs: dict[str, Tensor] | None = None,
        **kwargs: Any,
    ) -> Tensor:
        """``model(noisy, timesteps, encoder_hidden_states, added_cond_kwargs=...)``.

        Args:
            noisy: ``(R, C, H, W)`` latents.
            timesteps: ``(R,)``.
            encoder_hidden_states: ``(R, L, D)``.
            added_cond_kwargs: SDXL's ``{"text_embeds": (R, D_pool), "time_ids": (R, 6)}``.
            **kwargs: further keyword inputs of the UNet (e.g. ``class_labels``).
        """
        if encoder_hidden_states is None:
            raise ValueError(
                "UNet2DConditionModel needs `encoder_hidden_states` (B, L, D): the prompt "
                "embeddings, e.g. from `pipe.encode_prompt`"
            )
        width = self.config.get("cross_attention_dim")
        if self.config.get("encoder_hid_dim") is not None:
            width = self.config.get("encoder_hid_dim")  # projected by the model first
        self.check_embedding(
            encoder_hidden_states, "encoder_hidden_states", noisy.shape[0], 3, width
        )
        if added_cond_kwargs is not None:
            if not isinstance(added_cond_kwargs, Mapping):
                raise TypeError(
                    f"`added_cond_kwargs` must be a dict, got {_describe(added_cond_kwargs)}"
                )
            for key, value in added_cond_kwargs.items():
                if isinstance(value, Tensor) and value.ndim >= 1:
                    _expect_rows(value, f"added_cond_kwargs[{key!r}]", noisy.shape[0])
                    self.check_like_model(value, f"added_cond_kwargs[{key!r}]")
        output = self.model(
            noisy,
            timesteps,
            encoder_hidden_states=encoder_hidden_states,
            added_cond_kwargs=added_cond_kwargs,
            return_dict=False,
            **kwargs,
        )
        return _mean_prediction(output[0], noisy)


class DiTAdapter(ModelAdapter):
    """Class-conditional ``DiTTransformer2DModel`` (or a DiT-style ``Transformer2DModel``).

    Conditioning: ``class_labels`` ``(B,)`` int64. A learned-variance output (``2C`` channels, as
    in DiT-XL/2) is cut to its first ``C`` channels, the mean prediction the loss trains.

    Examples:
        >>> from diffusers import DDPMScheduler, DiTTransformer2DModel
        >>> from siss import SISSLoss
        >>> from siss.adapters import loss_from_scheduler
        >>> dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
        ...     out_channels=8, num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
        >>> loss_fn = loss_from_scheduler(SISSLoss, DDPMScheduler(), lam=0.5, superfactor=0.1)
        >>> latents_x, latents_a = torch.randn(2, 4, 8, 8), torch.randn(1, 4, 8, 8)
        >>> labels = torch.tensor([3])  # one class for every row
        >>> DiTAdapter(dit).loss(latents_x, latents_a, loss_fn, class_labels=labels).loss.shape
        torch.Size([])
    """

    model_classes = ("DiTTransformer2DModel", "Transformer2DModel")

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        config = self.config
        if config.get("norm_type", "ada_norm_zero") != "ada_norm_zero" or not isinstance(
            config.get("patch_size"), int
        ):
            raise TypeError(
                f"no adapter for this {type(_unwrap(model)).__name__} (`model`): DiTAdapter takes "
                "the class-conditional, patched DiT configuration (norm_type='ada_norm_zero', "
                f"patch_size set), got norm_type={config.get('norm_type')!r}, "
                f"patch_size={config.get('patch_size')!r} (PixArt's 'ada_norm_single' or an "
                "unpatched model: subclass `siss.adapters.ModelAdapter` and implement `predict`)"
            )
        # diffusers' CombinedTimestepLabelEmbeddings (one per block) drop labels in train mode
        # with the global generator, each block on its own: siss draws the drop instead.
        self._label_embeddings = [
            module
            for module in _unwrap(model).modules()
            if type(module).__name__ == "LabelEmbedding" and module.dropout_prob > 0
        ]

    def check_input(self, value: Tensor, name: str) -> None:
        self._check_image(value, name, self.config["patch_size"])
        if value.ndim == 4 and value.shape[2] != value.shape[3]:
            raise ValueError(
                f"`{name}` has spatial size {value.shape[2]}x{value.shape[3]}; a DiT takes square "
                "inputs only (diffusers unpatchifies its output as a square)"
            )

    def training_conditioning(
        self, conditioning: dict[str, Any], generator: torch.Generator | None
    ) -> dict[str, Any]:
        """Classifier-free guidance's label dropout, drawn with ``generator``: in train mode, each
        row's ``class_labels`` becomes the null class (``num_embeds_ada_norm``) with the model's
        own probability (``class_dropout_prob``, 0.1 in diffusers' DiT), the same labels for the
        model and the teacher (which, in eval mode, would drop none); ``predict`` itself drops
        none, so that the draw is the generator's alone."""
        labels = conditioning.get("class_labels")
        if not (self._label_embeddings and self.model.training and isinstance(labels, Tensor)):
            return conditioning
        embedding = self._label_embeddings[0]
        drop = torch.rand(labels.shape, generator=generator, device=labels.device)
        dropped = torch.where(drop < embedding.dropout_prob, embedding.num_classes, labels)
        return {**conditioning, "class_labels": dropped}

    def predict(
        self, noisy: Tensor, timesteps: Tensor, class_labels: Tensor | None = None, **kwargs: Any
    ) -> Tensor:
        """``model(noisy, timestep=timesteps, class_labels=class_labels)``: the labels as given
        (the null class ``num_embeds_ada_norm`` included, where the model has one), none dropped
        by the model in train mode (``training_conditioning`` draws the dropout)."""
        if class_labels is None:
            raise ValueError("a DiT needs `class_labels` (B,): one class index per row")
        classes = self.config.get("num_embeds_ada_norm")
        if isinstance(classes, int) and self._label_embeddings:
            classes += 1  # the null class of classifier-free guidance
        self.check_labels(class_labels, "class_labels", noisy.shape[0], classes)
        dropping = [module for module in self._label_embeddings if module.training]
        for module in dropping:
            module.training = False
        try:
            output = self.model(
                noisy, timestep=timesteps, class_labels=class_labels, return_dict=False, **kwargs
            )
        finally:
            for module in dropping:
                module.training = True
        return _mean_prediction(output[0], noisy)


class SD3TransformerAdapter(ModelAdapter):
    """``SD3Transformer2DModel`` (Stable Diffusion 3/3.5), a flow-matching model.

    Use it with a loss built from the model's ``FlowMatchEulerDiscreteScheduler``: timesteps are
    the scheduler's float timesteps and the target is the velocity ``eps - x_0``.
    Conditioning: ``encoder_hidden_states`` ``(B, L, D_joint)`` and ``pooled_projections``
    ``(B, D_pool)``, as returned by ``StableDiffusion3Pipeline.encode_prompt``.

    Examples:
        >>> from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        >>> from siss import SISSLoss
        >>> from siss.adapters import loss_from_scheduler
        >>> transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4,
        ...     out_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        ...     joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8)
        >>> scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        >>> loss_fn = loss_from_scheduler(SISSLoss, scheduler, lam=0.5, superfactor=0.1)
        >>> loss_fn.prediction_type
        'flow_prediction'
        >>> terms = SD3TransformerAdapter(transformer).loss(
        ...     torch.randn(2, 4, 8, 8), torch.randn(1, 4, 8, 8), loss_fn,
        ...     encoder_hidden_states=torch.randn(1, 5, 16), pooled_projections=torch.randn(1, 8))
        >>> terms.loss.shape
        torch.Size([])
    """

    model_classes = ("SD3Transformer2DModel",)

    def check_input(self, value: Tensor, name: str) -> None:
        config = self.config
        patch = config.get("patch_size")
        patch = patch if isinstance(patch, int) else 1
        self._check_image(value, name, patch)
        limit = config.get("pos_embed_max_size")
        if isinstance(limit, int) and max(value.shape[2:]) > limit * patch:
            raise ValueError(
                f"`{name}` has spatial size {value.shape[2]}x{value.shape[3]}; this "
                f"SD3Transformer2DModel takes at most {limit * patch} (pos_embed_max_size={limit} "
                f"patches of {patch})"
            )

    def predict(
        self,
        noisy: Tensor,
        timesteps: Tensor,
        encoder_hidden_states: Tensor | None = None,
        pooled_projections: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor:
        """``model(hidden_states=noisy, timestep=..., encoder_hidden_states=..., pooled_...)``."""
        if encoder_hidden_states is None or pooled_projections is None:
            raise ValueError(
                "SD3Transformer2DModel needs `encoder_hidden_states` (B, L, D) and "
                "`pooled_projections` (B, D_pool)"
            )
        self._check_joint_text(encoder_hidden_states, pooled_projections, noisy.shape[0])
        output = self.model(
            hidden_states=noisy,
            timestep=timesteps,
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections,
            return_dict=False,
            **kwargs,
        )
        return output[0]


def _flux_pipeline() -> Any:
    """diffusers' ``FluxPipeline`` class, for its static ``_pack_latents``, ``_unpack_latents`` and
    ``_prepare_latent_image_ids`` (what the Flux training scripts call)."""
    with needs("siss.adapters.FluxTransformerAdapter"):
        from diffusers import FluxPipeline
    return FluxPipeline


class FluxTransformerAdapter(ModelAdapter):
    """``FluxTransformer2DModel`` (FLUX.1 dev/schnell), a flow-matching model on packed latents.

    ``predict`` takes latents ``(R, C, H, W)`` as the VAE gives them, shifted and scaled (see
    ``encode_latents``), so the loss, its sampler and its weights see images in the usual layout,
    and calls the transformer once exactly as diffusers' ``train_dreambooth_lora_flux.py`` does:

    * ``hidden_states``: ``FluxPipeline._pack_latents(noisy, R, C, H, W)``, 2x2 patches
      ``(R, H/2 * W/2, 4C)``; the model's ``in_channels`` is ``4C`` (64 for FLUX.1's 16 latent
      channels), and ``H``, ``W`` must be even;
    * ``img_ids``: ``FluxPipeline._prepare_latent_image_ids(R, H // 2, W // 2, ...)``
      ``(H/2 * W/2, 3)`` in the latents' dtype, and ``txt_ids``: zeros ``(L, 3)``, as
      ``FluxPipeline.encode_prompt`` returns them (both shared by every row, no batch dimension);
    * ``timestep``: ``timesteps / 1000``, the draw's scheduler timesteps ``sigma * T`` over 1000
      (``sigma`` itself for FLUX.1's ``T = 1000``; the transformer multiplies by 1000 again), as
      the script and ``FluxPipeline`` pass it;
    * ``guidance``: with ``guidance_embeds`` in the model's config (FLUX.1-dev, guidance
      distilled), ``guidance_scale`` broadcast to the rows (the script's
      ``torch.tensor([args.guidance_scale]).expand(B)``; its default 3.5); ``None`` without;
    * the output ``(R, H/2 * W/2, 4C)`` unpacked with ``FluxPipeline._unpack_latents`` to the
      shape of ``noisy``: the velocity, trained towards ``noise - latents`` (the loss's
      ``flow_prediction`` target, the script's ``target = noise - model_input``).

    Conditioning: ``encoder_hidden_states`` ``(B, L, D_joint)`` (T5) and ``pooled_projections``
    ``(B, D_pool)`` (CLIP's pooled output), the first two results of ``FluxPipeline.encode_prompt``
    (``prompt_conditioning(pipe, prompt)`` gives both); optionally ``txt_ids`` ``(L, 3)``, its
    third (zeros: built here when left out), and ``guidance`` per call (a float, or a tensor
    ``(B,)`` / ``(1,)``) in place of ``guidance_scale``.

    Noise levels: the loss built by ``loss_from_scheduler(method, pipe.scheduler, ...)`` samples
    the scheduler's training grid, as the script indexes ``noise_scheduler_copy.timesteps`` and
    ``.sigmas`` of a freshly loaded scheduler. FLUX.1's scheduler config has
    ``use_dynamic_shifting=True``: its training grid is then UNshifted (``sigma_i = (T - i) / T``;
    its ``shift`` is not applied) and the resolution-dependent shift ``mu`` is applied by the
    pipeline at inference only (``set_timesteps(mu=...)``). This adapter does the same: it passes
    the draw's timesteps on and applies no shift of its own, so with ``use_dynamic_shifting=False``
    the grid is shifted by the scheduler's ``shift`` (as for SD3, ``SD3TransformerAdapter``).
    The script's ``--weighting_scheme`` (``logit_normal``, ``mode``) draws
    ``u = compute_density_for_timestep_sampling(...)`` and indexes ``(u * T).long()``: pass those
    indices as ``loss(..., timesteps=indices)``; its loss weighting
    (``compute_loss_weighting_for_sd3``, for ``sigma_sqrt`` and ``cosmap``) goes in
    ``weights=lambda draw: ...(sigmas=draw.sigma)``.

    Args:
        model: the ``FluxTransformer2DModel`` (possibly wrapped by DDP, ``torch.compile`` or PEFT).
        guidance_scale: the guidance embedding's input when ``guidance`` is not given per call,
            used only when the model has ``guidance_embeds``; default 3.5, the script's
            ``--guidance_scale`` and ``FluxPipeline``'s default.

    Examples:
        >>> from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        >>> from siss import SISSLoss
        >>> from siss.adapters import loss_from_scheduler
        >>> transformer = FluxTransformer2DModel(in_channels=16, num_layers=1, num_single_layers=1,
        ...     attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
        ...     pooled_projection_dim=32, axes_dims_rope=(4, 4, 8), guidance_embeds=True)
        >>> scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
        >>> loss_fn = loss_from_scheduler(SISSLoss, scheduler, lam=0.5, superfactor=0.1)
        >>> adapter = FluxTransformerAdapter(transformer)  # or adapter_for(transformer)
        >>> latents_x, latents_a = torch.randn(2, 4, 8, 8), torch.randn(1, 4, 8, 8)  # 4 = 16 / 4
        >>> terms = adapter.loss(latents_x, latents_a, loss_fn,
        ...     encoder_hidden_states=torch.randn(1, 6, 32), pooled_projections=torch.randn(1, 32))
        >>> terms.loss.shape
        torch.Size([])
    """

    model_classes = ("FluxTransformer2DModel",)
    shared_conditioning = ("txt_ids",)

    def __init__(self, model: nn.Module, guidance_scale: float = 3.5) -> None:
        super().__init__(model)
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, Real):
            raise TypeError(f"`guidance_scale` must be a number, got {_describe(guidance_scale)}")
        if not math.isfinite(guidance_scale):
            raise ValueError(f"`guidance_scale` must be finite, got {guidance_scale!r}")
        self.guidance_scale = float(guidance_scale)

    def check_input(self, value: Tensor, name: str) -> None:
        model = type(_unwrap(self.model)).__name__
        if value.ndim != 4:
            raise ValueError(
                f"`{name}` must be unpacked latents (B, C, H, W) for {model}, got "
                f"{tuple(value.shape)}"
            )
        channels = self.config.get("in_channels")
        if isinstance(channels, int) and value.shape[1] * 4 != channels:
            raise ValueError(
                f"`{name}` has {value.shape[1]} channels but {model} takes in_channels={channels} "
                f"packed channels: latents with {channels / 4:g} channels, packed into 2x2 "
                f"patches by the adapter (shape {tuple(value.shape)})"
            )
        height, width = value.shape[2:]
        if min(height, width) < 2 or height % 2 or width % 2:
            raise ValueError(
                f"`{name}` has spatial size {height}x{width}; {model} takes latents packed into "
                "2x2 patches, so height and width must be positive multiples of 2"
            )
        ModelAdapter.check_input(self, value, name)

    def _guidance(self, guidance: object, rows: int, device: torch.device) -> Tensor | None:
        """``(R,)`` guidance for a guidance-distilled model, ``None`` for one without."""
        if not self.config.get("guidance_embeds", False):
            if guidance is not None:
                raise ValueError(
                    f"`guidance` given, but this {type(_unwrap(self.model)).__name__} has no "
                    "guidance embedding (guidance_embeds=False, e.g. FLUX.1-schnell): leave it out"
                )
            return None
        if guidance is None:
            guidance = self.guidance_scale
        if isinstance(guidance, Tensor):
            if guidance.dtype == torch.bool or guidance.is_complex():
                raise TypeError(f"`guidance` must hold real numbers, got dtype {guidance.dtype}")
            if guidance.ndim == 0:
                return guidance.expand(rows)
            if guidance.ndim != 1:
                raise ValueError(
                    f"`guidance` must have shape ({rows},) or be a number, got "
                    f"{tuple(guidance.shape)}"
                )
            _expect_rows(guidance, "guidance", rows)
            self.check_like_model(guidance, "guidance", dtype=False)
            return guidance
        if isinstance(guidance, bool) or not isinstance(guidance, Real):
            raise TypeError(f"`guidance` must be a number or a tensor, got {_describe(guidance)}")
        # train_dreambooth_lora_flux.py: torch.tensor([args.guidance_scale]).expand(bsz)
        return torch.tensor([float(guidance)], device=device).expand(rows)

    def predict(
        self,
        noisy: Tensor,
        timesteps: Tensor,
        encoder_hidden_states: Tensor | None = None,
        pooled_projections: Tensor | None = None,
        guidance: float | Tensor | None = None,
        txt_ids: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor:
        """Pack ``noisy``, call the transformer once, unpack its output (class docstring).

        Args:
            noisy: unpacked latents ``(R, C, H, W)`` with ``4C = in_channels``, ``H``, ``W`` even.
            timesteps: the scheduler's timesteps ``(R,)`` (``sigma * T``); the model gets them
                divided by 1000.
            encoder_hidden_states: ``(R, L, D_joint)``.
            pooled_projections: ``(R, D_pool)``.
            guidance: a number, a 0-d tensor or ``(R,)``; default ``guidance_scale``. Only for a
                model with ``guidance_embeds``.
            txt_ids: ``(L, 3)``, shared by every row; default zeros, as ``encode_prompt`` gives.
            **kwargs: further keyword inputs of the transformer (e.g. ``joint_attention_kwargs``).

        Returns:
            The velocity prediction, shape of ``noisy``.
        """
        if encoder_hidden_states is None or pooled_projections is None:
            raise ValueError(
                "FluxTransformer2DModel needs `encoder_hidden_states` (B, L, D) and "
                "`pooled_projections` (B, D_pool), e.g. from `prompt_conditioning(pipe, prompt)`"
            )
        if "img_ids" in kwargs:
            raise ValueError(
                "`img_ids` is built by the adapter from the latents' size "
                "(FluxPipeline._prepare_latent_image_ids): leave it out"
            )
        if not isinstance(noisy, Tensor):
            raise TypeError(f"`noisy` must be a torch.Tensor, got {_describe(noisy)}")
        self.check_input(noisy, "noisy")
        rows, channels, height, width = noisy.shape
        self._check_joint_text(encoder_hidden_states, pooled_projections, rows)
        length = encoder_hidden_states.shape[1]
        if txt_ids is None:
            txt_ids = torch.zeros(length, 3, device=noisy.device, dtype=noisy.dtype)
        elif not isinstance(txt_ids, Tensor) or tuple(txt_ids.shape) != (length, 3):
            shape = tuple(txt_ids.shape) if isinstance(txt_ids, Tensor) else _describe(txt_ids)
            raise ValueError(
                f"`txt_ids` must be a tensor ({length}, 3), one row per text token and shared by "
                f"every image row, as FluxPipeline.encode_prompt returns it; got {shape}"
            )
        else:
            self.check_like_model(txt_ids, "txt_ids", dtype=False)
        guidance = self._guidance(guidance, rows, noisy.device)
        pipeline = _flux_pipeline()
        img_ids = pipeline._prepare_latent_image_ids(
            rows, height // 2, width // 2, noisy.device, noisy.dtype
        )
        packed = pipeline._pack_latents(noisy.contiguous(), rows, channels, height, width)
        output = self.model(
            hidden_states=packed,
            timestep=timesteps / 1000,
            guidance=guidance,
            pooled_projections=pooled_projections,
            encoder_hidden_states=encoder_hidden_states,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
            **kwargs,
        )[0]
        # _unpack_latents takes pixel sizes and the VAE's factor; in latent units the factor is 1
        return pipeline._unpack_latents(output, height, width, 1)


ADAPTERS: tuple[type[ModelAdapter], ...] = (
    UNet2DAdapter,
    UNet2DConditionAdapter,
    DiTAdapter,
    SD3TransformerAdapter,
    FluxTransformerAdapter,
)


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model``'s class (looked through DDP/compile/PEFT wrappers).

    Raises:
        TypeError: for a model class no adapter handles, naming those that are handled.

    Examples:
        >>> from diffusers import UNet2DModel
        >>> unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1,
        ...     block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1,
        ...     down_block_types=("DownBlock2D", "DownBlock2D"),
        ...     up_block_types=("UpBlock2D", "UpBlock2D"))
        >>> type(adapter_for(unet)).__name__
        'UNet2DAdapter'
        >>> type(adapter_for(torch.compile(unet))).__name__  # wrappers are looked through
        'UNet2DAdapter'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"`model` must be a torch.nn.Module (a diffusers model instance), got "
            f"{_describe(model)}"
        )
    names = {cls.__name__ for cls in type(_unwrap(model)).__mro__}
    for adapter in ADAPTERS:
        if names.intersection(adapter.model_classes):
            return adapter(model)
    supported = ", ".join(name for adapter in ADAPTERS for name in adapter.model_classes)
    raise TypeError(
        f"no adapter for {type(_unwrap(model)).__name__} (`model`); supported: {supported} "
        "(subclass `siss.adapters.ModelAdapter` and implement `predict` for another model)"
    )


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``model`` that train (``requires_grad``), e.g. only LoRA's after
    ``model.add_adapter(LoraConfig(...))``; pass them to the optimizer and the balancer.

    Args:
        model: any module (a model, an adapter, a PEFT model).

    Returns:
        The trainable parameters, in ``model.parameters()`` order, without duplicates.

    Examples:
        >>> from diffusers import UNet2DConditionModel
        >>> from peft import LoraConfig
        >>> unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4,
        ...     block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1,
        ...     cross_attention_dim=8, attention_head_dim=2,
        ...     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        ...     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
        >>> _ = unet.requires_grad_(False)  # as diffusers' LoRA scripts do
        >>> unet.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        >>> params = trainable_parameters(unet)  # for the optimizer and the NormBalancer
        >>> names = [name for name, p in unet.named_parameters() if p.requires_grad]
        >>> len(params) == len(names) > 0, all(".lora_" in name for name in names)
        (True, True)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {_describe(model)}")
    return [p for p in model.parameters() if p.requires_grad]
