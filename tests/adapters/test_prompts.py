"""siss.adapters.prompt_conditioning on tiny SD 1.x, SDXL and SD3 pipelines built from config.

Each pipeline is written by a ``tests/conftest.py`` builder and loaded back by path. The checks:
the conditioning is exactly what the pipeline itself feeds its denoiser (captured with a forward
hook during ``pipe(prompt)``), has the documented keys and shapes, and trains: a SISS loss through
``adapter_for(denoiser).loss(..., **cond.conditional)`` is finite and has gradients.
"""

import diffusers
import pytest
import torch
from conftest import tiny_sd3_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline, tiny_unet
from packaging.version import Version

from siss import SISSLoss
from siss.adapters import PromptConditioning, adapter_for, loss_from_scheduler, prompt_conditioning

pytestmark = pytest.mark.usefixtures("one_thread")

BUILDERS = {"sd": tiny_sd_pipeline, "sdxl": tiny_sdxl_pipeline, "sd3": tiny_sd3_pipeline}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def pipe(request, tmp_path_factory):
    from diffusers import DiffusionPipeline

    folder = BUILDERS[request.param](tmp_path_factory.mktemp(request.param) / "pipe")
    absent = {"text_encoder_3": None, "tokenizer_3": None} if request.param == "sd3" else {}
    loaded = DiffusionPipeline.from_pretrained(str(folder), **absent)
    loaded.set_progress_bar_config(disable=True)
    loaded.family = request.param
    return loaded


def denoiser(pipe):
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def shapes(value):
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    return {key: shapes(v) for key, v in value.items()}


def test_keys_and_shapes(pipe):
    cond = prompt_conditioning(pipe, "a photo of a cat")
    assert isinstance(cond, PromptConditioning)
    expected = {
        "sd": {"encoder_hidden_states": (1, 32, 8)},
        "sdxl": {
            "encoder_hidden_states": (1, 16, 16),
            "added_cond_kwargs": {"text_embeds": (1, 8), "time_ids": (1, 6)},
        },
        "sd3": {"encoder_hidden_states": (1, 16 + 256, 16), "pooled_projections": (1, 16)},
    }[pipe.family]
    if pipe.family == "sd3" and Version(diffusers.__version__) < Version("0.36"):
        # before diffusers 0.36 the zero T5 part (no text_encoder_3) is tokenizer_max_length long
        expected["encoder_hidden_states"] = (1, 16 + pipe.tokenizer_max_length, 16)
    assert shapes(cond.conditional) == expected
    assert shapes(cond.unconditional) == expected
    other = prompt_conditioning(pipe, "a dog")
    key = "encoder_hidden_states"
    assert not torch.equal(cond.conditional[key], other.conditional[key])
    assert torch.equal(cond.unconditional[key], other.unconditional[key])  # both the prompt ""


def _pipeline_inputs(pipe, prompt, guidance_scale):
    """The denoiser's keyword inputs at the first step of ``pipe(prompt)``."""
    seen = {}

    def hook(module, args, kwargs):
        seen.setdefault("kwargs", kwargs)

    handle = denoiser(pipe).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        pipe(
            prompt,
            num_inference_steps=1,
            guidance_scale=guidance_scale,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
        )
    finally:
        handle.remove()
    return seen["kwargs"]


@pytest.mark.parametrize("guidance_scale", [1.0, 5.0])
def test_equals_what_the_pipeline_feeds_its_denoiser(pipe, guidance_scale):
    # with guidance the pipeline's batch is cat([unconditional, conditional]) and its
    # unconditional branch is the pipeline's default negative prompt (negative_prompt=None)
    inputs = _pipeline_inputs(pipe, "a photo of a cat", guidance_scale)
    cond = prompt_conditioning(pipe, "a photo of a cat", negative_prompt=None)

    def both(branch_key):
        conditional = cond.conditional
        unconditional = cond.unconditional
        if branch_key == "added_cond_kwargs":
            return {
                k: torch.cat([unconditional[branch_key][k], conditional[branch_key][k]])
                if guidance_scale > 1
                else conditional[branch_key][k]
                for k in conditional[branch_key]
            }
        if guidance_scale > 1:
            return torch.cat([unconditional[branch_key], conditional[branch_key]])
        return conditional[branch_key]

    for key in cond.conditional:
        ours, theirs = both(key), inputs[key]
        if isinstance(ours, dict):
            assert set(ours) == set(theirs)
            for k in ours:
                torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=0)
        else:
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_siss_loss_trains_through_the_adapter(pipe):
    model = denoiser(pipe)
    # made under inference_mode, as a script's setup may be: still usable for training
    with torch.inference_mode():
        cond = prompt_conditioning(pipe, "a photo of a cat")
    adapter = adapter_for(model)
    loss_fn = loss_from_scheduler(SISSLoss, pipe.scheduler, lam=0.5, superfactor=0.1)
    g = torch.Generator().manual_seed(0)
    latents_x = torch.randn(3, 4, 8, 8, generator=g)
    latents_a = torch.randn(3, 4, 8, 8, generator=g)
    model.zero_grad()
    terms = adapter.loss(latents_x, latents_a, loss_fn, generator=g, **cond.conditional)
    assert terms.loss.ndim == 0 and torch.isfinite(terms.loss)
    terms.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(gr).all() for gr in grads)
    assert sum(float(gr.abs().sum()) for gr in grads) > 0


def test_to_casts_every_floating_tensor(pipe):
    cond = prompt_conditioning(pipe, "a cat", dtype=torch.float64)
    flat = [
        t
        for branch in (cond.conditional, cond.unconditional)
        for v in branch.values()
        for t in (v.values() if isinstance(v, dict) else [v])
    ]
    assert flat and all(t.dtype == torch.float64 for t in flat)
    half = cond.to(dtype=torch.float16)
    assert half.conditional["encoder_hidden_states"].dtype == torch.float16
    assert cond.conditional["encoder_hidden_states"].dtype == torch.float64  # a copy


def test_sdxl_time_ids_follow_the_size(tmp_path):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(tiny_sdxl_pipeline(tmp_path / "xl")))
    default = prompt_conditioning(pipe, "a cat").conditional["added_cond_kwargs"]["time_ids"]
    # the pipeline's default resolution: sample size 8 times the VAE's factor 2, uncropped
    assert default.tolist() == [[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]]
    sized = prompt_conditioning(pipe, "a cat", size=(32, 24))
    assert sized.conditional["added_cond_kwargs"]["time_ids"].tolist() == [
        [32.0, 24.0, 0.0, 0.0, 32.0, 24.0]
    ]
    # SDXL's force_zeros_for_empty_prompt applies only when no negative prompt is given
    zeros = prompt_conditioning(pipe, "a cat", negative_prompt=None).unconditional
    assert not zeros["encoder_hidden_states"].any()
    assert prompt_conditioning(pipe, "a cat").unconditional["encoder_hidden_states"].any()
    with pytest.raises(ValueError, match="`size`"):
        prompt_conditioning(pipe, "a cat", size=(16, 0))


def test_bad_input_is_named(tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler, StableDiffusionPipeline

    folder = tiny_sd_pipeline(tmp_path / "sd")
    pipe = StableDiffusionPipeline.from_pretrained(str(folder))
    with pytest.raises(TypeError, match="`prompt`"):
        prompt_conditioning(pipe, ["a cat"])
    with pytest.raises(TypeError, match="`negative_prompt`"):
        prompt_conditioning(pipe, "a cat", negative_prompt=3)
    pipe.text_encoder = None
    with pytest.raises(ValueError, match=r"`pipe`.*text_encoder"):
        prompt_conditioning(pipe, "a cat")
    with pytest.raises(TypeError, match=r"`pipe`.*encode_prompt"):
        prompt_conditioning(DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler()), "a cat")
    with pytest.raises(TypeError, match="`pipe`"):
        prompt_conditioning(object(), "a cat")
