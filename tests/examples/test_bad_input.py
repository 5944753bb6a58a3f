"""Bad input to every digits command, through the shared flag groups (issue 21, section 5).

Each case is what a new user types: a flag's out-of-range value, a device this machine lacks, a
folder that is not there, a resume path that does not exist. Every one must end in argparse's
error (exit code 2) naming the flag and the value, before any model or data is loaded and
before anything is written: the output folder is not made, nothing appears under the test's
folder. The commands run in-process through their ``main`` (loading a model or the digits
fails the test); two of them also run as real processes, for the exit code the shell sees.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DModel

from examples import audit_digits, pretrain, sequential, study, train_classifier, unlearn
from siss._cli import groups
from siss._digits import data as digits

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = {
    "unlearn": unlearn.main,
    "sequential": sequential.main,
    "study": study.main,
    "pretrain": pretrain.main,
    "train_classifier": train_classifier.main,
    "audit_digits": audit_digits.main,
}
NO_CUDA = not torch.cuda.is_available()

# (command, flags, what the error must say). ``{missing}``: a path that does not exist.
CASES = [
    # the training group, wherever it is offered
    *[
        (command, ["--max_train_steps", value], [f"--max_train_steps: must be >= 1, got {value}"])
        for command in ("unlearn", "sequential", "pretrain")
        for value in ("-5", "0")
    ],
    *[
        (command, ["--train_batch_size", "0"], ["--train_batch_size: must be >= 1, got 0"])
        for command in ("unlearn", "sequential", "pretrain", "train_classifier", "study")
    ],
    *[
        (command, ["--learning_rate", value], [f"--learning_rate: must be > 0, got {value}"])
        for command in ("unlearn", "sequential", "pretrain", "train_classifier")
        for value in ("0.0", "-0.0001")
    ],
    *[
        (command, ["--lr_warmup_steps", "-1"], ["--lr_warmup_steps: must be >= 0, got -1"])
        for command in ("unlearn", "sequential", "pretrain")
    ],
    *[
        (command, ["--max_grad_norm", "-1"], ["--max_grad_norm: must be >= 0, got -1.0"])
        for command in ("unlearn", "sequential")
    ],
    *[
        (command, ["--seed", "-1"], ["--seed: must be >= 0, got -1"])
        for command in ("unlearn", "sequential", "pretrain", "train_classifier", "audit_digits")
    ],
    ("study", ["--seeds", "0", "-1"], ["--seeds: must be >= 0, got -1"]),
    ("unlearn", ["--lr_scheduler", "cosin"], ["--lr_scheduler", "'cosin'"]),
    # the recipe (siss.UnlearningConfig's checks, named by flag)
    *[
        (command, ["--lam", value], [f"--lam: must be in [0, 1], got {value}"])
        for command in ("unlearn", "sequential")
        for value in ("1.5", "-0.1")
    ],
    ("unlearn", ["--balance_every", "0"], ["--balance_every: must be >= 1, got 0"]),
    ("unlearn", ["--calibration_batches", "0"], ["--calibration_batches: must be >= 1, got 0"]),
    ("unlearn", ["--ema_decay", "1"], ["--ema_decay: must be in [0, 1), got 1.0"]),
    ("unlearn", ["--method", "naive", "--keep_target", "teacher"], ["--keep_target: 'teacher'"]),
    ("unlearn", ["--timesteps", "1", "2", "3"], ["--timesteps 1 2 3: takes one value"]),
    ("unlearn", ["--nll_tolerance", "nan"], ["--nll_tolerance: must be > 0, got nan"]),
    ("sequential", ["--shapes", "6"], ["--shapes: must be in [1, 5], got 6"]),
    ("sequential", ["--band_level", "1"], ["--band_level: must be in (0.5, 1), got 1.0"]),
    # evaluation
    *[
        (command, ["--eval_samples", "0"], ["--eval_samples: must be >= 1, got 0"])
        for command in ("unlearn", "sequential", "study")
    ],
    ("pretrain", ["--eval_samples", "-1"], ["--eval_samples: must be >= 0, got -1"]),
    *[
        (command, ["--eval_steps", "0"], ["--eval_steps: must be >= 1, got 0"])
        for command in ("unlearn", "sequential", "study", "pretrain")
    ],
    ("study", ["--final_samples", "-1"], ["--final_samples: must be >= 0, got -1"]),
    # checkpoints and resume
    ("unlearn", ["--checkpoints_total_limit", "0"], ["--checkpoints_total_limit: must be >= 1"]),
    ("unlearn", ["--checkpointing_steps", "0"], ["--checkpointing_steps: must be >= 1, got 0"]),
    (
        "unlearn",
        ["--resume_from_checkpoint", "{missing}"],
        ["--resume_from_checkpoint {missing}: no such checkpoint folder"],
    ),
    (
        "sequential",
        ["--resume_from_checkpoint", "{missing}"],
        ["--resume_from_checkpoint {missing}: this command resumes its --output_dir"],
    ),
    # models and data that are not there: named as missing
    *[
        (
            command,
            ["--pretrained_model_name_or_path", "{missing}"],
            ["--pretrained_model_name_or_path {missing}: no such folder"],
        )
        for command in ("unlearn", "sequential", "study")
    ],
    ("study", ["--retrain", "{missing}"], ["--retrain {missing}: no such folder"]),
    (
        "audit_digits",
        ["--membership_model", "{missing}"],
        ["--membership_model {missing}: no such folder"],
    ),
    ("unlearn", ["--data", "folder", "--data_root", "{missing}"], ["--data_root {missing}"]),
    ("pretrain", ["--outlier_image", "{missing}"], ["--outlier_image {missing}: no such file"]),
    # devices: one this machine lacks is named as such, not a traceback
    *[
        (command, ["--device", "tpu"], ["--device tpu: not a torch device"])
        for command in ("unlearn", "sequential")
    ],
    *[
        pytest.param(
            command,
            ["--device", "cuda"],
            ["--device cuda: CUDA is not available on this machine"],
            marks=pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA"),
        )
        for command in ("unlearn", "sequential")
    ],
    # the rest of each command's own flags
    *[(command, ["--threads", "0"], ["--threads: must be >= 1, got 0"]) for command in COMMANDS],
    ("pretrain", ["--resolution", "2"], ["--resolution: must be >= 4, got 2"]),
    ("pretrain", ["--resolution", "18"], ["--resolution 18: must be a multiple of 4"]),
    ("pretrain", ["--flow_shift", "0"], ["--flow_shift: must be > 0, got 0.0"]),
    ("train_classifier", ["--num_train_epochs", "0"], ["--num_train_epochs: must be >= 1"]),
    ("train_classifier", ["--test_fraction", "1"], ["--test_fraction: must be in (0, 1), got 1"]),
    ("audit_digits", ["--count", "0"], ["--count: must be >= 1, got 0"]),
    ("audit_digits", ["--membership_count", "1"], ["--membership_count: must be in [2, 898]"]),
    *[
        (command, ["--no_such_flag", "3"], ["unrecognized arguments: --no_such_flag 3"])
        for command in COMMANDS
    ],
]


@pytest.fixture
def nothing_loads(monkeypatch):
    """Loading a model or the digits fails the test: validation comes first."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model or data set was loaded before the flags were checked")

    monkeypatch.setattr(UNet2DModel, "from_pretrained", refuse)
    monkeypatch.setattr(digits, "_sklearn_digits", refuse)


def refused(command: str, flags: list[str], tmp_path: Path, capsys) -> str:
    """Runs ``command`` with ``flags`` and its output folder under ``tmp_path``; asserts exit
    code 2 and that nothing was written under ``tmp_path``; returns the error text."""
    out = tmp_path / "out"
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as exit_info:
        COMMANDS[command]([*flags, "--output_dir", str(out)])
    assert exit_info.value.code == 2, exit_info.value.code
    assert not out.exists()
    assert sorted(tmp_path.rglob("*")) == before  # nothing written anywhere
    return capsys.readouterr().err


def _id(case) -> str:
    values = case.values if hasattr(case, "values") else case
    return f"{values[0]} {' '.join(values[1])}".replace("{missing}", "MISSING")


@pytest.mark.usefixtures("nothing_loads")
@pytest.mark.parametrize("command, flags, said", CASES, ids=[_id(case) for case in CASES])
def test_a_bad_flag_is_named_with_its_value_and_nothing_is_written(
    command, flags, said, tmp_path, capsys
):
    missing = str(tmp_path / "missing")
    flags = [flag.format(missing=missing) for flag in flags]
    err = refused(command, flags, tmp_path, capsys)
    for text in said:
        assert text.format(missing=missing) in err, err
    assert "Traceback" not in err


@pytest.mark.usefixtures("nothing_loads")
def test_a_tracker_whose_package_is_missing_is_named(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(groups, "tracker_available", lambda name: False)
    err = refused("unlearn", ["--report_to", "tensorboard"], tmp_path, capsys)
    assert "--report_to tensorboard: the tensorboard package is not installed" in err


@pytest.mark.usefixtures("nothing_loads")
def test_an_output_folder_that_is_a_file_is_refused(tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("a file")
    for command in ("unlearn", "pretrain", "train_classifier", "audit_digits"):
        with pytest.raises(SystemExit) as exit_info:
            COMMANDS[command](["--output_dir", str(taken)])
        assert exit_info.value.code == 2
        assert f"--output_dir {taken}: is a file, not a folder" in capsys.readouterr().err
    assert taken.read_text() == "a file"


def test_the_shell_sees_exit_code_2(tmp_path):
    """A real process, with an old spelling: understood (with a warning), its value checked."""
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "-m", "examples.unlearn", "--steps", "-5", "--output_dir", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert run.returncode == 2, run.stderr
    assert "--steps is the old spelling of --max_train_steps" in run.stderr
    assert "error: --max_train_steps: must be >= 1, got -5" in run.stderr
    assert "Traceback" not in run.stderr
    assert not out.exists()
