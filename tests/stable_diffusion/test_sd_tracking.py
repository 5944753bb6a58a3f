"""``--checkpoints_total_limit`` and ``--report_to`` of the Stable Diffusion job, on the random
tiny pipeline (CPU): with a limit the newest N checkpoints are kept while the run goes on, through
a resume and once it has finished; ``--report_to tensorboard`` writes an event file with each
step's loss terms, learning rate and balancer statistics, each check's copies and the
verifications, and trains the same weights as a run without it (each prompt of a ``--prompts``
list its own tracker run); a bad value of either flag stops with exit code 2 naming it before
anything is written; what is logged of a check or a verification is only what it measured.
"""

from __future__ import annotations

import math

import pytest

from siss._cli import groups
from siss.stable_diffusion.files import Job, checkpoints
from siss.stable_diffusion.unlearn import Tracking, check_log, verification_log
from tests.stable_diffusion.sd_harness import (
    CHEAP,
    SMALL_RUN,
    lora_weights,
    reference_split,
    run,
)

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate")

# 4 steps, a check every 2 (2 fresh generations, the training prompt's non-copies watched, no
# keep prompts), no noise score: a run takes a few seconds.
CHEAPER = [
    "--until", "steps", "--verify_every", "2", "--stop_images", "2", "--noise_generations", "0",
    "--keep_prompts",
]  # fmt: skip


def reset_accelerate() -> None:
    """accelerate's process-wide state, which a module fixture's runs must not leave behind."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def copy_generation(source, target) -> None:
    """The generated images and latents of ``source`` into a new job folder ``target``."""
    for folder in ("images", "latents"):
        (target / folder).mkdir(parents=True)
        for file in (source / folder).iterdir():
            (target / folder / file.name).write_bytes(file.read_bytes())


@pytest.fixture(scope="module")
def generated(tiny_sd_folder, tmp_path_factory):
    """``(job flags, folder)``: the tiny pipeline's 16 images generated once for the module,
    split by distance to image 0."""
    folder = tmp_path_factory.mktemp("sd-tracking") / "generated"
    reset_accelerate()
    try:
        split = reference_split(tiny_sd_folder, folder)
    finally:
        reset_accelerate()
    argv = [
        "--pretrained_model_name_or_path", tiny_sd_folder, "--prompt", "a photo",
        *CHEAP, *SMALL_RUN, *split, *CHEAPER,
    ]  # fmt: skip
    return argv, folder


@pytest.fixture(scope="module")
def limited(generated, tmp_path_factory):
    """``(folder, checkpoints mid-run, metrics)`` of a run with a checkpoint every step and
    ``--checkpoints_total_limit 2``, stopped after 3 of 4 steps and resumed."""
    argv, source = generated
    out = tmp_path_factory.mktemp("sd-tracking") / "limited"
    copy_generation(source, out)
    limit = ["--output_dir", out, "--checkpointing_steps", "1", "--checkpoints_total_limit", "2"]
    reset_accelerate()
    try:
        assert run(*argv, *limit, "--stop_after", "3") == {"stopped": True}
        mid_run = [p.name for p in checkpoints(out)]
        reset_accelerate()
        metrics = run(*argv, *limit, "--resume_from_checkpoint", "latest")
    finally:
        reset_accelerate()
    return out, mid_run, metrics


def test_checkpoints_total_limit_keeps_the_newest_during_and_after_the_run(limited):
    """Checkpoints of steps 1, 2 and 3 were written; 2 are kept while the run goes on and once
    it has finished from the resume (no checkpoint of the last step: the weights are saved)."""
    out, mid_run, metrics = limited
    assert mid_run == ["step-000002", "step-000003"]
    assert metrics["stop"]["steps"] == 4 and (out / "metrics.json").is_file()
    assert [p.name for p in checkpoints(out)] == ["step-000002", "step-000003"]
    assert [e["step"] for e in metrics["history"] if e.get("check") is not None] == [2]


def test_a_finished_run_with_kept_checkpoints_is_not_run_again(limited, generated):
    """A rerun of the finished folder returns its metrics, trains nothing and keeps the kept
    checkpoints (with or without the limit: a rerun deletes nothing)."""
    argv, _ = generated
    out, _, metrics = limited
    before = {p.name: p.stat().st_mtime_ns for p in (out / "lora").iterdir()}
    again = run(*argv, "--output_dir", out, "--checkpointing_steps", "1")
    assert again["loss"] == metrics["loss"]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "lora").iterdir()} == before
    assert [p.name for p in checkpoints(out)] == ["step-000002", "step-000003"]


def test_report_to_tensorboard_logs_steps_checks_and_verifications(generated, limited, tmp_path):
    """--report_to tensorboard: an event file under --output_dir/logs/unlearn with each step's
    loss terms, learning rate and balancer coefficient, the check's copies at its step and the
    verifications before and after; the weights and losses are those of the run without a
    tracker (``limited``, interrupted and resumed), and without a limit no checkpoint is left."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    argv, source = generated
    out = tmp_path / "logged"
    copy_generation(source, out)
    # with a checkpoint every step: the tracker's ProjectConfiguration leaves save_state alone
    metrics = run(
        *argv, "--output_dir", out, "--report_to", "tensorboard", "--checkpointing_steps", "1"
    )
    events = list((out / "logs" / "unlearn").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0
    log = EventAccumulator(str(events[0])).Reload()
    tags = set(log.Tags()["scalars"])
    for tag in ("train/loss", "train/keep", "train/forget", "train/lr", "balancer/coefficient"):
        assert [e.step for e in log.Scalars(tag)] == [1, 2, 3, 4], tag
    # the step's loss: the mean of its 4 micro-batches' (one process)
    logged = [e.value for e in log.Scalars("train/loss")]
    per_step = [sum(metrics["loss"][i : i + 4]) / 4 for i in range(0, 16, 4)]
    assert logged == pytest.approx(per_step, rel=1e-5)
    assert [e.value for e in log.Scalars("train/lr")] == pytest.approx([1e-3] * 4)
    check = next(e for e in metrics["history"] if e.get("check") is not None)
    assert [(e.step, e.value) for e in log.Scalars("check/copies")] == [(2, check["copies"])]
    assert [(e.step, e.value) for e in log.Scalars("check/generated")] == [(2, 2.0)]
    assert [e.step for e in log.Scalars("verify/train_fraction")] == [0, 4]
    assert not any("noise_score" in tag for tag in tags)  # --noise_generations 0: not measured
    final, untracked = lora_weights(out), lora_weights(limited[0])
    assert all((final[k] == untracked[k]).all() for k in final)
    assert metrics["loss"] == limited[2]["loss"]
    assert not checkpoints(out)


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--checkpoints_total_limit", "0"], "--checkpoints_total_limit: must be >= 1, got 0"),
        (["--checkpoints_total_limit", "-3"], "--checkpoints_total_limit: must be >= 1, got -3"),
        (["--report_to", "nonsense"], "argument --report_to: invalid choice: 'nonsense'"),
    ],
)
def test_bad_values_exit_2_naming_the_flag_before_anything_is_written(
    tiny_sd_folder, tmp_path, capsys, flags, named
):
    out = tmp_path / "out"
    argv = ["--pretrained_model_name_or_path", tiny_sd_folder, "--prompt", "a",
            "--output_dir", out, *CHEAP, *flags]  # fmt: skip
    with pytest.raises(SystemExit) as stopped:
        run(*argv)
    assert stopped.value.code == 2
    assert named in capsys.readouterr().err
    assert not out.exists()


def test_a_tracker_that_is_not_installed_is_refused_naming_it(
    tiny_sd_folder, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(groups, "tracker_available", lambda name: False)
    out = tmp_path / "out"
    argv = ["--pretrained_model_name_or_path", tiny_sd_folder, "--prompt", "a",
            "--output_dir", out, "--report_to", "wandb"]  # fmt: skip
    with pytest.raises(SystemExit) as stopped:
        run(*argv)
    assert stopped.value.code == 2
    assert "--report_to wandb: the wandb package is not installed" in capsys.readouterr().err
    assert not out.exists()


def test_each_prompt_of_a_list_is_its_own_tracker_run(tmp_path):
    """``--prompts``: each job starts its own run (named as its subfolder) and finishes it, so
    the next job's steps do not go into the first one's; ``end_training`` ends the command."""
    from accelerate import Accelerator
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from siss._cli import tracker_options
    from siss.stable_diffusion import cli

    args = cli.parse_args(["--pretrained_model_name_or_path", "owner/model", "--prompts",
                           __file__, "--output_dir", str(tmp_path), "--report_to",
                           "tensorboard"])  # fmt: skip
    accelerator = Accelerator(cpu=True, **tracker_options(args, args.output_dir))
    for number, value in enumerate((1.0, 2.0)):
        job = Job(f"prompt {number}", f"prompt {number}", None, tmp_path / f"00{number}-p", {})
        tracking = Tracking(args, job, accelerator)
        tracking.log({"check/copies": value}, 2)
        tracking.close()
        assert accelerator.trackers == []
    accelerator.end_training()
    for number, value in enumerate((1.0, 2.0)):
        (events,) = (tmp_path / "logs" / f"00{number}-p").glob("events.out.tfevents.*")
        scalars = EventAccumulator(str(events)).Reload().Scalars("check/copies")
        assert [(e.step, e.value) for e in scalars] == [(2, value)]


def test_only_what_was_measured_is_logged():
    """A check: its counts, the worst finite drift, the prompts out of band; a drift without a
    spread (infinite) leaves the worst drift out. A verification: the counts and fractions, and
    of the noise score and quality only the numbers (a reason string is not one)."""
    check = {
        "copies": 1,
        "generated": 4,
        "keep": {"a": {"relative": 0.2}, "b": {"relative": 0.7}},
        "keep_outside": ["b"],
        "backed_off": 0.5,
    }
    assert check_log(check) == {
        "check/copies": 1.0,
        "check/generated": 4.0,
        "check/copy_fraction": 0.25,
        "check/keep_drift_max": 0.7,
        "check/keep_outside": 1.0,
        "check/forget_weight": 0.5,
    }
    check = {**check, "keep": {"a": {"relative": math.inf}}, "generated": 0, "copies": 0}
    del check["backed_off"]
    assert check_log(check) == {
        "check/copies": 0.0,
        "check/generated": 0.0,
        "check/keep_outside": 1.0,
    }
    entry = {
        "step": 0,
        "train": {
            "memorized": 3,
            "fraction": 0.75,
            "noise_score": "not measured: --noise_generations 0",
            "clip_iqa": 0.4,
            "quality": "ignored",
        },
        "wall_s": 1.0,
    }
    assert verification_log(entry) == {
        "verify/train_copies": 3.0,
        "verify/train_fraction": 0.75,
        "verify/train_clip_iqa": 0.4,
    }
    assert verification_log({}) == {}  # another process's (the main process logs)
