"""The unlearn stage of the Stable Diffusion job (``siss.stable_diffusion.unlearn``) on the
random tiny pipeline, split by distance to one of its images: the batch plan is the same global
batch for any number of processes; an interrupted run resumed ends with the uninterrupted run's
LoRA weights, and a resume with other flags is refused naming them; two real processes
(torchrun, gloo) end with identical weights on both ranks, equal to the one-process run on the
same global batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from siss.loop import BatchPlan
from siss.stable_diffusion.files import checkpoints
from tests.stable_diffusion.sd_harness import (
    CHEAP,
    MODULE,
    ROOT,
    SMALL_RUN,
    initial_lora,
    largest_difference,
    lora_weights,
    reference_split,
    run,
)

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate")


def test_batch_plan_is_the_same_global_batch_for_any_process_count():
    """The rows and draw seeds of a step do not depend on how many processes share it."""
    one = BatchPlan(0, keep=10, forget=3, batch=8, micro=2, world=1)
    two = [BatchPlan(0, keep=10, forget=3, batch=8, micro=2, world=2) for _ in range(2)]
    for step in range(4):
        single = [(k.tolist(), f.tolist(), g.initial_seed()) for k, f, g in
                  one.micro_batches(step, 0)]  # fmt: skip
        shared = [(k.tolist(), f.tolist(), g.initial_seed()) for rank in (0, 1)
                  for k, f, g in two[rank].micro_batches(step, rank)]  # fmt: skip
        assert sorted(single) == sorted(shared)
        assert len({seed for *_, seed in shared}) == 4  # every micro-batch its own stream
    # every keep row once per epoch of 10 rows: steps 0-4 hold 40 rows = 4 epochs
    rows = torch.cat([k for s in range(5) for k, _, _ in one.micro_batches(s, 0)])
    assert all(sorted(rows[i : i + 10].tolist()) == list(range(10)) for i in range(0, 40, 10))


@pytest.mark.parametrize(
    "recipe",
    [[], ["--keep_target", "teacher", "--calibration_batches", "2", "--balance_every", "3"]],
    ids=["noise-target", "teacher-calibrated"],
)
def test_resume_ends_with_the_uninterrupted_runs_lora(tiny_sd_folder, tmp_path, recipe):
    """Stopped after 2 steps and resumed, the LoRA equals an uninterrupted run's; with the
    teacher recipe the calibrated scale and the balancer's held coefficient (refreshed every 3
    steps: step 2 is between refreshes) come back from accelerate's state."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    split = reference_split(tiny_sd_folder, whole)
    argv = [
        "--pretrained_model_name_or_path",
        tiny_sd_folder,
        "--prompt",
        "a photo",
        *CHEAP,
        *SMALL_RUN,
        *split,
        *recipe,
    ]
    expected = run(*argv, "--output_dir", whole)
    assert expected["split"]["memorized"] >= 1 and expected["split"]["not_memorized"] >= 1
    for folder in ("images", "latents"):
        (parts / folder).mkdir(parents=True)
        for file in (whole / folder).iterdir():
            (parts / folder / file.name).write_bytes(file.read_bytes())
    assert run(*argv, "--output_dir", parts, "--stop_after", "2") == {"stopped": True}
    assert [p.name for p in checkpoints(parts)] == ["step-000002"]
    assert not (parts / "metrics.json").exists() and not (parts / "lora").exists()
    # a resume with another configuration is refused, naming the flag
    with pytest.raises(SystemExit, match=r"--learning_rate \(saved 0.001, now 0.002\)"):
        run(
            *argv,
            "--output_dir",
            parts,
            "--resume_from_checkpoint",
            "latest",
            "--learning_rate",
            "2e-3",
        )
    # and a plain re-run must not silently start over
    with pytest.raises(SystemExit, match="--resume_from_checkpoint latest"):
        run(*argv, "--output_dir", parts)
    resumed = run(*argv, "--output_dir", parts, "--resume_from_checkpoint", "latest")
    final, interrupted = lora_weights(whole), lora_weights(parts)
    for key, value in final.items():
        assert torch.equal(value, interrupted[key]), key
    assert largest_difference(final, initial_lora(tiny_sd_folder, argv)) > 1e-3  # it did train
    assert [e["step"] for e in resumed["history"]] == [0, 4]
    assert resumed["loss"] == expected["loss"] and len(expected["loss"]) == 4 * 4
    timeless = [
        {k: v for k, v in r["history"][0].items() if k != "wall_s"} for r in (resumed, expected)
    ]
    assert timeless[0] == timeless[1]
    assert not checkpoints(parts)  # a finished run keeps its weights, not its checkpoints


def test_two_processes_equal_one_process_on_the_same_global_batch(tiny_sd_folder, tmp_path):
    """torchrun --nproc_per_node 2 (gloo) with --gradient_accumulation_steps 2: 2 micro-batches
    of 2 per rank and step, against one process with 4 micro-batches of 2; the same global batch
    of 8 and the same draws."""
    one, two = tmp_path / "one", tmp_path / "two"
    split = reference_split(tiny_sd_folder, one)
    argv = [
        "--pretrained_model_name_or_path",
        tiny_sd_folder,
        "--prompt",
        "a photo",
        *CHEAP,
        *SMALL_RUN,
        *split,
    ]
    single = run(*argv, "--output_dir", one)
    assert (single["processes"], single["accumulation_steps"]) == (1, 4)
    for folder in ("images", "latents"):  # the same training data: generation is not compared
        (two / folder).mkdir(parents=True)
        for file in (one / folder).iterdir():
            (two / folder / file.name).write_bytes(file.read_bytes())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        *MODULE, *map(str, argv), "--output_dir", str(two), "--gradient_accumulation_steps", "2",
    ]  # fmt: skip
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=400, env=env, cwd=ROOT
        )
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"torchrun timed out:\n{error.stdout}\n{error.stderr}")
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    double = json.loads((two / "metrics.json").read_text())
    assert (double["processes"], double["accumulation_steps"]) == (2, 2), "not 2 processes"
    assert double["ranks_identical"] and len(double["rank_fingerprints"]) == 2
    assert double["split"] == single["split"]
    start = initial_lora(tiny_sd_folder, argv)
    moved = largest_difference(lora_weights(one), start)
    assert moved > 1e-3
    # the same update up to the order of floating-point sums (DDP averages across ranks)
    assert largest_difference(lora_weights(two), lora_weights(one)) < 1e-4 * moved


@pytest.mark.parametrize("lora_alpha", [4.0, 16.0])
def test_the_saved_lora_loads_as_the_trained_model_whatever_its_alpha(
    tiny_sd_folder, tmp_path, lora_alpha
):
    """``load_lora_weights`` rebuilds a LoRA at alpha = rank (no adapter metadata before diffusers
    0.34): with ``--lora_alpha 16`` at rank 4 it loaded a quarter of the trained delta, and the
    verify stage measured another model than the run's. The scale is saved in B."""
    from argparse import Namespace
    from types import SimpleNamespace

    from diffusers import StableDiffusionPipeline

    from siss.stable_diffusion.pipeline import add_lora
    from siss.stable_diffusion.unlearn import load_unlearned, save_weights

    args = Namespace(full=False, rank=4, lora_alpha=lora_alpha, lora_targets=None, seed=0)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_folder)
    add_lora(pipe.unet, args)
    with torch.no_grad():  # what training leaves: a LoRA that changes the output
        for name, parameter in pipe.unet.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05, generator=torch.Generator().manual_seed(len(name)))
    noisy, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    text = torch.randn(2, 3, pipe.unet.config.cross_attention_dim)
    with torch.no_grad():
        trained = pipe.unet(noisy, t, encoder_hidden_states=text).sample
    accelerator = SimpleNamespace(wait_for_everyone=lambda: None, is_main_process=True)
    save_weights(args, pipe, pipe.unet, accelerator, tmp_path)
    fresh = StableDiffusionPipeline.from_pretrained(tiny_sd_folder)
    with torch.no_grad():
        base = fresh.unet(noisy, t, encoder_hidden_states=text).sample
        assert load_unlearned(args, fresh, tmp_path) == str(tmp_path / "lora")
        loaded = fresh.unet(noisy, t, encoder_hidden_states=text).sample
    assert not torch.allclose(trained, base, atol=1e-4)
    torch.testing.assert_close(loaded, trained, rtol=1e-5, atol=1e-6)
