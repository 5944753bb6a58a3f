"""Diffusers adapters: losses from schedulers, one-call model adapters, latents, LoRA.

The only part of ``siss`` that imports diffusers (``pip install siss-unlearn[diffusers]``)::

    loss_fn = loss_from_scheduler(SISSLoss, pipe.scheduler, lam=0.5, superfactor=0.1)
    adapter = adapter_for(pipe.unet)
    adapter.loss(latents_x, latents_a, loss_fn, encoder_hidden_states=embeds).loss.backward()

A fixed prompt's inputs through the pipeline's own ``encode_prompt`` (SD 1.x/2.x, SDXL, SD3,
Flux)::

    cond = prompt_conditioning(pipe, "a photo of ...")
    adapter_for(pipe.unet).loss(latents_x, latents_a, loss_fn, **cond.conditional)

LoRA checkpoints through ``accelerate`` that hold the adapter, not the frozen model::

    register_lora_checkpoint_hooks(accelerator, pipe.unet)  # save_state / load_state
"""

from siss.adapters.latents import encode_latents
from siss.adapters.lora import (
    LORA_CHECKPOINT_FILE,
    lora_state_dict,
    register_lora_checkpoint_hooks,
)
from siss.adapters.models import (
    DiTAdapter,
    FluxTransformerAdapter,
    ModelAdapter,
    SD3TransformerAdapter,
    UNet2DAdapter,
    UNet2DConditionAdapter,
    adapter_for,
    trainable_parameters,
)
from siss.adapters.prompts import PromptConditioning, prompt_conditioning
from siss.adapters.schedulers import (
    SUPPORTED_SCHEDULERS,
    loss_from_scheduler,
    model_timesteps,
    prediction_type_from_scheduler,
    schedule_from_scheduler,
)

__all__ = [
    "LORA_CHECKPOINT_FILE",
    "SUPPORTED_SCHEDULERS",
    "DiTAdapter",
    "FluxTransformerAdapter",
    "ModelAdapter",
    "PromptConditioning",
    "SD3TransformerAdapter",
    "UNet2DAdapter",
    "UNet2DConditionAdapter",
    "adapter_for",
    "encode_latents",
    "lora_state_dict",
    "loss_from_scheduler",
    "model_timesteps",
    "prediction_type_from_scheduler",
    "prompt_conditioning",
    "register_lora_checkpoint_hooks",
    "schedule_from_scheduler",
    "trainable_parameters",
]
