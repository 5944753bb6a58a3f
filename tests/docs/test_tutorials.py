"""The tutorials' code, run as written (docs/tutorials/*.md, marked blocks; tutorial_harness.py).

"SISS in your diffusers training loop" shows two patches to diffusers' ``train_unconditional.py``
and ``train_text_to_image.py``. diffusers' scripts need ``datasets`` and ``torchvision`` and a
model hub, so the scripts themselves do not run here; what the patches put into them does: the
flags they add (parsed), the data split, the setup after ``accelerator.prepare`` and the whole
training loop, exactly as they read after the patch, with tiny real diffusers models bound to the
scripts' names, under ``Accelerator(cpu=True, mixed_precision="bf16",
gradient_accumulation_steps=2)``. The hunks whose context needs the scripts' other parts (the
model's construction, the optimizer) are replaced by the scripts' own lines. The page's hunks are
checked to be the patch files, line for line.

The LoRA tutorial's loop runs the same way, on a tiny Stable Diffusion UNet with a PEFT LoRA.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import (
    tiny_conditional_unet,
    tiny_sd_pipeline,
    tiny_sd_vae,
    tiny_text_encoder,
    tiny_unet,
    write_clip_tokenizer,
)

from tests.docs import tutorial_harness as harness
from tests.readme import readme_harness as readme

pytestmark = pytest.mark.usefixtures("one_thread")

PAGE = "diffusers_training_loop.md"
PATCHES = {"uncond-": "train_unconditional.patch", "t2i-": "train_text_to_image.patch"}


@pytest.fixture
def accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    def reset() -> None:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()

    reset()
    yield Accelerator(cpu=True, mixed_precision="bf16", gradient_accumulation_steps=2)
    reset()


def _constant_lr(optimizer: torch.optim.Optimizer) -> Any:
    from diffusers.optimization import get_scheduler

    return get_scheduler("constant", optimizer=optimizer)


# --------------------------------------------------------------------------------------------
# The page's hunks are the patch files
# --------------------------------------------------------------------------------------------


def test_every_diff_block_is_marked_and_the_hunks_are_the_patch_files():
    blocks = harness.blocks(PAGE)
    diffs = {name: block for name, block in blocks.items() if block.language == "diff"}
    assert harness.fenced_languages(PAGE).count("diff") == len(diffs), (
        "a ```diff block of the page is not marked `<!-- test: NAME -->`"
    )
    for prefix, patch in PATCHES.items():
        on_page = [
            line.rstrip()
            for name, block in diffs.items()
            if name.startswith(prefix)
            for line in harness.hunk_lines(block.text)
        ]
        in_file = [
            line.rstrip()
            for line in harness.hunk_lines((harness.TUTORIALS / patch).read_text("utf-8"))
        ]
        assert on_page == in_file, f"the page's {prefix}* hunks differ from {patch}"


@pytest.mark.parametrize("patch", sorted(PATCHES.values()))
def test_the_patch_files_are_well_formed(patch: str):
    """Each hunk's line counts match its header (what `git apply` checks first), and no hunk
    overlaps the previous one: the files stay appliable when edited by hand."""
    lines = (harness.TUTORIALS / patch).read_text("utf-8").splitlines()
    assert lines[0].startswith("--- a/examples/") and lines[1].startswith("+++ b/examples/")
    hunks: list[tuple[list[int], list[str]]] = []
    for line in lines[2:]:
        header = re.fullmatch(r"@@ -(\d+),(\d+) \+(\d+),(\d+) @@.*", line)
        if header:
            hunks.append(([int(v) for v in header.groups()], []))
        else:
            assert line[:1] in (" ", "+", "-") or line == "", f"{patch}: stray line {line!r}"
            hunks[-1][1].append(line[:1] or " ")
    end = 0
    for (old_start, old_count, _, new_count), kinds in hunks:
        assert kinds.count(" ") + kinds.count("-") == old_count, (patch, old_start)
        assert kinds.count(" ") + kinds.count("+") == new_count, (patch, old_start)
        assert old_start > end, f"{patch}: the hunk at line {old_start} overlaps the previous one"
        end = old_start + old_count - 1


# --------------------------------------------------------------------------------------------
# train_unconditional.py
# --------------------------------------------------------------------------------------------

KEEP, FORGET = 80, (5, 40)  # 82 images; batches of 4: 20 micro-batches, accumulation 2


def _parse(block: str, argv: list[str]) -> argparse.Namespace:
    """The flags a patch adds, run into a parser and parsed."""
    namespace: dict[str, Any] = {"parser": argparse.ArgumentParser()}
    harness.run_block(PAGE, block, namespace, lines="added")
    return namespace["parser"].parse_args(argv)


def _unconditional_setup(accelerator: Any, tmp_path: Path, forget: list[int]) -> dict[str, Any]:
    """``train_unconditional.py`` up to ``accelerator.prepare``, through the patch's hunks."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    # The training run's output: a DDPMPipeline whose model predicts `sample` (the script's SNR
    # weighting then applies).
    trained = tmp_path / "ddpm-trained"
    DDPMPipeline(
        unet=tiny_unet(seed=0),
        scheduler=DDPMScheduler(num_train_timesteps=1000, prediction_type="sample"),
    ).save_pretrained(trained)
    args = _parse(
        "uncond-args",
        ["--pretrained_model_name_or_path", str(trained), "--forget_indices"]
        + [str(i) for i in forget],
    )
    # The script's own flags that the patched lines read.
    args.resume_from_checkpoint, args.use_ema = None, False
    args.gradient_accumulation_steps, args.train_batch_size = 2, 4
    ns: dict[str, Any] = {"torch": torch, "args": args, "accelerator": accelerator}
    ns.update(DDPMScheduler=DDPMScheduler, UNet2DModel=UNet2DModel)
    harness.run_block(PAGE, "uncond-imports", ns, lines="added")
    harness.run_block(PAGE, "uncond-scheduler", ns, lines="added")
    load = (
        'model = UNet2DModel.from_pretrained(args.pretrained_model_name_or_path, subfolder="unet")'
    )
    assert load in harness.blocks(PAGE)["uncond-model"].text
    exec(load, ns)
    torch.manual_seed(0)
    ns["dataset"] = [{"input": torch.rand(1, 8, 8) * 2 - 1} for _ in range(KEEP + len(FORGET))]
    ns["original"] = list(ns["dataset"])
    harness.run_block(PAGE, "uncond-split", ns, lines="added")
    return ns


def test_unconditional_split_refuses_indices_outside_the_data_set(accelerator, tmp_path):
    with pytest.raises(ValueError, match=r"--forget_indices must lie in \[0, 81\], got \[82\]"):
        _unconditional_setup(accelerator, tmp_path, [82])


def test_unconditional_script(accelerator, tmp_path):
    from diffusers.training_utils import compute_snr
    from tqdm.auto import tqdm

    ns = _unconditional_setup(accelerator, tmp_path, [40, *FORGET])  # a repeat is harmless
    dataset, forget_set, original = ns["dataset"], ns["forget_set"], ns["original"]
    assert [forget_set[i] is original[j] for i, j in enumerate(FORGET)] == [True, True]
    assert len(dataset) == KEEP and not any(
        dataset[i] is original[j] for i in range(KEEP) for j in FORGET
    )

    # The script's loader, optimizer and schedule (its lines), then the patched setup and loop.
    model = ns["model"]
    ns["train_dataloader"] = torch.utils.data.DataLoader(dataset, batch_size=4, shuffle=True)
    ns["optimizer"] = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ns["lr_scheduler"] = _constant_lr(ns["optimizer"])
    ns["weight_dtype"] = readme.weight_dtype_of(accelerator)
    recorder = readme.StepRecorder(accelerator, list(model.parameters())).attach(model)
    ns.update(epoch=0, first_epoch=0, resume_step=0, tqdm=tqdm, num_update_steps_per_epoch=10)
    with recorder.watching_balancer():
        harness.run_block(PAGE, "uncond-setup", ns)
        harness.run_block(PAGE, "uncond-loop", ns)

    batches = KEEP // 4
    assert len(recorder.syncs) == len(ns["train_dataloader"]) == batches, (
        f"the loop ran {len(recorder.syncs)} of {batches} keep batches"
    )
    assert recorder.syncs == readme.expected_syncs(batches)
    assert recorder.changed() == recorder.syncs, "the weights moved on a step that did not sync"
    assert recorder.balancer_steps == [True] * sum(recorder.syncs), (
        f"balancer.step() at sync_gradients {recorder.balancer_steps}: once per optimizer step"
    )
    assert recorder.backward_calls >= batches, "the terms did not go through accelerator.backward"
    loss_fn, balancer, draw = ns["loss_fn"], ns["balancer"], ns["draw"]
    assert loss_fn.prediction_type == "sample", "not the trained pipeline's prediction type"
    assert (loss_fn.n, loss_fn.k, loss_fn.lam, loss_fn.superfactor) == (82, 2, 0.5, 0.0)
    assert balancer.ratio == 0.1 and torch.isfinite(balancer.coefficient)
    assert draw.noisy.dtype == torch.bfloat16  # bf16 x0 with an fp32 forget image
    assert any(torch.equal(ns["forget_images"][0], original[j]["input"]) for j in FORGET)
    torch.testing.assert_close(ns["weights"], compute_snr(ns["noise_scheduler"], draw.timesteps))
    final = readme.flat(recorder.params)
    assert torch.isfinite(final).all() and not torch.equal(recorder.snapshots[0], final)


# --------------------------------------------------------------------------------------------
# train_text_to_image.py
# --------------------------------------------------------------------------------------------

T2I_KEEP = 40  # 41 images, one to forget: 10 micro-batches of 4


def _t2i_args(**flags: Any) -> argparse.Namespace:
    args = _parse("t2i-args", ["--forget_indices", "7"])
    script = {  # the script's own flags that the patched lines read
        "noise_offset": 0.0,
        "input_perturbation": 0.0,
        "dream_training": False,
        "prediction_type": "v_prediction",
        "snr_gamma": 5.0,
        "max_grad_norm": 1.0,
        "train_batch_size": 4,
        "gradient_accumulation_steps": 2,
        "num_train_epochs": 1,
        "seed": None,
        "use_ema": False,
    }
    for key, value in {**script, **flags}.items():
        setattr(args, key, value)
    return args


@pytest.mark.parametrize(
    "flag", [{"noise_offset": 0.1}, {"input_perturbation": 0.1}, {"dream_training": True}]
)
def test_text_to_image_refuses_options_the_weights_cannot_express(flag):
    with pytest.raises(ValueError, match="--noise_offset, --input_perturbation and --dream"):
        harness.run_block(PAGE, "t2i-checks", {"args": _t2i_args(**flag)}, lines="added")


def _t2i_namespace(accelerator: Any, tmp_path: Path, captions: list[str]) -> dict[str, Any]:
    """``train_text_to_image.py`` up to ``accelerator.prepare``, through the patch's hunks."""
    from diffusers import DDPMScheduler

    args = _t2i_args()
    ns: dict[str, Any] = {"torch": torch, "args": args, "accelerator": accelerator}
    harness.run_block(PAGE, "t2i-checks", ns, lines="added")
    harness.run_block(PAGE, "t2i-imports", ns, lines="added")
    tokenizer, vocab_size = write_clip_tokenizer(tmp_path / "tokenizer", max_length=8)
    weight_dtype = readme.weight_dtype_of(accelerator)
    unet = tiny_conditional_unet(seed=0)
    vae, text_encoder = tiny_sd_vae(seed=0), tiny_text_encoder(tokenizer, vocab_size, max_length=8)
    for frozen in (vae, text_encoder):  # as the script: frozen, on the device, in weight_dtype
        frozen.requires_grad_(False)
        frozen.to(accelerator.device, dtype=weight_dtype)
    unet.train()

    def tokenize(caption: str) -> torch.Tensor:
        return tokenizer(
            caption, max_length=8, padding="max_length", truncation=True, return_tensors="pt"
        ).input_ids[0]

    torch.manual_seed(0)
    ns["train_dataset"] = [
        {"pixel_values": torch.rand(3, 16, 16) * 2 - 1, "input_ids": tokenize(caption)}
        for caption in captions
    ]
    ns["original"] = list(ns["train_dataset"])
    ns["dataset"], ns["caption_column"] = {"train": {"text": captions}}, "text"
    ns.update(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        weight_dtype=weight_dtype,
        noise_scheduler=DDPMScheduler(num_train_timesteps=1000),  # epsilon; the flag says v
    )
    harness.run_block(PAGE, "t2i-split", ns, lines="added")
    return ns


def test_text_to_image_split_refuses_several_captions(accelerator, tmp_path):
    captions = ["a hippo"] * T2I_KEEP + ["a horse"]
    with pytest.raises(ValueError, match="SISS needs one caption for the whole data set"):
        _t2i_namespace(accelerator, tmp_path, captions)


def collate_fn(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``train_text_to_image.py``'s own."""
    pixel_values = torch.stack([example["pixel_values"] for example in examples])
    pixel_values = pixel_values.to(memory_format=torch.contiguous_format).float()
    input_ids = torch.stack([example["input_ids"] for example in examples])
    return {"pixel_values": pixel_values, "input_ids": input_ids}


def test_text_to_image_script(accelerator, tmp_path):
    ns = _t2i_namespace(accelerator, tmp_path, ["a hippo"] * (T2I_KEEP + 1))
    assert ns["forget_set"][0] is ns["original"][7] and len(ns["train_dataset"]) == T2I_KEEP

    unet = ns["unet"]
    ns["collate_fn"] = collate_fn
    ns["train_dataloader"] = torch.utils.data.DataLoader(
        ns["train_dataset"], shuffle=True, collate_fn=collate_fn, batch_size=4
    )
    ns["optimizer"] = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    ns["lr_scheduler"] = _constant_lr(ns["optimizer"])
    ns["first_epoch"] = 0
    recorder = readme.StepRecorder(accelerator, list(unet.parameters())).attach(unet)
    with recorder.watching_balancer():
        harness.run_block(PAGE, "t2i-setup", ns)
        harness.run_block(PAGE, "t2i-loop", ns)

    batches = T2I_KEEP // 4
    assert len(recorder.syncs) == batches
    assert recorder.syncs == readme.expected_syncs(batches)
    assert recorder.changed() == recorder.syncs, "the weights moved on a step that did not sync"
    assert recorder.balancer_steps == [True] * sum(recorder.syncs)
    loss_fn, balancer = ns["loss_fn"], ns["balancer"]
    assert ns["noise_scheduler"].config.prediction_type == "v_prediction"
    assert (loss_fn.prediction_type, loss_fn.snr_gamma) == ("v_prediction", 5.0)
    assert (loss_fn.n, loss_fn.k) == (T2I_KEEP + 1, 1)
    assert torch.isfinite(balancer.coefficient) and isinstance(ns["train_loss"], float)
    assert ns["forget_latents"].shape == (1, 4, 8, 8) and ns["latents"].shape == (4, 4, 8, 8)
    final = readme.flat(recorder.params)
    assert torch.isfinite(final).all() and not torch.equal(recorder.snapshots[0], final)

    # The two-pass variant for several captions: its loop lines, on the last batch.
    from siss.adapters import loss_from_scheduler

    ns["loss_fn"] = loss_from_scheduler(
        "siss-nois", ns["noise_scheduler"], superfactor=0.0, n=T2I_KEEP + 1, k=1, snr_gamma=5.0
    ).to(accelerator.device)
    with accelerator.autocast():
        harness.run_block(PAGE, "t2i-captions", ns)
    rows = 2 * len(ns["latents"])
    assert ns["draw"].noisy.shape[0] == ns["encoder_hidden_states"].shape[0] == rows
    torch.testing.assert_close(  # row B + i is conditioned on the forget caption
        ns["encoder_hidden_states"][rows // 2 :], ns["forget_states"].expand_as(ns["keep_states"])
    )
    assert torch.isfinite(ns["terms"].loss)
    ns["terms"].loss.backward()


# --------------------------------------------------------------------------------------------
# LoRA with peft
# --------------------------------------------------------------------------------------------


def test_lora_tutorial(tmp_path):
    """The setup, loop and save blocks on a tiny Stable Diffusion UNet; the saved adapter loads
    into a fresh pipeline and reproduces the trained UNet."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    torch.manual_seed(0)
    ns: dict[str, Any] = {
        "torch": torch,
        "unet": tiny_conditional_unet(seed=0),
        "noise_scheduler": DDPMScheduler(num_train_timesteps=1000),
        "keep_latents": torch.randn(48, 4, 8, 8),  # 3 batches of 16
        "forget_latents": torch.randn(2, 4, 8, 8),
        "prompt_embeds": torch.randn(1, 6, 8),
        "output_dir": str(tmp_path / "lora"),
    }
    base = {name: p.detach().clone() for name, p in ns["unet"].named_parameters()}
    harness.run_block("lora.md", "lora-setup", ns)
    harness.run_block("lora.md", "lora-loop", ns)
    unet, params = ns["unet"], ns["params"]
    lora = {name for name, p in unet.named_parameters() if p.requires_grad}
    assert lora and all(".lora_" in name for name in lora)
    assert ns["balancer"].params == params and len(params) == len(lora)
    changed = {
        name
        for name, p in unet.named_parameters()
        if name in base and not torch.equal(p.detach(), base[name])
    }
    assert not changed, f"weights outside the LoRA changed: {sorted(changed)[:3]}"
    assert torch.isfinite(ns["balancer"].coefficient)

    harness.run_block("lora.md", "lora-save", ns)
    folder = tiny_sd_pipeline(tmp_path / "pipe", unet=tiny_conditional_unet(seed=0))
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.load_lora_weights(ns["output_dir"])
    noisy, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    with torch.no_grad():
        trained = unet(noisy, t, ns["prompt_embeds"].expand(2, -1, -1)).sample
        loaded = pipe.unet(noisy, t, ns["prompt_embeds"].expand(2, -1, -1)).sample
        pipe.unet.disable_lora()
        plain = pipe.unet(noisy, t, ns["prompt_embeds"].expand(2, -1, -1)).sample
    torch.testing.assert_close(loaded, trained)
    assert not torch.allclose(plain, trained), "the LoRA did not change the UNet's output"
