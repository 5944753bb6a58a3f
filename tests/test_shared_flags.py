"""siss._cli: the parser the commands share (help with real defaults, flags checked right after
parsing, old spellings accepted for one release) and its flag groups."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from siss._cli import (
    CommandParser,
    add_checkpoint_flags,
    add_model_flag,
    add_training_flags,
    flag,
    recipe_config,
)


def parser_with(*adders) -> CommandParser:
    parser = CommandParser(prog="cmd")
    for add in adders:
        add(parser)
    return parser


def help_of(parser: CommandParser) -> str:
    return " ".join(parser.format_help().split())


def test_help_states_each_real_default_once():
    parser = CommandParser(prog="cmd")
    flag(parser, "--plain", type=int, default=3, help="a count")
    flag(parser, "--stated", type=int, default=None, help="a count. Default: the data's size")
    flag(parser, "--own", type=int, default=7, help="a count (default 7, the paper's)")
    flag(parser, "--listed", type=int, nargs="+", default=[0, 1, 2], help="seeds")
    flag(parser, "--empty", action="append", default=[], help="options")
    flag(parser, "--mentioned", default="cosine", help="per request (unlearn.py's default)")
    flag(parser, "--where", type=Path, default=Path.cwd() / "assets" / "x", help="a folder")
    text = help_of(parser)
    assert "a count (default: 3)" in text
    assert "(default: None)" not in text and "Default: the data's size" in text
    assert "(default 7, the paper's)" in text and "(default: 7)" not in text
    assert "seeds (default: 0 1 2)" in text
    assert "options (default" not in text
    assert "(unlearn.py's default) (default: cosine)" in text  # a mention is not a statement
    assert "a folder (default: assets/x)" in text


def test_old_spellings_are_hidden_understood_and_warned_about(capsys):
    parser = CommandParser(prog="cmd")
    flag(parser, "--max_train_steps", old=("--steps",), type=int, default=1, help="steps")
    flag(parser, "--resume_from_checkpoint", old=(("--resume", "latest"),), help="resume")
    flag(parser, "--no_progress", action="store_true", help="quiet")
    args = parser.parse_args(["--steps", "7", "--resume", "--no-progress"])
    assert (args.max_train_steps, args.resume_from_checkpoint, args.no_progress) == (
        7,
        "latest",
        True,
    )
    err = capsys.readouterr().err
    for old, new in (
        ("--steps", "--max_train_steps"),
        ("--resume", "--resume_from_checkpoint"),
        ("--no-progress", "--no_progress"),
    ):
        assert f"cmd: warning: {old} is the old spelling of {new}, accepted until 0.3.0" in err
    text = help_of(parser)
    assert "--steps" not in text and "--no-progress" not in text and "--resume " not in text
    assert parser.parse_args([]).max_train_steps == 1  # the hidden ones set no default
    with pytest.raises(TypeError, match="every flag has a help text"):
        flag(parser, "--undocumented", type=int)


@pytest.mark.parametrize(
    "bounds, value, message",
    [
        ({"at_least": 1}, "0", "--x: must be >= 1, got 0"),
        ({"above": 0}, "0", "--x: must be > 0, got 0.0"),
        ({"at_least": 0, "below": 1}, "1", "--x: must be in [0, 1), got 1.0"),
        ({"above": 0.5, "at_most": 1}, "0.5", "--x: must be in (0.5, 1], got 0.5"),
        ({"above": 0}, "inf", "--x: must be > 0, got inf"),
    ],
)
def test_bounded_flags_name_the_flag_and_the_value(bounds, value, message, capsys):
    parser = CommandParser(prog="cmd")
    kind = int if "at_least" in bounds and len(bounds) == 1 else float
    flag(parser, "--x", type=kind, default=None, help="x. Default: none", **bounds)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--x", value])
    assert exit_info.value.code == 2
    assert f"cmd: error: {message}" in capsys.readouterr().err


def test_a_namespace_built_in_code_is_held_to_the_same_rules():
    """``CommandParser.check``: ranges, choices and the groups' checks, as ``ValueError``."""
    parser = parser_with(
        lambda p: add_training_flags(
            p, max_train_steps=10, lr_scheduler=("cosine", ("cosine", "constant")), seed=0
        )
    )
    args = parser.defaults()
    assert vars(args) == {"max_train_steps": 10, "lr_scheduler": "cosine", "seed": 0}
    parser.check(args)
    with pytest.raises(ValueError, match="--max_train_steps: must be >= 1, got 0"):
        parser.check(argparse.Namespace(**{**vars(args), "max_train_steps": 0}))
    with pytest.raises(ValueError, match="--lr_scheduler: 'linear' is not one of cosine, const"):
        parser.check(argparse.Namespace(**{**vars(args), "lr_scheduler": "linear"}))
    with pytest.raises(ValueError, match="--seed: must be a number >= 0, got '3'"):
        parser.check(argparse.Namespace(**{**vars(args), "seed": "3"}))


def test_a_resume_path_is_found_as_given_or_under_the_output_folder(tmp_path, capsys):
    parser = parser_with(add_checkpoint_flags)
    flag(parser, "--output_dir", type=Path, default=None, help="out. Default: none")
    folder = tmp_path / "run" / "checkpoints" / "step-0000002"
    folder.mkdir(parents=True)
    args = parser.parse_args(["--resume_from_checkpoint", str(folder)])
    assert args.resume_from_checkpoint == folder
    by_name = ["--output_dir", str(tmp_path / "run"), "--resume_from_checkpoint", "step-0000002"]
    assert parser.parse_args(by_name).resume_from_checkpoint == folder
    assert parser.parse_args(["--resume_from_checkpoint", "latest"]).resume_from_checkpoint == (
        "latest"
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["--resume_from_checkpoint", "step-0000004"])
    assert "--resume_from_checkpoint step-0000004: no such checkpoint folder" in (
        capsys.readouterr().err
    )


def test_a_model_folder_or_a_hub_id(tmp_path, capsys):
    local = parser_with(lambda p: add_model_flag(p, default=None, help="model. Default: none"))
    hub = parser_with(lambda p: add_model_flag(p, default=None, help="m. Default: none", hub=True))
    assert local.parse_args(["--pretrained_model_name_or_path", str(tmp_path)])
    assert hub.parse_args(["--pretrained_model_name_or_path", "org/name"])
    for parser, value in ((local, "org/name"), (hub, str(tmp_path / "missing"))):
        with pytest.raises(SystemExit):
            parser.parse_args(["--pretrained_model_name_or_path", value])
        assert f"--pretrained_model_name_or_path {value}: no such folder" in (
            capsys.readouterr().err
        )


def test_recipe_config_names_the_flag_in_either_spelling():
    """Commands on the new names get ``--learning_rate``; one still on ``--lr`` (a namespace
    with ``lr``, ``steps``) gets its own flag named."""
    common = {
        "method": "siss",
        "lam": 0.5,
        "keep_target": "noise",
        "superfactor": None,
        "ratio": 0.1,
        "balance_mode": None,
        "balance_every": None,
        "calibration_batches": 8,
        "timesteps": [3, 9],
        "max_grad_norm": 1.0,
        "seed": 0,
    }
    new = argparse.Namespace(**common, learning_rate=1e-4, max_train_steps=5)
    config = recipe_config(new)
    assert (config.learning_rate, config.max_train_steps, config.timesteps) == (1e-4, 5, (3, 9))
    with pytest.raises(ValueError, match=r"^--learning_rate: must be in"):
        recipe_config(argparse.Namespace(**{**vars(new), "learning_rate": 0.0}))
    old = argparse.Namespace(**common, lr=0.0, steps=5)
    with pytest.raises(ValueError, match=r"^--lr: must be in"):
        recipe_config(old)
    with pytest.raises(ValueError, match=r"^--max-grad-norm: must be in"):
        recipe_config(argparse.Namespace(**{**vars(old), "lr": 1e-4, "max_grad_norm": -1.0}))


def test_the_training_group_offers_what_it_is_given(capsys):
    """The flags the SD job and a user's script take (accumulation, precision, checkpointing,
    LoRA rank) with their checks; a flag left at None is not offered."""
    parser = parser_with(
        lambda p: add_training_flags(
            p,
            gradient_accumulation_steps=1,
            mixed_precision="no",
            gradient_checkpointing=True,
            rank=4,
        )
    )
    args = parser.parse_args(["--gradient_checkpointing", "--mixed_precision", "bf16"])
    assert vars(args) == {
        "gradient_accumulation_steps": 1,
        "mixed_precision": "bf16",
        "gradient_checkpointing": True,
        "rank": 4,
    }
    for flags, said in (
        (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps: must be >= 1"),
        (["--rank", "0"], "--rank: must be >= 1, got 0"),
        (["--mixed_precision", "fp8"], "invalid choice: 'fp8'"),
        (["--max_train_steps", "3"], "unrecognized arguments: --max_train_steps 3"),
    ):
        with pytest.raises(SystemExit):
            parser.parse_args(flags)
        assert said in capsys.readouterr().err
