"""Prompt conditioning of a text-to-image pipeline: the model inputs for one fixed prompt.

The paper's Stable Diffusion experiment (Section 5.3) holds the prompt fixed during unlearning, so
the text-conditional model is trained as an unconditional one: every row of every batch gets the
same conditioning. ``prompt_conditioning`` computes it once, through the pipeline's own
``encode_prompt``, as the keyword inputs of the denoiser, one row each (the adapters broadcast a
1-row conditioning to any batch)::

    cond = prompt_conditioning(pipe, "a photo of ...")
    adapter = adapter_for(pipe.unet)                         # or pipe.transformer (SD3, Flux)
    terms = adapter.loss(latents_x, latents_a, loss_fn, **cond.conditional)

Families (one set of keys per denoiser):

* Stable Diffusion 1.x/2.x (``UNet2DConditionModel``): ``{"encoder_hidden_states": (1, L, D)}``.
* SDXL (``UNet2DConditionModel`` with ``addition_embed_type="text_time"``): the above plus
  ``{"added_cond_kwargs": {"text_embeds": (1, P), "time_ids": (1, 6)}}``; ``time_ids`` is the
  pipeline's micro-conditioning ``(original_size, crop top-left, target_size)`` for an uncropped
  image of ``size`` (default: the pipeline's default resolution), from its ``_get_add_time_ids``.
* Stable Diffusion 3/3.5 (``SD3Transformer2DModel``): ``{"encoder_hidden_states": (1, L, D),
  "pooled_projections": (1, P)}``; without the T5 encoder the pipeline pads with zeros (its own
  rule).
* Flux (``FluxTransformer2DModel``): ``{"encoder_hidden_states": (1, L, D), "pooled_projections":
  (1, P)}``, the T5 embeddings and CLIP's pooled output of ``FluxPipeline.encode_prompt``. Its
  third result, ``text_ids``, is left out: zeros ``(L, 3)`` shared by every row (no batch
  dimension, so it is not a per-row input), which ``FluxTransformerAdapter`` builds itself. Flux
  has no negative prompt of its own: ``unconditional`` encodes ``negative_prompt`` (``""`` also
  for ``None``) the same way, as ``FluxPipeline`` does for true CFG (``true_cfg_scale``).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from numbers import Integral
from typing import Any

import torch
from torch import Tensor

__all__ = ["PromptConditioning", "prompt_conditioning"]

# The text components each family's ``encode_prompt`` reads (SDXL may lack the first encoder,
# as the refiner does; SD3 pads a missing T5 encoder with zeros).
_REQUIRED = {
    "sd": (("tokenizer", "text_encoder"),),
    "sdxl": (("tokenizer_2", "text_encoder_2"),),
    "sd3": (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")),
    "flux": (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")),
}


def _map_tensors(value: Any, fn: Any) -> Any:
    """``fn`` applied to every tensor inside ``value`` (dicts, lists, tuples)."""
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, Mapping):
        return {key: _map_tensors(v, fn) for key, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_map_tensors(v, fn) for v in value)
    return value


def _move(value: Tensor, device: Any, dtype: torch.dtype | None) -> Tensor:
    if dtype is not None and value.is_floating_point():
        return value.to(device=device, dtype=dtype)
    return value.to(device=device) if device is not None else value


def _plain(value: Tensor) -> Tensor:
    """A tensor usable by autograd: an inference tensor (made under ``torch.inference_mode``)
    cannot be saved for backward, so a training step on it would fail; copy it out."""
    value = value.detach()
    if value.is_inference():
        with torch.inference_mode(False):
            return value.clone()
    return value


@dataclass(frozen=True, eq=False)
class PromptConditioning:
    """Model keyword arguments for one prompt, one row each.

    The adapters (``siss.adapters.adapter_for(...).loss``) and the audit's checks broadcast a
    1-row conditioning to any batch, so these can be passed as they are.

    Attributes:
        conditional: the prompt's inputs, e.g. ``{"encoder_hidden_states": (1, L, D)}``; SDXL
            adds ``{"added_cond_kwargs": {"text_embeds": (1, P), "time_ids": (1, 6)}}``; SD3 and
            Flux have ``{"encoder_hidden_states": (1, L, D), "pooled_projections": (1, P)}``.
        unconditional: the same keys for the negative prompt (by default the empty prompt ``""``):
            the unconditional branch of classifier-free guidance.

    Examples:
        >>> cond = PromptConditioning({"encoder_hidden_states": torch.zeros(1, 4, 8)},
        ...                           {"encoder_hidden_states": torch.ones(1, 4, 8)})
        >>> cond.to(dtype=torch.float16).conditional["encoder_hidden_states"].dtype
        torch.float16
    """

    conditional: dict[str, Any]
    unconditional: dict[str, Any]

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> PromptConditioning:
        """A copy on ``device`` with floating tensors cast to ``dtype`` (integer tensors keep
        theirs); ``None`` keeps each."""
        return PromptConditioning(
            _map_tensors(self.conditional, lambda t: _move(t, device, dtype)),
            _map_tensors(self.unconditional, lambda t: _move(t, device, dtype)),
        )


def _denoiser(pipe: Any) -> tuple[str, Any]:
    """``(family, denoiser)`` of a Stable Diffusion 1.x/2.x, SDXL, SD3 or Flux pipeline."""
    unet = getattr(pipe, "unet", None)
    transformer = getattr(pipe, "transformer", None)
    if unet is not None:
        config = getattr(unet, "config", None)
        if getattr(config, "addition_embed_type", None) == "text_time":
            return "sdxl", unet
        if "encoder_hidden_states" in inspect.signature(unet.forward).parameters:
            return "sd", unet
    if transformer is not None:
        parameters = inspect.signature(transformer.forward).parameters
        if "pooled_projections" in parameters and "encoder_hidden_states" in parameters:
            # Flux's transformer also takes both; its position ids tell it apart
            if "img_ids" in parameters and "txt_ids" in parameters:
                return "flux", transformer
            return "sd3", transformer
    denoiser = unet if unet is not None else transformer
    raise TypeError(
        f"`pipe` ({type(pipe).__name__}) is not a Stable Diffusion 1.x/2.x, SDXL, SD3 or Flux "
        "pipeline: prompt_conditioning needs a text-conditional `unet` (UNet2DConditionModel) or "
        "an SD3 or Flux `transformer` (SD3Transformer2DModel, FluxTransformer2DModel), found "
        + (type(denoiser).__name__ if denoiser is not None else "neither")
    )


def _check_size(size: object) -> tuple[int, int]:
    if (
        not isinstance(size, list | tuple)
        or len(size) != 2
        or any(isinstance(v, bool) or not isinstance(v, Integral) or v < 1 for v in size)
    ):
        raise ValueError(f"`size` must be a pair of positive ints (height, width), got {size!r}")
    return int(size[0]), int(size[1])


def prompt_conditioning(
    pipe: Any,
    prompt: str,
    *,
    negative_prompt: str | None = "",
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    size: tuple[int, int] | None = None,
    **encode_kwargs: Any,
) -> PromptConditioning:
    """The denoiser's inputs for ``prompt``, through the pipeline's own ``encode_prompt``.

    Supports ``StableDiffusionPipeline`` (1.x/2.x), ``StableDiffusionXLPipeline``,
    ``StableDiffusion3Pipeline`` and ``FluxPipeline`` (and their variants that share the same
    components and ``encode_prompt``); see the module docstring for the keys of each. The text
    encoders run under ``torch.no_grad`` and the result carries no graph. It may be called under
    ``torch.inference_mode``: the tensors are returned as ordinary tensors, usable in a training
    step.

    Args:
        pipe: the diffusers pipeline (its tokenizers, text encoders and denoiser are used; the
            VAE, the scheduler and the denoiser's weights are not).
        prompt: the prompt (``""`` for the unconditional branch itself).
        negative_prompt: the prompt of ``unconditional`` (``""``: the empty prompt, as Wen et
            al.'s score and classifier-free guidance use). ``None`` leaves it to the pipeline:
            the same as ``""`` except for SDXL pipelines with ``force_zeros_for_empty_prompt``,
            whose unconditional embeddings are then zeros (what ``pipe(prompt)`` samples with).
            Flux encodes it like ``prompt`` (``None``: ``""``).
        device: where the returned tensors go (default: the pipeline's execution device). The
            text encoders run where they are (``pipe._execution_device``) and are not moved.
        dtype: cast the floating tensors to it (default: as ``encode_prompt`` returns them).
        size: SDXL only: the ``(height, width)`` in pixels of the images the model will see,
            for ``time_ids`` (default: the pipeline's default resolution,
            ``default_sample_size * vae_scale_factor``). Ignored by other families.
        **encode_kwargs: passed on to ``pipe.encode_prompt`` (e.g. ``clip_skip``,
            ``lora_scale``, SD3's and Flux's ``max_sequence_length``).

    Returns:
        A ``PromptConditioning`` with 1-row tensors.

    Raises:
        TypeError: naming ``prompt``/``negative_prompt`` when not a string, or ``pipe`` when it
            is not one of the supported pipelines.
        ValueError: naming ``pipe`` when it lacks the tokenizer or text encoder its
            ``encode_prompt`` needs, or ``size`` when it is not a pair of positive ints.

    Examples:
        A tiny Stable Diffusion pipeline from config, with a letter-by-letter vocabulary (no
        download; the VAE and the scheduler are not needed):

        >>> import json, tempfile
        >>> from pathlib import Path
        >>> from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
        >>> from diffusers import UNet2DConditionModel
        >>> from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
        >>> letters = list("abcdefghijklmnopqrstuvwxyz")
        >>> tokens = ["<|startoftext|>", "<|endoftext|>", *letters, *(c + "</w>" for c in letters)]
        >>> folder = tempfile.TemporaryDirectory()
        >>> vocab, merges = Path(folder.name, "vocab.json"), Path(folder.name, "merges.txt")
        >>> _ = vocab.write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
        >>> _ = merges.write_text("#version: 0.2\\n")
        >>> tokenizer = CLIPTokenizer(str(vocab), str(merges), model_max_length=16)
        >>> folder.cleanup()
        >>> text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokens), hidden_size=8,
        ...     intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        ...     max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1))
        >>> unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4,
        ...     block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1,
        ...     cross_attention_dim=8, attention_head_dim=2,
        ...     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        ...     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
        >>> vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4)  # not used here
        >>> pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        ...     unet=unet, scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
        ...     requires_safety_checker=False)
        >>> cond = prompt_conditioning(pipe, "a photo of a hippo")
        >>> cond.conditional["encoder_hidden_states"].shape  # one row, broadcast to any batch
        torch.Size([1, 16, 8])
        >>> list(cond.unconditional)  # the empty prompt's: classifier-free guidance's other branch
        ['encoder_hidden_states']
    """
    if not isinstance(prompt, str):
        raise TypeError(f"`prompt` must be a str, got {type(prompt).__name__}")
    if negative_prompt is not None and not isinstance(negative_prompt, str):
        raise TypeError(
            f"`negative_prompt` must be a str or None, got {type(negative_prompt).__name__}"
        )
    if not callable(getattr(pipe, "encode_prompt", None)):
        raise TypeError(
            f"`pipe` must be a diffusers text-to-image pipeline with `encode_prompt`, got "
            f"{type(pipe).__name__}"
        )
    family, denoiser = _denoiser(pipe)
    missing = [
        name for group in _REQUIRED[family] for name in group if getattr(pipe, name, None) is None
    ]
    if family == "sdxl" and (getattr(pipe, "tokenizer", None) is None) != (
        getattr(pipe, "text_encoder", None) is None
    ):
        missing.append("tokenizer" if getattr(pipe, "tokenizer", None) is None else "text_encoder")
    if missing:
        raise ValueError(
            f"`pipe` ({type(pipe).__name__}) has no {', '.join(missing)}: its encode_prompt needs "
            "them (load the pipeline with its text encoders and tokenizers)"
        )
    if family == "sdxl" and size is not None:
        size = _check_size(size)
    # encode where the text encoders are (encode_prompt sends the token ids to `device`), then
    # move the result: the pipeline's modules are left where they are
    encode_device = getattr(pipe, "_execution_device", None) or denoiser.device
    device = torch.device(device) if device is not None else torch.device(encode_device)

    with torch.no_grad():
        if family == "flux":
            # FluxPipeline.encode_prompt has no negative prompt: encode both the same way; its
            # text_ids (zeros (L, 3), no batch dimension) are rebuilt by FluxTransformerAdapter
            branches = []
            for text in (prompt, "" if negative_prompt is None else negative_prompt):
                embeds, pooled, _text_ids = pipe.encode_prompt(
                    prompt=text,
                    prompt_2=None,
                    device=encode_device,
                    num_images_per_prompt=1,
                    **encode_kwargs,
                )
                branches.append({"encoder_hidden_states": embeds, "pooled_projections": pooled})
            conditional, unconditional = branches
        elif family == "sd":
            embeds, null = pipe.encode_prompt(
                prompt,
                encode_device,
                1,
                True,
                negative_prompt=negative_prompt,
                **encode_kwargs,
            )
            conditional = {"encoder_hidden_states": embeds}
            unconditional = {"encoder_hidden_states": null}
        else:
            extra = {"prompt_2": None} if family == "sdxl" else {"prompt_2": None, "prompt_3": None}
            embeds, null, pooled, null_pooled = pipe.encode_prompt(
                prompt=prompt,
                device=encode_device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=True,
                negative_prompt=negative_prompt,
                **extra,
                **encode_kwargs,
            )
            if family == "sd3":
                conditional = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
                unconditional = {"encoder_hidden_states": null, "pooled_projections": null_pooled}
            else:
                time_ids = _sdxl_time_ids(pipe, size, embeds.dtype, pooled).to(embeds.device)
                conditional = {
                    "encoder_hidden_states": embeds,
                    "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids},
                }
                unconditional = {
                    "encoder_hidden_states": null,
                    "added_cond_kwargs": {"text_embeds": null_pooled, "time_ids": time_ids},
                }
    result = PromptConditioning(
        _map_tensors(conditional, _plain), _map_tensors(unconditional, _plain)
    )
    return result.to(device, dtype)


def _sdxl_time_ids(
    pipe: Any, size: tuple[int, int] | None, dtype: torch.dtype, pooled: Tensor
) -> Tensor:
    """SDXL's ``time_ids`` ``(1, 6)`` for an uncropped image of ``size``, as ``pipe(...)`` builds
    them (``original_size = target_size = size``, crop top-left ``(0, 0)``)."""
    if size is None:
        side = int(pipe.default_sample_size) * int(pipe.vae_scale_factor)
        size = (side, side)
    encoder_2 = getattr(pipe, "text_encoder_2", None)
    projection = (
        int(encoder_2.config.projection_dim) if encoder_2 is not None else int(pooled.shape[-1])
    )
    get = getattr(pipe, "_get_add_time_ids", None)
    parameters = inspect.signature(get).parameters if callable(get) else {}
    if "aesthetic_score" in parameters or "original_size" not in parameters:
        raise TypeError(
            f"`pipe` ({type(pipe).__name__}) builds SDXL time ids differently (e.g. the refiner's "
            "aesthetic score); load the base model with StableDiffusionXLPipeline"
        )
    return get(
        tuple(size), (0, 0), tuple(size), dtype=dtype, text_encoder_projection_dim=projection
    )
