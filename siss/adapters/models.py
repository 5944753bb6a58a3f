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

The model may be wrapped by ``DistributedDataParallel``, ``torch.compile`` or a PEFT model; it may
run in fp16/bf16 under ``torch.autocast``: the loss reduces in float32 whatever the output dtype.
Without autocast, pass ``x0``/``a0`` in the model's dtype (the draw's ``noisy`` has their dtype).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from siss.losses import LossTerms, UnlearningLoss
from siss.schedule import TimestepSpec


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
            raise ValueError(
                f"conditioning `{name}` has {value.shape[0]} rows; expected {batch} (one per "
                "(x0, a0) pair) or 1 (shared by every row)"
            )
        return value if rows == batch else torch.cat([value, value])
    if isinstance(value, Mapping):
        return {key: _match_batch(v, f"{name}[{key!r}]", batch, rows) for key, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(
            _match_batch(v, f"{name}[{i}]", batch, rows) for i, v in enumerate(value)
        )
    return value


class ModelAdapter(nn.Module):
    """Base of the model adapters: one ``predict`` hook, one ``loss`` call per training step.

    Subclasses set ``model_classes`` (the diffusers class names they accept) and implement
    ``predict``. The adapter registers the model as a submodule, so ``adapter.parameters()`` and
    ``adapter.to(device)`` reach it.

    Args:
        model: the diffusers model (possibly wrapped by DDP, ``torch.compile`` or PEFT).

    Raises:
        TypeError: when the (unwrapped) model is not one of ``model_classes``.
    """

    model_classes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
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

    def loss(
        self,
        x0: Tensor | None,
        a0: Tensor,
        loss_fn: UnlearningLoss,
        *,
        timesteps: TimestepSpec = None,
        generator: torch.Generator | None = None,
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
            **conditioning: the model's conditioning, ``B`` rows each (or 1, shared), e.g.
                ``encoder_hidden_states=(B, L, D)``; duplicated when the draw has ``2B`` rows.

        Returns:
            ``LossTerms(loss, keep, forget)``; call ``.loss.backward()``.
        """
        draw = loss_fn.sample(x0, a0, timesteps=timesteps, generator=generator)
        batch, rows = (a0 if x0 is None else x0).shape[0], draw.noisy.shape[0]
        if rows not in (batch, 2 * batch):
            raise ValueError(
                f"the draw of {type(loss_fn).__name__} has {rows} rows for a batch of {batch}; "
                f"adapters support {batch} (one forward row per pair) or {2 * batch} "
                "(torch.cat([keep rows, forget rows]))"
            )
        conditioning = {k: _match_batch(v, k, batch, rows) for k, v in conditioning.items()}
        prediction = self.predict(draw.noisy, draw.timesteps, **conditioning)
        return loss_fn.terms(prediction, draw)


class UNet2DAdapter(ModelAdapter):
    """Unconditional (or class-conditional) ``UNet2DModel``: DDPM, CelebA-HQ, MNIST models.

    Example:
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

    def predict(
        self, noisy: Tensor, timesteps: Tensor, class_labels: Tensor | None = None, **kwargs: Any
    ) -> Tensor:
        """``model(noisy, timesteps, class_labels)``; ``class_labels`` shape ``(R,)`` if used."""
        output = self.model(
            noisy, timesteps, class_labels=class_labels, return_dict=False, **kwargs
        )
        return _mean_prediction(output[0], noisy)


class UNet2DConditionAdapter(ModelAdapter):
    """``UNet2DConditionModel``: Stable Diffusion 1.x/2.x and SDXL.

    Conditioning: ``encoder_hidden_states`` ``(B, L, D)`` (the text encoder's last hidden state);
    for SDXL also ``added_cond_kwargs={"text_embeds": (B, D_pool), "time_ids": (B, 6)}``.

    Example:
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
    """

    model_classes = ("DiTTransformer2DModel", "Transformer2DModel")

    def predict(
        self, noisy: Tensor, timesteps: Tensor, class_labels: Tensor | None = None, **kwargs: Any
    ) -> Tensor:
        """``model(noisy, timestep=timesteps, class_labels=class_labels)``."""
        if class_labels is None:
            raise ValueError("a DiT needs `class_labels` (B,): one class index per row")
        output = self.model(
            noisy, timestep=timesteps, class_labels=class_labels, return_dict=False, **kwargs
        )
        return _mean_prediction(output[0], noisy)


class SD3TransformerAdapter(ModelAdapter):
    """``SD3Transformer2DModel`` (Stable Diffusion 3/3.5), a flow-matching model.

    Use it with a loss built from the model's ``FlowMatchEulerDiscreteScheduler``: timesteps are
    the scheduler's float timesteps and the target is the velocity ``eps - x_0``.
    Conditioning: ``encoder_hidden_states`` ``(B, L, D_joint)`` and ``pooled_projections``
    ``(B, D_pool)``, as returned by ``StableDiffusion3Pipeline.encode_prompt``.
    """

    model_classes = ("SD3Transformer2DModel",)

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
        output = self.model(
            hidden_states=noisy,
            timestep=timesteps,
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections,
            return_dict=False,
            **kwargs,
        )
        return output[0]


ADAPTERS: tuple[type[ModelAdapter], ...] = (
    UNet2DAdapter,
    UNet2DConditionAdapter,
    DiTAdapter,
    SD3TransformerAdapter,
)


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model``'s class (looked through DDP/compile/PEFT wrappers).

    Raises:
        TypeError: for a model class no adapter handles, naming those that are handled.
    """
    names = {cls.__name__ for cls in type(_unwrap(model)).__mro__}
    for adapter in ADAPTERS:
        if names.intersection(adapter.model_classes):
            return adapter(model)
    supported = ", ".join(name for adapter in ADAPTERS for name in adapter.model_classes)
    raise TypeError(
        f"no adapter for {type(_unwrap(model)).__name__}; supported: {supported} (subclass "
        "`siss.adapters.ModelAdapter` and implement `predict` for another model)"
    )


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``model`` that train (``requires_grad``), e.g. only LoRA's after
    ``model.add_adapter(LoraConfig(...))``; pass them to the optimizer and the balancer.

    Args:
        model: any module (a model, an adapter, a PEFT model).

    Returns:
        The trainable parameters, in ``model.parameters()`` order, without duplicates.
    """
    return [p for p in model.parameters() if p.requires_grad]
