"""README.md's training-loop code, run as written under accelerate (bf16, gradient accumulation).

The marked blocks (``<!-- test: NAME -->`` before the fence) are executed verbatim with tiny real
diffusers models bound to the names of diffusers' ``train_unconditional.py`` and
``train_text_to_image_lora.py`` (``tests/readme/readme_harness.py``); then the same blocks run on
two real processes (``torchrun``, gloo on the CPU, ``tests/readme/two_ranks.py``).

What used to go wrong when the README's loop was pasted into those scripts, and is checked here:
``zip(keep_loader, forget_loader)`` ran 1 step with one image to forget; the loss trained epsilon
targets for a v-prediction scheduler; a prepared one-image forget loader made every micro-batch a
sync step; one seed on every rank drew the same timesteps on both ranks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.readme import readme_harness as harness

pytestmark = pytest.mark.usefixtures("one_thread")


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


def test_the_readme_marks_the_blocks_this_file_runs():
    assert list(harness.readme_blocks()) == [
        "readme-recipe",
        "readme-setup",
        "readme-loop",
        "readme-weights",
        "readme-lora",
    ]


def test_unconditional_loop(accelerator):
    """``train_unconditional.py``, setup and loop blocks: v-prediction, bf16, accumulation 2."""
    ns, recorder = harness.unconditional_namespace(accelerator, prediction_type="v_prediction")
    harness.run_loop(ns, recorder, "readme-loop")

    steps = len(recorder.syncs)
    assert steps == len(ns["train_dataloader"]) == harness.KEEP_BATCHES, (
        f"the README loop ran {steps} of {harness.KEEP_BATCHES} keep batches"
    )
    assert recorder.syncs == harness.expected_syncs(harness.KEEP_BATCHES), (
        f"sync_gradients per micro-batch {recorder.syncs}: gradient accumulation is off"
    )
    assert recorder.changed() == recorder.syncs, "the weights moved on a step that did not sync"
    assert recorder.backward_calls == steps, "the loss did not go through accelerator.backward"
    loss_fn = ns["loss_fn"]
    assert loss_fn.prediction_type == "v_prediction", (
        f"the README's loss trains {loss_fn.prediction_type!r} targets for a v_prediction scheduler"
    )
    assert (loss_fn.n, loss_fn.k, loss_fn.snr_gamma) == (
        harness.KEEP_BATCHES * harness.BATCH + 1,
        1,
        None,
    )
    assert ns["draw"].noisy.dtype == torch.bfloat16  # bf16 x0 with an fp32 forget image
    final = harness.flat(recorder.params)
    assert torch.isfinite(final).all()
    assert not torch.equal(recorder.snapshots[0], final)

    # The per-row weights one-liner, on the last step's draw and output.
    harness.run_block("readme-weights", ns)
    from diffusers.training_utils import compute_snr

    from siss import SISSLoss
    from siss.adapters import loss_from_scheduler

    rows = loss_from_scheduler(
        SISSLoss,
        ns["noise_scheduler"],
        lam=0.5,
        superfactor=0.1,
        n=loss_fn.n,
        k=1,
        reduction="none",
    )(ns["model_output"], ns["draw"])
    expected = (rows * compute_snr(ns["noise_scheduler"], ns["draw"].timesteps)).mean()
    torch.testing.assert_close(ns["loss"], expected)


def test_text_to_image_lora_loop_with_balancer(accelerator):
    """``train_text_to_image_lora.py`` + the setup and LoRA blocks: NormBalancer, min-SNR-γ."""
    ns, recorder = harness.lora_namespace(accelerator)
    harness.run_loop(ns, recorder, "readme-lora")

    assert len(recorder.syncs) == harness.LORA_KEEP_BATCHES
    assert recorder.syncs == harness.expected_syncs(harness.LORA_KEEP_BATCHES)
    assert recorder.changed() == recorder.syncs, "the weights moved on a step that did not sync"
    assert recorder.balancer_steps == [True] * sum(recorder.syncs), (
        f"balancer.step() at sync_gradients {recorder.balancer_steps}: once per optimizer step"
    )
    assert recorder.backward_calls >= harness.LORA_KEEP_BATCHES, "not via accelerator.backward"
    loss_fn, balancer = ns["loss_fn"], ns["balancer"]
    assert ns["noise_scheduler"].config.prediction_type == "v_prediction"
    assert (loss_fn.prediction_type, loss_fn.snr_gamma) == ("v_prediction", 5.0)
    assert balancer.params == recorder.params  # the LoRA weights, not the spent `lora_layers`
    assert balancer.coefficient is not None and torch.isfinite(balancer.coefficient)
    assert all(torch.isfinite(p).all() for p in balancer.params)


def test_recipe_loop(accelerator):
    """The recipe's block in ``train_text_to_image_lora.py``: LoRA, bf16, accumulation 2."""
    ns, recorder = harness.lora_namespace(accelerator, harness.RECIPE_KEEP_BATCHES)
    harness.run_loop(ns, recorder, "readme-recipe")
    harness.check_recipe_loop(ns, recorder)


def test_two_processes():
    """The same blocks on 2 real processes: per-rank draws, and ranks kept in sync."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(Path(__file__).parent / "readme" / "two_ranks.py"),
    ]
    try:
        run = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"two_ranks.py timed out after 240 s:\n{error.stdout}\n{error.stderr}")
    output = f"--- stdout\n{run.stdout}\n--- stderr\n{run.stderr}"
    assert run.returncode == 0, output
    reports = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 1, output
    report = reports[0]
    assert report["num_processes"] == 2, output
    for loop in ("readme-loop", "readme-lora", "readme-recipe"):
        first = report[loop]["first_timesteps"]
        assert first[0] != first[1], f"{loop}: both ranks drew the first timesteps {first[0]}"
        assert report[loop]["params_equal_across_ranks"], f"{loop}: the ranks' weights differ"
        assert report[loop]["steps_per_rank"] == report[loop]["batches_per_rank"], output
