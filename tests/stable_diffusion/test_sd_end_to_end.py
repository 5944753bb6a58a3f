"""The whole Stable Diffusion job end to end (``siss-stable-diffusion run``, then ``verify``) on
tiny pipelines built from config (CPU, no download).

``tests/conftest.py``'s ``planted_sd_pipeline`` is a tiny SD pipeline whose UNet was trained to
generate one fixed "memorized" image for its prompt about two thirds of the time. Checked, with
the documented CPU command (LoRA, and the full UNet at its documented learning rate): the split
finds exactly the planted copies; the run stops because they are gone; at most 1 of 128
generations on fresh seeds is a copy by the planted image's known pixel distance (not the job's
rule); every keep prompt stays in its band; the verify stage measures the saved weights as the
run did. Also: a prompt list runs each prompt and writes one summary table; tiny SDXL and SD3
pipelines run the same command and save a LoRA that loads.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from siss.stable_diffusion.generate import load_generated
from siss.stable_diffusion.pipeline import to_signed
from tests.stable_diffusion.sd_harness import CHEAP, run

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate")


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    from conftest import planted_sd_pipeline

    return planted_sd_pipeline(tmp_path_factory.mktemp("planted") / "pipe")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random tiny CLIP saved to a folder: the quality plumbing is measured with it (its
    values mean nothing)."""
    from conftest import write_tiny_clip

    return write_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


# The documented CPU command (docs/stable_diffusion.md), unchanged but for the model, the prompt
# and the output folder; CHEAP adds only what does not change the run (no progress bars, two
# generations for the noise score, batches of 16 generations).
DOCUMENTED_CPU = [
    *CHEAP, "--num_images", "64", "--verify_images", "128", "--train_batch_size", "16",
    "--gradient_accumulation_steps", "1", "--learning_rate", "1e-3",
]  # fmt: skip
DOCUMENTED_FULL = ["--full", "--learning_rate", "5e-5"]  # the full UNet's documented rate
INDEPENDENT_SEEDS = range(900_000, 900_128)  # no stage of the job uses them


def independent_copies(planted, folder: Path, weights: Path, full: bool = False) -> int:
    """Copies of the planted image by its known pixel distance (not the job's rule) among 128
    generations on seeds the job never used, with the saved weights."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    if full:
        pipe.unet = UNet2DConditionModel.from_pretrained(weights)
    else:
        pipe.load_lora_weights(weights)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(s) for s in INDEPENDENT_SEEDS]
    with torch.no_grad():
        images = pipe(
            [planted.prompt] * len(generators), num_inference_steps=10, generator=generators,
            output_type="pt",
        ).images  # fmt: skip
    return int(planted.is_copy(images * 2 - 1).sum())


def check_gone_and_kept(metrics: dict) -> None:
    """Stopped because the copies were gone, every keep prompt in its band, the report's
    figures consistent."""
    assert metrics["stop"]["reason"] == "gone", metrics["stop"]
    assert metrics["before"]["train"]["memorized"] > 30, metrics["before"]["train"]
    keep = metrics["after"]["keep"]
    # the four generic prompts (less one that is the run's own --prompt) and the training
    # prompt's non-copies
    assert len(keep) >= 4 and metrics["train_prompt"] in keep, keep
    assert all(row["in_band"] for row in keep.values()), keep
    assert metrics["stop"]["steps"] < 200
    checks = [e for e in metrics["history"] if e.get("check") is not None]
    assert checks[-1]["copies"] == checks[-2]["copies"] == 0
    assert checks[-1]["generated"] == checks[-2]["generated"] == 64


def test_documented_lora_command_removes_the_planted_image(planted, tmp_path, capsys):
    """The documented CPU command on the planted pipeline: the split finds exactly the planted
    copies; the run stops because they are gone; an independent count (the planted image's
    pixel distance, fresh seeds) finds at most 1 of 128; every keep prompt stays in its band;
    the report prints the stop, the keep prompts and the verdict."""
    out = tmp_path / "out"
    argv = ["--pretrained_model_name_or_path", planted.folder, "--prompt", planted.prompt,
            "--output_dir", out, *DOCUMENTED_CPU]  # fmt: skip
    metrics = run(*argv)
    report = capsys.readouterr().out
    images, latents = load_generated(out, 64)
    truth = planted.is_copy(to_signed(images))
    split = json.loads((out / "split.json").read_text())
    assert split["rule"] == "2-means" and split["found"]
    assert torch.equal(torch.tensor(split["memorized"]), truth)
    assert split["statistics"]["gap_low"] < split["threshold"] < split["statistics"]["gap_high"]
    assert latents.shape == (64, 4, 8, 8)

    check_gone_and_kept(metrics)
    assert metrics["after"]["train"]["memorized"] <= 1
    assert independent_copies(planted, planted.folder, out / "lora") <= 1
    for words in ("stopped after", "gone: no copy among 128", "drift / spread", "a photo of a dog"):
        assert words in report, report
    # the verify stage loads the saved LoRA itself and measures what the run measured last
    entry = run("verify", *argv)
    assert entry["train"]["memorized"] == metrics["after"]["train"]["memorized"]
    for name in (
        "metrics.png",
        "samples_before_train.png",
        "samples_after_train.png",
        "split_memorized.png",
        "split_not_memorized.png",
        "verify.json",
        "keep_before.safetensors",
    ):
        assert (out / name).stat().st_size > 0, name  # fmt: skip
    # one metadata key a file: safetensors writes several in a per-process hash order, so two
    # runs with the same seed wrote files that differed in their bytes
    from safetensors import safe_open

    for path in (out / "keep_before.safetensors", out / "latents" / "00000.safetensors"):
        with safe_open(str(path), framework="pt") as file:
            assert len(file.metadata()) == 1, (path, file.metadata())


def test_documented_full_unet_command_removes_the_planted_image(planted, tiny_clip, tmp_path):
    """The same with the full UNet at its documented learning rate, and the quality plumbing
    (a random tiny CLIP: its values mean nothing, the verdict is determined)."""
    from diffusers import UNet2DConditionModel

    out = tmp_path / "out"
    other = planted.other_prompts[0]  # measured as the "original" prompt, never memorized
    argv = ["--pretrained_model_name_or_path", planted.folder, "--train_prompt", planted.prompt,
            "--prompt", other, "--output_dir", out, *DOCUMENTED_CPU, *DOCUMENTED_FULL,
            "--clip_model", tiny_clip, "--quality_floor", "0"]  # fmt: skip
    metrics = run(*argv)
    check_gone_and_kept(metrics)
    assert independent_copies(planted, planted.folder, out / "unet", full=True) <= 1
    after = metrics["after"]["train"]
    for entry in (metrics["before"]["train"], after):
        assert 0 <= entry["clip_iqa"] <= 1 and math.isfinite(entry["clip_score"])
        assert math.isfinite(entry["noise_score"])
    assert metrics["success"] is (after["memorized"] == 0)  # quality measured: determined
    assert metrics["after"]["original"]["prompt"] == other
    entry = run("verify", *argv)  # loads out/unet into the pipeline
    assert entry["train"]["memorized"] == after["memorized"]
    assert entry["weights"] == str(out / "unet")
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    original = UNet2DConditionModel.from_pretrained(planted.folder / "unet")
    changed = [
        not torch.equal(a, b) for a, b in zip(unet.parameters(), original.parameters(), strict=True)
    ]
    assert all(changed[:3]) and sum(changed) > len(changed) // 2


def test_prompt_list_runs_each_prompt_and_writes_one_table(planted, tmp_path, monkeypatch):
    """Each prompt runs and has its row; the next prompt's pipeline loads with nothing of the
    last job's recipe (its model, optimizer and teacher) left in memory."""
    import gc
    import weakref

    import siss
    from siss.stable_diffusion import cli

    recipes = []

    class Recorded(siss.Unlearner):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            recipes.append(weakref.ref(self))

    alive_at_loads = []

    def load_and_count(*args, load=cli.load_pipeline, **kwargs):
        gc.collect()
        alive_at_loads.append(sum(recipe() is not None for recipe in recipes))
        return load(*args, **kwargs)

    monkeypatch.setattr(siss, "Unlearner", Recorded)
    monkeypatch.setattr(cli, "load_pipeline", load_and_count)
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": planted.prompt}, {"caption": planted.other_prompts[1], "index": 7}]
    prompts.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"
    result = run("--pretrained_model_name_or_path", planted.folder, "--prompts", prompts,
                 "--output_dir", out, *CHEAP,
                 "--num_images", "16", "--verify_images", "4", "--max_train_steps", "2",
                 "--train_batch_size", "16", "--gradient_accumulation_steps", "1")  # fmt: skip
    assert [r["prompt"] for r in result] == [planted.prompt, planted.other_prompts[1]]
    assert result[0]["metrics"]["after"]["step"] == 2
    assert result[1]["status"].startswith("skipped: no memorization found")
    table = (out / "summary.md").read_text()
    assert table.count("\n") == 4 and "no memorization found" in table
    assert json.loads((out / "summary.json").read_text())[1]["metrics"] == {}
    assert len(recipes) == 1 and alive_at_loads == [0, 0]


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_sdxl_and_sd3_pipelines_run_end_to_end(family, tmp_path):
    """The same command on a tiny SDXL (UNet with added time ids) and SD3 (transformer, no T5:
    its folder saves text_encoder_3 as null) pipeline: the LoRA is saved and loads back."""
    import conftest
    from diffusers import DiffusionPipeline

    folder = getattr(conftest, f"tiny_{family}_pipeline")(tmp_path / "pipe")
    out = tmp_path / "out"
    base = ["--pretrained_model_name_or_path", folder, "--prompt", "a photo", "--output_dir", out,
            "--num_images", "8",
            "--sample_steps", "4", "--no_progress", "--device", "cpu"]  # fmt: skip
    run("generate", *base)
    images, latents = load_generated(out, 8)
    assert images.shape[1:] == (3, 16, 16) and latents.shape[0] == 8
    from siss.audit.generation import pixel_features

    features = pixel_features(to_signed(images))
    threshold = (features - features[:1]).norm(dim=1)[1:].median().item() + 1e-6
    metrics = run(*base, "--max_train_steps", "2", "--verify_images", "2", "--train_batch_size",
                  "2",
                  "--gradient_accumulation_steps", "2", "--reference_image",
                  out / "images" / "00000.png",
                  "--threshold", threshold)  # fmt: skip
    assert metrics["after"]["step"] == 2
    absent = {"text_encoder_3": None, "tokenizer_3": None} if family == "sd3" else {}
    pipe = DiffusionPipeline.from_pretrained(folder, **absent)
    pipe.load_lora_weights(out / "lora")
    denoiser = pipe.unet if family == "sdxl" else pipe.transformer
    assert any("lora" in name for name, _ in denoiser.named_parameters())
