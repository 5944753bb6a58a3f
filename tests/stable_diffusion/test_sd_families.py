"""The Stable Diffusion job on every pipeline family it takes: SDXL, SD3 and Flux.

Tiny pipelines built from config (``tests/conftest.py``: ``tiny_sdxl_pipeline``,
``tiny_sd3_pipeline``, ``tiny_flux_pipeline``; diffusers' own tiny test configs), saved with
``save_pretrained`` and passed to the job by path, as a real model would be. Per family, one
generation is shared (a module-scoped fixture); then a LoRA run and a ``--full`` run of two steps
go through generate, split, unlearn (with one until-gone check and a keep prompt) and the final
verification, and the ``verify`` stage reloads the saved weights. Checked: the files and metrics
are written; the weights the job trained changed, and with a LoRA only the adapter's (the base
denoiser is bit-identical to the folder's); the LoRA wraps the modules diffusers' LoRA script of
the family wraps. CPU, float32, seconds per run; what this does not show is how any of it behaves
on a real SDXL, SD3 or Flux checkpoint (docs/stable_diffusion.md).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

import siss.stable_diffusion.unlearn as unlearn_module
from siss.stable_diffusion.generate import load_generated
from siss.stable_diffusion.pipeline import LORA_TARGETS_OF, to_signed
from tests.stable_diffusion.sd_harness import run

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate")

FAMILIES = ("sdxl", "sd3", "flux")
DENOISER = {"sdxl": "unet", "sd3": "transformer", "flux": "transformer"}
# A module each family's LoRA wraps that SD 1.x's four attention projections do not name.
FAMILY_MODULE = {"sdxl": "to_out.0", "sd3": "add_k_proj", "flux": "ff.net.0.proj"}
NUM_IMAGES = 8
CHEAP_FAMILY = [
    "--device", "cpu", "--no_progress", "--threads", "1", "--sample_steps", "2",
    "--gen_batch_size", "8", "--num_images", str(NUM_IMAGES), "--noise_generations", "2",
    "--resolution", "16",
]  # fmt: skip
TRAIN = [
    "--max_train_steps", "2", "--train_batch_size", "2", "--calibration_batches", "1",
    "--learning_rate", "1e-3", "--verify_images", "2", "--verify_every", "1",
    "--keep_prompts", "a dog", "--keep_images", "2", "--checkpointing_steps", "0",
]  # fmt: skip


def reset_accelerate() -> None:
    """accelerate's process-wide state, forgotten (a module-scoped fixture runs the job outside
    the ``fresh_accelerate`` fixture)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def load_folder(folder: Path) -> Any:
    """The saved pipeline, as the job loads it (SD3's absent T5 encoder passed as None)."""
    from diffusers import DiffusionPipeline

    index = json.loads((folder / "model_index.json").read_text())
    absent = {k: None for k, v in index.items() if isinstance(v, list) and v[0] is None}
    return DiffusionPipeline.from_pretrained(folder, **absent)


@pytest.fixture(scope="module", params=FAMILIES)
def generated(request, tmp_path_factory) -> dict[str, Any]:
    """One tiny pipeline folder of the family and its job's generation (8 images at 16x16),
    with the flags of a reference split that puts about half the images on each side (the
    threshold: the median distance to image 0; a random model memorizes nothing)."""
    import conftest

    from siss.audit.generation import pixel_features

    family = request.param
    root = tmp_path_factory.mktemp(f"family-{family}")
    folder = getattr(conftest, f"tiny_{family}_pipeline")(root / "pipe")
    out = root / "generated"
    base = ["--pretrained_model_name_or_path", folder, "--prompt", "a photo", *CHEAP_FAMILY]
    threads = torch.get_num_threads()  # --threads 1 sets it for the process: put it back
    reset_accelerate()
    try:
        run("generate", *base, "--output_dir", out)
    finally:
        reset_accelerate()
        torch.set_num_threads(threads)
    images, latents = load_generated(out, NUM_IMAGES)
    features = pixel_features(to_signed(images))
    threshold = (features - features[:1]).norm(dim=1)[1:].median().item() + 1e-6
    split = ["--reference_image", out / "images" / "00000.png", "--threshold", threshold]
    return {
        "family": family,
        "folder": folder,
        "generated": out,
        "root": root,
        "base": base + split,
        "images": images,
        "latents": latents,
    }


def job_folder(generated: dict[str, Any], name: str) -> Path:
    """A new ``--output_dir`` holding the shared generation (the job resumes it per image)."""
    out = generated["root"] / name
    for sub in ("images", "latents"):
        shutil.copytree(generated["generated"] / sub, out / sub)
    return out


def run_capturing(monkeypatch, *argv: Any) -> tuple[dict[str, Any], torch.nn.Module]:
    """The job's metrics and the denoiser it saved (captured at ``save_weights``)."""
    captured: dict[str, torch.nn.Module] = {}
    save_weights = unlearn_module.save_weights

    def capture(args, pipe, denoiser, accelerator, out):
        captured["denoiser"] = denoiser
        return save_weights(args, pipe, denoiser, accelerator, out)

    monkeypatch.setattr(unlearn_module, "save_weights", capture)
    metrics = run(*argv)
    return metrics, captured["denoiser"]


def lora_weights(denoiser: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A denoiser's LoRA weights by module and matrix (``blocks.0.attn.to_q.lora_A``), whatever
    the adapter's name (the job's ``default``, ``load_lora_weights``'s ``default_0``)."""
    weights = {}
    for name, value in denoiser.state_dict().items():
        parts = name.split(".")
        for matrix in ("lora_A", "lora_B"):
            if matrix in parts:
                weights[".".join(parts[: parts.index(matrix) + 1])] = value
    return weights


def check_outputs(out: Path, metrics: dict[str, Any]) -> None:
    """Every stage's files, and metrics of a finished two-step run with one check."""
    for name in ("config.json", "split.json", "metrics.json", "keep_before.safetensors"):
        assert (out / name).is_file(), name
    assert list((out / "verify").glob("*.png"))
    split = json.loads((out / "split.json").read_text())
    assert split["counts"]["memorized"] >= 1 and split["counts"]["not_memorized"] >= 1
    assert metrics["before"]["step"] == 0 and metrics["after"]["step"] == 2
    checks = [entry for entry in metrics["history"] if entry.get("check") is not None]
    assert len(checks) == 1 and checks[0]["step"] == 1
    # the keep prompt measured against its images before (or, where a random tiny model made
    # copies among them, reported as not watched)
    after = metrics["after"]
    assert "a dog" in after["keep"] or "a dog" in json.dumps(after["keep_not_watched"])
    assert metrics["stop"]["reason"] == "cap"
    for which in ("before", "after"):
        row = metrics[which]["train"]
        assert row["total"] == 2 and isinstance(row["noise_score"], float)
    assert metrics["loss"] and all(math.isfinite(value) for value in metrics["loss"])


def test_lora_run_trains_the_familys_adapter_only(generated, monkeypatch):
    from safetensors.torch import load_file

    family = generated["family"]
    out = job_folder(generated, "lora")
    metrics, denoiser = run_capturing(monkeypatch, *generated["base"], *TRAIN, "--output_dir", out)
    check_outputs(out, metrics)
    config = json.loads((out / "config.json").read_text())
    assert config["lora_targets"] == list(LORA_TARGETS_OF[family])
    assert config["resolution"] == [16, 16]

    original = getattr(load_folder(generated["folder"]), DENOISER[family]).state_dict()
    trained = {name: value for name, value in denoiser.state_dict().items() if "lora" not in name}
    base = {name.replace(".base_layer", ""): value for name, value in trained.items()}
    assert base.keys() == original.keys()
    for name, value in original.items():  # the frozen model: bit-identical
        assert torch.equal(base[name], value), name

    saved = load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))
    assert saved and all("lora" in key for key in saved)
    assert all(key.startswith(DENOISER[family] + ".") for key in saved)
    assert any(FAMILY_MODULE[family] + ".lora" in key for key in saved)
    up = [value for key, value in saved.items() if ".up." in key or "lora_B" in key]
    assert up and max(value.abs().max().item() for value in up) > 0  # B starts at zero

    # diffusers' load_lora_weights puts every trained LoRA weight back, unchanged
    pipe = load_folder(generated["folder"])
    pipe.load_lora_weights(out / "lora")
    loaded = lora_weights(getattr(pipe, DENOISER[family]))
    assert loaded.keys() == lora_weights(denoiser).keys()
    for key, value in lora_weights(denoiser).items():
        assert torch.equal(loaded[key], value.to(loaded[key].dtype)), key

    # the verify stage puts the LoRA back into the pipeline and measures it
    reset_accelerate()
    entry = run("verify", *generated["base"], *TRAIN, "--output_dir", out)
    assert entry["weights"] == str(out / "lora")
    assert (out / "verify.json").is_file() and entry["train"]["total"] == 2


def test_full_run_changes_the_denoiser_and_saves_it(generated, monkeypatch):
    family = generated["family"]
    name = DENOISER[family]
    out = job_folder(generated, "full")
    argv = [*generated["base"], *TRAIN, "--full", "--output_dir", out]
    metrics, denoiser = run_capturing(monkeypatch, *argv)
    check_outputs(out, metrics)
    assert not (out / "lora").exists()
    assert metrics["weights"] == str(out / name)

    pipe = load_folder(generated["folder"])
    original = getattr(pipe, name).state_dict()
    saved = type(getattr(pipe, name)).from_pretrained(out / name).state_dict()
    assert saved.keys() == original.keys() == denoiser.state_dict().keys()
    changed = [key for key in original if not torch.equal(saved[key], original[key])]
    assert changed, "no weight of the saved denoiser moved"
    for key, value in denoiser.state_dict().items():
        assert torch.equal(saved[key], value.to(saved[key].dtype)), key

    reset_accelerate()
    entry = run("verify", *argv)
    assert entry["weights"] == str(out / name)
