"""FluxTransformerAdapter on a tiny FluxTransformer2DModel (and a tiny FluxPipeline) from config.

The reference is diffusers' ``examples/dreambooth/train_dreambooth_lora_flux.py`` (its training
step, from ``model_input = (... - vae_config_shift_factor) * vae_config_scaling_factor`` to
``target = noise - model_input``), copied below as ``script_step``: the adapter must call the
transformer exactly as it does, bit for bit, on unpacked ``(B, C, H, W)`` latents. The tiny model
packs 4 latent channels into ``in_channels=16`` (2x2 patches of 8x8 latents: 16 tokens).
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch
from conftest import flux_scheduler, tiny_flux_pipeline, tiny_flux_transformer, tiny_sd_vae
from diffusers import FluxPipeline, FluxTransformer2DModel
from diffusers.training_utils import (
    compute_density_for_timestep_sampling,
    compute_loss_weighting_for_sd3,
)
from peft import LoraConfig

from siss import SISSLoss
from siss.adapters import (
    FluxTransformerAdapter,
    PromptConditioning,
    adapter_for,
    encode_latents,
    lora_state_dict,
    loss_from_scheduler,
    prompt_conditioning,
    trainable_parameters,
)
from siss.baselines import NaiveDeletionLoss
from siss.stable_diffusion.pipeline import FLUX_LORA_TARGETS

pytestmark = pytest.mark.usefixtures("one_thread")

CHANNELS = 4  # latent channels; the transformer's in_channels is 4 * CHANNELS after packing
BATCH = 2
GUIDANCE = pytest.mark.parametrize("guidance_embeds", [False, True], ids=["schnell", "dev"])
# train_dreambooth_lora_flux.py's default --lora_layers, the SD job's Flux default
LORA_TARGETS = list(FLUX_LORA_TARGETS)


def script_density(generator: torch.Generator) -> torch.Tensor:
    """The script's logit-normal timestep density (``compute_density_for_timestep_sampling``),
    drawn from ``generator`` where diffusers takes one (>= 0.33), else from the global RNG seeded
    from it, as the script's own global draw."""
    kwargs = {}
    if "generator" in inspect.signature(compute_density_for_timestep_sampling).parameters:
        kwargs["generator"] = generator
    else:
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
    return compute_density_for_timestep_sampling("logit_normal", BATCH, 0.0, 1.0, **kwargs)


def tiny_flux(guidance_embeds: bool = False, seed: int = 0) -> FluxTransformer2DModel:
    """diffusers' own tiny test config (tests/pipelines/flux), 16 packed input channels
    (``tests/conftest.py``'s ``tiny_flux_transformer``)."""
    return tiny_flux_transformer(guidance_embeds=guidance_embeds, seed=seed, channels=CHANNELS)


def text(g: torch.Generator, rows: int = BATCH, length: int = 6) -> dict[str, torch.Tensor]:
    return {
        "encoder_hidden_states": torch.randn(rows, length, 32, generator=g),
        "pooled_projections": torch.randn(rows, 32, generator=g),
    }


def latents(g: torch.Generator, rows: int = BATCH, size: int = 8) -> torch.Tensor:
    return torch.randn(rows, CHANNELS, size, size, generator=g)


def script_step(
    transformer,
    model_input,
    noise,
    timesteps,
    sigmas,
    prompt_embeds,
    pooled_prompt_embeds,
    text_ids,
    guidance_scale=3.5,
    vae_config_block_out_channels=(128, 256, 512, 512),
):
    """train_dreambooth_lora_flux.py's step (HEAD of huggingface/diffusers, lines 1751-1820),
    with ``accelerator.device`` the latents' device and ``weight_dtype`` their dtype.

    Returns ``(noisy_model_input, model_pred, target)``.
    """
    vae_scale_factor = 2 ** (len(vae_config_block_out_channels) - 1)
    latent_image_ids = FluxPipeline._prepare_latent_image_ids(
        model_input.shape[0],
        model_input.shape[2] // 2,
        model_input.shape[3] // 2,
        model_input.device,
        model_input.dtype,
    )
    noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
    packed_noisy_model_input = FluxPipeline._pack_latents(
        noisy_model_input,
        batch_size=model_input.shape[0],
        num_channels_latents=model_input.shape[1],
        height=model_input.shape[2],
        width=model_input.shape[3],
    )
    if transformer.config.guidance_embeds:
        guidance = torch.tensor([guidance_scale], device=model_input.device)
        guidance = guidance.expand(model_input.shape[0])
    else:
        guidance = None
    model_pred = transformer(
        hidden_states=packed_noisy_model_input,
        timestep=timesteps / 1000,
        guidance=guidance,
        pooled_projections=pooled_prompt_embeds,
        encoder_hidden_states=prompt_embeds,
        txt_ids=text_ids,
        img_ids=latent_image_ids,
        return_dict=False,
    )[0]
    model_pred = FluxPipeline._unpack_latents(
        model_pred,
        height=model_input.shape[2] * vae_scale_factor,
        width=model_input.shape[3] * vae_scale_factor,
        vae_scale_factor=vae_scale_factor,
    )
    target = noise - model_input
    return noisy_model_input, model_pred, target


def script_sigmas(scheduler, timesteps, n_dim=4, dtype=torch.float32):
    """The script's ``get_sigmas`` (sigmas looked up by timestep in a fresh scheduler copy)."""
    sigmas = scheduler.sigmas.to(dtype=dtype)
    step_indices = [(scheduler.timesteps == t).nonzero().item() for t in timesteps]
    sigma = sigmas[step_indices].flatten()
    while len(sigma.shape) < n_dim:
        sigma = sigma.unsqueeze(-1)
    return sigma


# ------------------------------------------------------------------------------------------------
# (a) the training script's call, bit for bit
# ------------------------------------------------------------------------------------------------


@GUIDANCE
@pytest.mark.parametrize("guidance_scale", [3.5, 1.0])
def test_predict_is_the_training_scripts_call_bit_for_bit(guidance_embeds, guidance_scale):
    transformer = tiny_flux(guidance_embeds).eval()
    scheduler = flux_scheduler()
    g = torch.Generator().manual_seed(0)
    model_input, noise, cond = latents(g), latents(g), text(g)
    u = script_density(g)
    timesteps = scheduler.timesteps[(u * scheduler.config.num_train_timesteps).long()]
    sigmas = script_sigmas(scheduler, timesteps)
    text_ids = torch.zeros(6, 3)  # the script's encode_prompt
    noisy, expected, _ = script_step(
        transformer,
        model_input,
        noise,
        timesteps,
        sigmas,
        cond["encoder_hidden_states"],
        cond["pooled_projections"],
        text_ids,
        guidance_scale=guidance_scale,
    )
    adapter = FluxTransformerAdapter(transformer, guidance_scale=guidance_scale)
    with torch.no_grad():
        ours = adapter.predict(noisy, timesteps, **cond)
        with_ids = adapter.predict(noisy, timesteps, txt_ids=text_ids, **cond)
    assert ours.shape == model_input.shape
    assert torch.equal(ours, expected.detach())
    assert torch.equal(with_ids, expected.detach())


@GUIDANCE
def test_loss_is_the_training_scripts_loss_with_its_timestep_density_and_weighting(
    guidance_embeds,
):
    """Naive deletion is the script's plain flow-matching loss on the kept batch: same noise levels
    from ``timesteps=indices``, same target ``noise - latents``, same ``sigma_sqrt`` weighting."""
    transformer = tiny_flux(guidance_embeds).eval()
    scheduler = flux_scheduler()
    vae = tiny_sd_vae(shift_factor=0.1159, scaling_factor=0.3611)  # FLUX.1's VAE factors
    g = torch.Generator().manual_seed(1)
    pixels = torch.rand(BATCH, 3, 16, 16, generator=g) * 2 - 1
    with torch.no_grad():
        model_input = vae.encode(pixels).latent_dist.sample(torch.Generator().manual_seed(2))
    model_input = (model_input - vae.config.shift_factor) * vae.config.scaling_factor
    ours_input = encode_latents(vae, pixels, generator=torch.Generator().manual_seed(2))
    assert torch.equal(ours_input, model_input)

    cond = text(g)
    u = script_density(g)
    indices = (u * scheduler.config.num_train_timesteps).long()
    loss_fn = loss_from_scheduler(NaiveDeletionLoss, scheduler)
    weights = lambda draw: compute_loss_weighting_for_sd3("sigma_sqrt", sigmas=draw.sigma)  # noqa: E731
    terms = FluxTransformerAdapter(transformer).loss(
        ours_input,
        None,
        loss_fn,
        timesteps=indices,
        generator=torch.Generator().manual_seed(3),
        weights=weights,
        **cond,
    )
    draw = loss_fn.sample(
        ours_input, None, timesteps=indices, generator=torch.Generator().manual_seed(3)
    )
    timesteps = scheduler.timesteps[indices]
    assert torch.equal(draw.timesteps, timesteps)
    sigmas = script_sigmas(scheduler, timesteps)
    noisy, model_pred, target = script_step(
        transformer,
        model_input,
        draw.noise,
        timesteps,
        sigmas,
        cond["encoder_hidden_states"],
        cond["pooled_projections"],
        torch.zeros(6, 3),
    )
    torch.testing.assert_close(draw.noisy, noisy)
    weighting = compute_loss_weighting_for_sd3("sigma_sqrt", sigmas=sigmas)
    loss = torch.mean(
        (weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(BATCH, -1), 1
    ).mean()
    torch.testing.assert_close(terms.loss, loss)


def test_predict_matches_what_the_flux_pipeline_feeds_its_transformer(flux_pipe):
    """Same ``img_ids``, ``txt_ids``, guidance and packed latents as ``FluxPipeline.__call__``."""
    transformer = flux_pipe.transformer
    seen: list[dict[str, Any]] = []
    handle = transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(dict(kwargs)), with_kwargs=True
    )
    try:
        flux_pipe(
            "a photo of a cat",
            height=16,
            width=16,
            num_inference_steps=1,
            guidance_scale=2.5,
            max_sequence_length=16,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
        )
        theirs = seen[0]
        cond = prompt_conditioning(flux_pipe, "a photo of a cat", max_sequence_length=16)
        noisy = FluxPipeline._unpack_latents(theirs["hidden_states"], 16, 16, 2)
        adapter = FluxTransformerAdapter(transformer, guidance_scale=2.5)
        with torch.no_grad():
            adapter.predict(noisy, theirs["timestep"] * 1000, **cond.conditional)
    finally:
        handle.remove()
    ours = seen[1]
    for key in ("hidden_states", "encoder_hidden_states", "pooled_projections", "guidance"):
        assert torch.equal(ours[key], theirs[key]), key
    for key in ("txt_ids", "img_ids"):
        assert ours[key].shape == theirs[key].shape and torch.equal(ours[key], theirs[key]), key
    torch.testing.assert_close(ours["timestep"], theirs["timestep"])


# ------------------------------------------------------------------------------------------------
# (b), (c) SISS through the adapter: one transformer call, finite gradients, guidance or none
# ------------------------------------------------------------------------------------------------


@GUIDANCE
@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic-shift", "static-shift"])
def test_siss_forward_backward_one_transformer_call(guidance_embeds, dynamic):
    transformer = tiny_flux(guidance_embeds)
    loss_fn = loss_from_scheduler(
        SISSLoss, flux_scheduler(use_dynamic_shifting=dynamic), lam=0.5, superfactor=0.1
    )
    g = torch.Generator().manual_seed(4)
    latents_x, latents_a = latents(g), latents(g, rows=1)
    calls: list[dict[str, Any]] = []
    transformer.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs), with_kwargs=True
    )
    adapter = adapter_for(transformer)
    terms = adapter.loss(
        latents_x, latents_a, loss_fn, generator=torch.Generator().manual_seed(5), **text(g)
    )
    assert terms.loss.shape == () and torch.isfinite(terms.loss)
    terms.loss.backward()

    assert len(calls) == 1
    assert calls[0]["hidden_states"].shape == (BATCH, 16, 4 * CHANNELS)  # 2x2 patches of 8x8
    assert calls[0]["img_ids"].shape == (16, 3) and calls[0]["txt_ids"].shape == (6, 3)
    if guidance_embeds:
        assert torch.equal(calls[0]["guidance"], torch.full((BATCH,), 3.5))
    else:
        assert calls[0]["guidance"] is None
    draw = loss_fn.sample(latents_x, latents_a, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(calls[0]["timestep"], draw.timesteps / 1000)
    grads = {name: p.grad for name, p in transformer.named_parameters()}
    assert all(grad is not None and torch.isfinite(grad).all() for grad in grads.values()), [
        name for name, grad in grads.items() if grad is None
    ]
    assert sum(float(grad.abs().sum()) for grad in grads.values()) > 0


def test_guidance_scale_default_per_call_and_rejected_without_guidance_embeds():
    g = torch.Generator().manual_seed(6)
    noisy, cond = latents(g), text(g)
    timesteps = torch.tensor([750.0, 250.0])
    dev = FluxTransformerAdapter(tiny_flux(guidance_embeds=True).eval())
    with torch.no_grad():
        default = dev.predict(noisy, timesteps, **cond)
        assert torch.equal(default, dev.predict(noisy, timesteps, guidance=3.5, **cond))
        assert torch.equal(
            default, dev.predict(noisy, timesteps, guidance=torch.tensor(3.5), **cond)
        )
        per_row = dev.predict(noisy, timesteps, guidance=torch.tensor([3.5, 1.0]), **cond)
        low = dev.predict(noisy, timesteps, guidance=1.0, **cond)
    torch.testing.assert_close(per_row[0], default[0])  # row by row: its own guidance
    torch.testing.assert_close(per_row[1], low[1])
    assert not torch.equal(default, low)  # the guidance embedding is used
    with pytest.raises(ValueError, match=r"`guidance` must have shape \(2,\)"):
        dev.predict(noisy, timesteps, guidance=torch.ones(2, 1), **cond)
    with pytest.raises(ValueError, match="`guidance` has 3 rows"):
        dev.predict(noisy, timesteps, guidance=torch.ones(3), **cond)
    with pytest.raises(TypeError, match="`guidance` must be a number"):
        dev.predict(noisy, timesteps, guidance="3.5", **cond)
    schnell = FluxTransformerAdapter(tiny_flux(guidance_embeds=False))
    with pytest.raises(ValueError, match="guidance_embeds=False"):
        schnell.predict(noisy, timesteps, guidance=3.5, **cond)
    with pytest.raises(ValueError, match="`guidance_scale` must be finite"):
        FluxTransformerAdapter(tiny_flux(), guidance_scale=float("nan"))
    with pytest.raises(TypeError, match="`guidance_scale` must be a number"):
        FluxTransformerAdapter(tiny_flux(), guidance_scale=None)


def test_two_block_draws_duplicate_conditioning_and_share_txt_ids():
    transformer = tiny_flux(guidance_embeds=True).eval()
    loss_fn = loss_from_scheduler("siss-nois", flux_scheduler(), superfactor=0.5)
    g = torch.Generator().manual_seed(7)
    latents_x, latents_a, cond = latents(g), latents(g), text(g)
    cond["guidance"] = torch.tensor([2.0, 4.0])
    txt_ids = torch.zeros(6, 3)
    adapter = FluxTransformerAdapter(transformer)
    seen: list[dict[str, Any]] = []
    predict = adapter.predict

    def spy(noisy, timesteps, **kwargs):
        seen.append(kwargs)
        return predict(noisy, timesteps, **kwargs)

    adapter.predict = spy
    terms = adapter.loss(
        latents_x,
        latents_a,
        loss_fn,
        generator=torch.Generator().manual_seed(8),
        txt_ids=txt_ids,
        **cond,
    )
    assert seen[0]["txt_ids"] is txt_ids  # (L, 3): shared by every row, never duplicated
    expected = {key: torch.cat([value, value]) for key, value in cond.items()}
    for key, value in expected.items():
        assert torch.equal(seen[0][key], value), key
    draw = loss_fn.sample(latents_x, latents_a, generator=torch.Generator().manual_seed(8))
    assert draw.noisy.shape[0] == 2 * BATCH
    output = predict(draw.noisy, draw.timesteps, **expected)
    torch.testing.assert_close(terms.loss, loss_fn(output, draw))


# ------------------------------------------------------------------------------------------------
# (d) dispatch, (e) LoRA
# ------------------------------------------------------------------------------------------------


def test_adapter_for_dispatches_to_the_flux_adapter():
    transformer = tiny_flux()
    adapter = adapter_for(transformer)
    assert type(adapter) is FluxTransformerAdapter and adapter.model is transformer
    assert adapter.guidance_scale == 3.5
    assert type(adapter_for(torch.nn.DataParallel(transformer))) is FluxTransformerAdapter
    with pytest.raises(TypeError, match="FluxTransformerAdapter wraps FluxTransformer2DModel"):
        FluxTransformerAdapter(torch.nn.Linear(2, 2))


@GUIDANCE
def test_lora_trains_only_the_adapter_weights(guidance_embeds):
    transformer = tiny_flux(guidance_embeds)
    transformer.requires_grad_(False)  # as the script does before add_adapter
    torch.manual_seed(1)
    transformer.add_adapter(
        LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian", target_modules=LORA_TARGETS)
    )
    params = trainable_parameters(transformer)
    names = [name for name, p in transformer.named_parameters() if p.requires_grad]
    assert params and all(".lora_" in name for name in names)
    state = lora_state_dict(transformer)  # what a LoRA checkpoint holds: the adapter only
    assert len(state) == len(names) and all(".lora_" in name for name in state)

    loss_fn = loss_from_scheduler(SISSLoss, flux_scheduler(), lam=0.5, superfactor=0.1)
    g = torch.Generator().manual_seed(9)
    latents_x, latents_a, cond = latents(g), latents(g, rows=1), text(g)
    adapter = adapter_for(transformer)
    timesteps = torch.tensor([700.0, 300.0])
    with torch.no_grad():
        before = adapter.predict(latents_x, timesteps, **cond)
    terms = adapter.loss(latents_x, latents_a, loss_fn, generator=g, **cond)
    terms.loss.backward()
    for name, p in transformer.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert p.grad is None, name
    assert any(float(p.grad.abs().sum()) > 0 for p in params)
    torch.optim.SGD(params, lr=0.1).step()
    with torch.no_grad():
        after = adapter.predict(latents_x, timesteps, **cond)
    assert not torch.equal(before, after)


# ------------------------------------------------------------------------------------------------
# Errors before the transformer runs
# ------------------------------------------------------------------------------------------------


def test_bad_inputs_are_named_before_the_model_runs():
    transformer = tiny_flux()
    calls = []
    transformer.register_forward_pre_hook(lambda module, args: calls.append(1))
    adapter = FluxTransformerAdapter(transformer)
    loss_fn = loss_from_scheduler(SISSLoss, flux_scheduler(), lam=0.5, superfactor=0.1)
    g = torch.Generator().manual_seed(10)
    x0, cond = latents(g), text(g)
    with pytest.raises(ValueError, match=r"`x0` has 16 channels.*in_channels=16.*4 channels"):
        adapter.loss(torch.randn(2, 16, 8, 8), x0, loss_fn, **cond)
    with pytest.raises(ValueError, match=r"`a0` has spatial size 7x8.*multiples of 2"):
        adapter.loss(x0, torch.randn(2, CHANNELS, 7, 8), loss_fn, **cond)
    with pytest.raises(ValueError, match=r"`x0` must be unpacked latents \(B, C, H, W\)"):
        adapter.loss(torch.randn(2, 16, 16), torch.randn(2, 16, 16), loss_fn, **cond)
    with pytest.raises(ValueError, match="`pooled_projections`"):
        adapter.loss(x0, x0, loss_fn, encoder_hidden_states=cond["encoder_hidden_states"])
    with pytest.raises(ValueError, match="`encoder_hidden_states` has last dimension 8"):
        adapter.loss(x0, x0, loss_fn, **{**cond, "encoder_hidden_states": torch.randn(2, 6, 8)})
    with pytest.raises(ValueError, match=r"`txt_ids` must be a tensor \(6, 3\)"):
        adapter.loss(x0, x0, loss_fn, txt_ids=torch.zeros(5, 3), **cond)
    with pytest.raises(ValueError, match="`img_ids` is built by the adapter"):
        adapter.predict(x0, torch.tensor([1.0, 2.0]), img_ids=torch.zeros(16, 3), **cond)
    assert not calls


# ------------------------------------------------------------------------------------------------
# prompt_conditioning on a tiny FluxPipeline (CLIP + T5 text encoders, no download)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flux_pipe() -> FluxPipeline:
    """A ``FluxPipeline`` of tiny parts (``tests/conftest.py``'s ``tiny_flux_pipeline``): a
    letter-by-letter CLIP tokenizer of 16 tokens shared by both encoders, a ``CLIPTextModel`` of
    width 32 (pooled 32), a one-layer ``T5EncoderModel`` of width 32, the guidance-distilled
    :func:`tiny_flux`, the 3x16x16 VAE (factor 2, 4 latent channels) with FLUX.1's shift and
    scaling factors and FLUX.1's scheduler config."""
    return tiny_flux_pipeline()


def test_prompt_conditioning_is_what_encode_prompt_returns(flux_pipe):
    cond = prompt_conditioning(flux_pipe, "a photo of a cat", max_sequence_length=16)
    assert isinstance(cond, PromptConditioning)
    shapes = {key: tuple(value.shape) for key, value in cond.conditional.items()}
    assert shapes == {"encoder_hidden_states": (1, 16, 32), "pooled_projections": (1, 32)}
    with torch.no_grad():
        embeds, pooled, text_ids = flux_pipe.encode_prompt(
            "a photo of a cat", prompt_2=None, max_sequence_length=16
        )  # diffusers < 0.33 has no default for prompt_2
        null, null_pooled, _ = flux_pipe.encode_prompt("", prompt_2=None, max_sequence_length=16)
    assert torch.equal(cond.conditional["encoder_hidden_states"], embeds)
    assert torch.equal(cond.conditional["pooled_projections"], pooled)
    assert torch.equal(cond.unconditional["encoder_hidden_states"], null)
    assert torch.equal(cond.unconditional["pooled_projections"], null_pooled)
    assert torch.equal(text_ids, torch.zeros(16, 3))  # what the adapter builds when left out
    none = prompt_conditioning(flux_pipe, "a dog", negative_prompt=None, max_sequence_length=16)
    assert torch.equal(none.unconditional["encoder_hidden_states"], null)
    assert not torch.equal(none.conditional["encoder_hidden_states"], embeds)
    # the pipeline's default max_sequence_length (512) and a custom negative prompt
    long = prompt_conditioning(flux_pipe, "a cat", negative_prompt="blurry")
    assert long.conditional["encoder_hidden_states"].shape == (1, 512, 32)
    assert not torch.equal(
        long.unconditional["pooled_projections"],
        prompt_conditioning(flux_pipe, "a cat").unconditional["pooled_projections"],
    )


def test_siss_trains_through_prompt_conditioning_and_the_pipeline_scheduler(flux_pipe):
    transformer = flux_pipe.transformer
    with torch.inference_mode():
        cond = prompt_conditioning(flux_pipe, "a photo of a cat", max_sequence_length=16)
    loss_fn = loss_from_scheduler(SISSLoss, flux_pipe.scheduler, lam=0.5, superfactor=0.1)
    g = torch.Generator().manual_seed(11)
    images = torch.rand(3, 3, 16, 16, generator=g) * 2 - 1
    latents_x = encode_latents(flux_pipe.vae, images, generator=g)
    latents_a = encode_latents(flux_pipe.vae, images[:1], generator=g)
    transformer.zero_grad()
    terms = adapter_for(transformer).loss(
        latents_x, latents_a, loss_fn, generator=g, **cond.conditional
    )
    assert terms.loss.ndim == 0 and torch.isfinite(terms.loss)
    terms.loss.backward()
    grads = [p.grad for p in transformer.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(grad).all() for grad in grads)
    assert sum(float(grad.abs().sum()) for grad in grads) > 0
    transformer.zero_grad()


def test_prompt_conditioning_names_a_missing_flux_text_encoder(flux_pipe):
    from diffusers import FluxPipeline as Pipeline

    partial = Pipeline(**{**flux_pipe.components, "text_encoder_2": None})
    with pytest.raises(ValueError, match=r"`pipe` \(FluxPipeline\) has no text_encoder_2"):
        prompt_conditioning(partial, "a cat")
