"""What the Stable Diffusion job's tests share: cheap flags, running the job in-process, and the
random tiny model's reference split.

Runs of the job are in-process (``siss.stable_diffusion.cli.run_command``, which returns the
metrics); a test that starts processes runs ``python -m siss.stable_diffusion`` (``MODULE``)
from the repository root, as the docs say. Test modules import it with
``from tests.stable_diffusion import sd_harness as harness``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from siss.stable_diffusion import cli
from siss.stable_diffusion.generate import load_generated
from siss.stable_diffusion.pipeline import add_lora, to_signed

ROOT = Path(__file__).resolve().parents[2]
MODULE = ["-m", "siss.stable_diffusion"]  # run from ROOT

# Cheap settings: 10 sampling steps, small batches; every run on the CPU in float32.
CHEAP = [
    "--device", "cpu", "--sample_steps", "10", "--gen_batch_size", "16", "--no_progress",
    "--noise_generations", "2",
]  # fmt: skip

# Resume and two processes (the random tiny model, split by distance to one of its images).
SMALL_RUN = [
    "--num_images", "16", "--max_train_steps", "4", "--train_batch_size", "2",
    "--gradient_accumulation_steps", "4",
    "--learning_rate", "1e-3", "--verify_images", "2", "--threads", "1",
]  # fmt: skip


def run(*argv):
    """The job of the command line ``argv``, in this process; its metrics (or summary rows)."""
    return cli.run_command([str(a) for a in argv])


def lora_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "lora" / "pytorch_lora_weights.safetensors"))


def expect_exit(capsys, argv, *words):
    """The job stops (SystemExit, non-zero) with a message holding ``words``."""
    with pytest.raises(SystemExit) as stopped:
        run(*argv)
    message = f"{stopped.value.code} {capsys.readouterr().err}"
    assert stopped.value.code not in (0, None), message
    for word in words:
        assert word in message, message
    return message


def reference_split(model: Path, out: Path, prompt: str = "a photo") -> list:
    """Generate into ``out`` and return the flags of a reference split with about half the
    images on each side (the threshold: the median distance to image 0)."""
    from siss.audit.generation import pixel_features

    base = [
        "--pretrained_model_name_or_path",
        model,
        "--prompt",
        prompt,
        "--output_dir",
        out,
        *CHEAP,
        *SMALL_RUN,
    ]
    run("generate", *base)
    images, _ = load_generated(out, 16)
    features = pixel_features(to_signed(images))
    distances = (features - features[:1]).norm(dim=1)
    threshold = distances[1:].median().item() + 1e-6
    return ["--reference_image", out / "images" / "00000.png", "--threshold", threshold]


def initial_lora(model: Path, argv: list) -> dict[str, torch.Tensor]:
    """The LoRA weights the job starts from (its seeded initialisation)."""
    from diffusers import StableDiffusionPipeline

    args = cli.parse_args([*map(str, argv), "--output_dir", "unused"])
    unet = StableDiffusionPipeline.from_pretrained(model).unet
    unet.requires_grad_(False)
    add_lora(unet, args)
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    return {f"unet.{k}": v for k, v in state.items()}


def largest_difference(first: dict, second: dict) -> float:
    assert first.keys() == second.keys()
    return max((first[k].double() - second[k].double()).abs().max().item() for k in first)
