"""One SISS step on a tiny Stable Diffusion pipeline saved to disk and loaded back.

The components are built from config (nothing is downloaded, the CLIP tokenizer comes from a
vocabulary written here), saved with ``save_pretrained`` and loaded with ``from_pretrained(path)``:
the loading code real users run. Then the user's loop: encode the prompt with the loaded tokenizer
and text encoder, encode images with the VAE, one SISS step on the UNet.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_conditional_unet
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    StableDiffusionPipeline,
)
from peft import LoraConfig
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from siss import SISSLoss
from siss.adapters import (
    UNet2DConditionAdapter,
    adapter_for,
    encode_latents,
    loss_from_scheduler,
    trainable_parameters,
)

pytestmark = pytest.mark.usefixtures("one_thread")


MAX_LENGTH = 16


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins byte-level BPE (GPT-2, CLIP) uses for bytes."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def write_tiny_clip_vocabulary(folder: Path) -> Path:
    """A CLIP BPE vocabulary of ~500 tokens (bytes, bytes + ``</w>``, a few merges)."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = _byte_alphabet()
    merges = ["c a", "ca t</w>", "d o", "do g</w>", "f a", "fa c", "fac e</w>"]
    tokens = [*chars, *(c + "</w>" for c in chars), "ca", "cat</w>", "do", "dog</w>", "fa"]
    tokens += ["fac", "face</w>", "<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


def build_tiny_pipeline(folder: Path) -> StableDiffusionPipeline:
    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(
        write_tiny_clip_vocabulary(folder / "vocab"), model_max_length=MAX_LENGTH
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=MAX_LENGTH,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = tiny_conditional_unet(seed=None, cross_attention_dim=16)
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        sample_size=16,
    )
    scheduler = DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-sd")
    build_tiny_pipeline(folder).save_pretrained(folder / "pipeline")
    return folder / "pipeline"


def _load(path: Path, monkeypatch) -> StableDiffusionPipeline:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = StableDiffusionPipeline.from_pretrained(path)
    pipe.vae.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    return pipe


def _batch(pipe: StableDiffusionPipeline, batch: int = 2):
    """Prompt embeddings and latents of keep images (rows) and one forget image."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(
            ["a cat"] * batch, "cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
        )
    images_x = torch.rand(batch, 3, 16, 16, generator=g) * 2 - 1
    image_a = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
    latents_x = encode_latents(pipe.vae, images_x, generator=g)
    latents_a = encode_latents(pipe.vae, image_a, generator=g)
    return embeds, latents_x, latents_a


def test_saved_and_loaded_pipeline_round_trips(saved_pipeline, monkeypatch):
    pipe = _load(saved_pipeline, monkeypatch)
    assert isinstance(pipe.tokenizer, CLIPTokenizer)
    tokens = ["<|startoftext|>", "a</w>", "cat</w>", "<|endoftext|>"]
    assert pipe.tokenizer("a cat").input_ids == pipe.tokenizer.convert_tokens_to_ids(tokens)
    assert sum(p.numel() for p in pipe.unet.parameters()) < 400_000


def test_one_siss_step_changes_the_unet(saved_pipeline, monkeypatch):
    pipe = _load(saved_pipeline, monkeypatch)
    embeds, latents_x, latents_a = _batch(pipe)
    assert embeds.shape == (2, MAX_LENGTH, 16) and latents_x.shape == (2, 4, 8, 8)
    unet = pipe.unet.train()
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    frozen = [p.detach().clone() for p in pipe.text_encoder.parameters()]
    optimizer = torch.optim.AdamW(trainable_parameters(unet), lr=1e-3)

    # README: Stable Diffusion (UNet2DConditionModel + DDPMScheduler).
    loss_fn = loss_from_scheduler(SISSLoss, pipe.scheduler, lam=0.5, superfactor=0.1)
    adapter = adapter_for(pipe.unet)
    adapter.loss(latents_x, latents_a, loss_fn, encoder_hidden_states=embeds).loss.backward()

    optimizer.step()
    assert isinstance(adapter, UNet2DConditionAdapter)
    assert loss_fn.prediction_type == "epsilon"
    changed = [n for n, p in unet.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before)
    assert all(
        torch.equal(p, q) for p, q in zip(pipe.text_encoder.parameters(), frozen, strict=True)
    )


def test_one_siss_step_with_lora_changes_only_the_adapter(saved_pipeline, monkeypatch):
    pipe = _load(saved_pipeline, monkeypatch)
    embeds, latents_x, latents_a = _batch(pipe)
    pipe.unet.add_adapter(
        LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    )
    params = trainable_parameters(pipe.unet)
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    loss_fn = loss_from_scheduler("siss", pipe.scheduler, lam=0.5, superfactor=0.1)

    terms = adapter_for(pipe.unet).loss(
        latents_x,
        latents_a,
        loss_fn,
        encoder_hidden_states=embeds,
        generator=torch.Generator().manual_seed(1),
    )
    terms.loss.backward()
    optimizer.step()

    for name, param in pipe.unet.named_parameters():
        if "lora_B" in name:  # B starts at zero, so only B moves on the first step
            assert not torch.equal(param, before[name]), name
        elif "lora_" not in name:
            assert torch.equal(param, before[name]), name
