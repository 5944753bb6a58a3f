"""The digits commands' flags: diffusers' names from the shared groups (siss._cli), every flag
with help stating its real default, and the old hyphenated spellings still understood."""

from __future__ import annotations

import argparse
import re

import pytest

from examples import audit_digits, pretrain, sequential, study, train_classifier, unlearn

PARSERS = {
    "unlearn": unlearn.build_parser,
    "sequential": sequential.build_parser,
    "study": study.build_parser,
    "pretrain": pretrain.build_parser,
    "train_classifier": train_classifier.build_parser,
    "audit_digits": audit_digits.build_parser,
}
# The shared groups' flags each command offers, under diffusers' names.
DIFFUSERS_FLAGS = {
    "unlearn": {
        "--pretrained_model_name_or_path", "--output_dir", "--max_train_steps",
        "--train_batch_size", "--learning_rate", "--lr_scheduler", "--lr_warmup_steps",
        "--max_grad_norm", "--seed", "--checkpointing_steps", "--checkpoints_total_limit",
        "--resume_from_checkpoint", "--report_to", "--logging_dir",
    },
    "sequential": {
        "--pretrained_model_name_or_path", "--output_dir", "--max_train_steps",
        "--train_batch_size", "--learning_rate", "--lr_scheduler", "--lr_warmup_steps",
        "--max_grad_norm", "--seed", "--resume_from_checkpoint",
    },
    "study": {"--pretrained_model_name_or_path", "--output_dir", "--train_batch_size"},
    "pretrain": {
        "--output_dir", "--max_train_steps", "--train_batch_size", "--learning_rate",
        "--lr_warmup_steps", "--seed", "--resolution",
    },
    "train_classifier": {
        "--output_dir", "--num_train_epochs", "--train_batch_size", "--learning_rate", "--seed",
    },
    "audit_digits": {"--output_dir", "--seed", "--resolution"},
}  # fmt: skip


def shown(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The actions ``--help`` lists (not ``-h`` itself, not the hidden old spellings)."""
    return [
        action
        for action in parser._actions
        if action.help is not argparse.SUPPRESS and action.dest != "help"
    ]


@pytest.mark.parametrize("command", PARSERS)
def test_every_flag_has_help_that_states_its_real_default(command, capsys):
    parser = PARSERS[command]()
    for action in shown(parser):
        name = action.option_strings[0]
        assert action.help and action.help.strip(), f"{name} has no help"
        if action.default is None and action.nargs != 0:  # None: the text must say what it is
            assert "default" in action.help.lower(), f"{name}: default None, not explained"
    text = parser.format_help()
    assert "(default: None)" not in text
    assert not re.findall(r"--\w+-[\w-]+", parser.format_usage()), "a hyphenated flag is shown"
    offered = {action.option_strings[0] for action in shown(parser)}
    assert DIFFUSERS_FLAGS[command] <= offered
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == text


@pytest.mark.parametrize(
    "command, old, new",
    [
        ("unlearn", ["--steps", "7"], {"max_train_steps": 7}),
        ("unlearn", ["--batch-size", "3"], {"train_batch_size": 3}),
        ("unlearn", ["--lr", "1e-4", "--lr-schedule", "constant"], {"learning_rate": 1e-4}),
        ("unlearn", ["--checkpoint-every", "5", "--resume"], {"checkpointing_steps": 5}),
        ("unlearn", ["--keep-target", "noise", "--eval-samples", "9"], {"eval_samples": 9}),
        ("sequential", ["--steps-per-request", "4", "--resume"], {"max_train_steps": 4}),
        ("pretrain", ["--warmup-steps", "3", "--size", "8"], {"lr_warmup_steps": 3}),
        ("train_classifier", ["--epochs", "2", "--batch-size", "5"], {"num_train_epochs": 2}),
        ("audit_digits", ["--out", "x", "--size", "8"], {"resolution": 8}),
        ("study", ["--batch-size", "32", "--no-progress"], {"train_batch_size": 32}),
    ],
)
def test_old_spellings_are_understood_until_0_3_0(command, old, new, capsys):
    args = PARSERS[command]().parse_args(old)
    assert {key: getattr(args, key) for key in new} == new
    err = capsys.readouterr().err
    spellings = [token for token in old if token.startswith("--")]
    assert err.count("is the old spelling of") == len(spellings)
    for spelling in spellings:
        assert f"warning: {spelling} is the old spelling of --" in err
    if "--resume" in old:
        assert args.resume_from_checkpoint == "latest"
