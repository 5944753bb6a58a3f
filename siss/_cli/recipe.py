"""The recipe's flags (``siss.UnlearningConfig``) and the config they make."""

from __future__ import annotations

import argparse
from typing import Any

from siss._cli.parser import flag
from siss.stopping import STOP_RULES

# The flag of each UnlearningConfig field, where it is not ``--<field>`` (diffusers' style).
RECIPE_FLAGS: dict[str, str] = {}
# The same for a command whose flags still have their old names (``--lr``, ``--steps``, with
# hyphens): one without ``args.learning_rate``.
_OLD_RECIPE_FLAGS = {
    "max_train_steps": "--steps",
    "learning_rate": "--lr",
    "lr_scheduler": "--lr-schedule",
    "adam_weight_decay": "--weight-decay",
}


def add_keep_target_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, keep_target: str | None = None
) -> None:
    """``--keep_target``, ``--balance_mode``, ``--balance_every`` and ``--calibration_batches``:
    the recipe's flags beyond the paper's (``recipe_config`` checks them and resolves their
    defaults). ``keep_target``: the command's default (``None``: the method's, the teacher for
    SISS). The hyphenated spellings stay accepted until ``siss._cli.parser.REMOVED_IN``."""
    default = "the teacher for --method siss" if keep_target is None else repr(keep_target)
    flag(
        parser,
        "--keep_target",
        choices=("teacher", "noise"),
        default=keep_target,
        help="SISS's keep term: 'teacher' matches the frozen model's prediction (a frozen copy; "
        "for a LoRA, its base model): Lemma 1's expected gradient where the teacher is stationary "
        "for the loss, without the keep term's regression on the drawn noise (NegGrad's noise "
        "remains; siss.functional.teacher_siss_terms); refused at --lam 0 or 1; 'noise' "
        "regresses on the drawn noise (the paper's Eq. 15, the only choice for the other "
        f"methods). Default: {default}",
    )
    flag(
        parser,
        "--balance_mode",
        choices=("fix", "clip", "absolute"),
        default=None,
        help="superfactor rule (siss.NormBalancer). Default: 'absolute' with the teacher keep "
        "target (the forget gradient at --ratio times the naive-deletion gradient's norm, "
        "measured over --calibration_batches steps at the start), 'fix' otherwise (--ratio times "
        "the keep gradient's norm, every step)",
    )
    flag(
        parser,
        "--balance_every",
        type=int,
        default=None,
        help="refresh the balancer's coefficient every this many steps (a second backward); "
        "in between one backward of keep - c * forget. Default: 10 for 'absolute' "
        "(siss.recipe.DEFAULT_BALANCE_EVERY), 1 otherwise",
    )
    flag(
        parser,
        "--calibration_batches",
        type=int,
        default=8,
        help="steps whose median naive-deletion gradient norm sets 'absolute' mode's scale",
    )


def add_method_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, keep_target: str | None = None
) -> None:
    """``--method``, ``--lam``, ``--superfactor``, ``--ratio`` and the keep-target flags
    (``add_keep_target_flags``, with the command's ``keep_target`` default)."""
    from siss.registry import RULES

    flag(parser, "--method", choices=tuple(RULES), default="siss", help="unlearning method")
    flag(parser, "--lam", type=float, default=0.5, help="SISS mixture weight λ, in [0, 1]")
    flag(
        parser,
        "--forget_timesteps",
        type=int,
        nargs=2,
        metavar=("LOW", "HIGH"),
        default=None,
        help="--method siss: the forget term only on this inclusive window of timesteps (grid "
        "indices), the keep term on all: the time-restricted variant (arXiv 2510.17917). "
        "Default: every timestep",
    )
    flag(
        parser,
        "--num_neighbors",
        type=int,
        default=None,
        help="--method retrack: the kept neighbours each forget point's trajectory is "
        "redirected to (siss.ReTrackLoss; the paper's k). Default: 5 for retrack; refused "
        "for the other methods",
    )
    flag(
        parser,
        "--superfactor",
        type=float,
        default=None,
        help="fixed superfactor s (disables the balancer). Default: balance with --ratio",
    )
    flag(
        parser,
        "--ratio",
        type=float,
        default=0.1,
        help="norm of the forget gradient as a fraction of the keep (naive-deletion) gradient's "
        "(§5): per step in 'fix' mode, of its norm measured at the start in 'absolute' mode",
    )
    add_keep_target_flags(parser, keep_target)


def _value(args: argparse.Namespace, new: str, old: str) -> Any:
    return getattr(args, new) if hasattr(args, new) else getattr(args, old, None)


def recipe_config(args: argparse.Namespace, **fields: Any) -> Any:
    """The ``siss.UnlearningConfig`` of a command's recipe flags (``--method``, ``--lam``,
    ``--keep_target``, ``--superfactor``, ``--ratio``, ``--balance_mode``, ``--balance_every``,
    ``--calibration_batches``, ``--timesteps``, ``--learning_rate``, ``--max_train_steps``,
    ``--max_grad_norm``, ``--seed``, and ``--snr_gamma`` where the command has it; a namespace
    with the old ``lr``/``steps`` reads those);
    ``fields`` set or override the others. A ``ValueError`` naming the flag of a bad value."""
    from siss.recipe import UnlearningConfig

    timesteps = args.timesteps or None
    if timesteps is not None:
        timesteps = timesteps[0] if len(timesteps) == 1 else tuple(timesteps)
    values = {
        "method": args.method,
        "lam": args.lam,
        "keep_target": args.keep_target,
        "superfactor": args.superfactor,
        "ratio": args.ratio,
        "balance_mode": args.balance_mode,
        "balance_every": args.balance_every,
        "calibration_batches": args.calibration_batches,
        "timesteps": timesteps,
        "learning_rate": _value(args, "learning_rate", "lr"),
        "max_train_steps": _value(args, "max_train_steps", "steps"),
        "max_grad_norm": args.max_grad_norm,
        "seed": args.seed,
        "num_neighbors": getattr(args, "num_neighbors", None),
        "forget_timesteps": getattr(args, "forget_timesteps", None),
        "snr_gamma": getattr(args, "snr_gamma", None),
        **fields,
    }
    if values["max_train_steps"] is None:
        del values["max_train_steps"]
    try:
        return UnlearningConfig(**values)
    except ValueError as error:
        field, _, message = str(error).removeprefix("UnlearningConfig.").partition(": ")
        if hasattr(args, "learning_rate"):
            name = RECIPE_FLAGS.get(field, "--" + field)
        else:  # a command that still has the old names
            name = _OLD_RECIPE_FLAGS.get(field, "--" + field.replace("_", "-"))
        raise ValueError(f"{name}: {message}") from None


def resolve_stop_rule(args: argparse.Namespace) -> str | None:
    """What is wrong with ``--stop_rule per_level|level|anneal|track`` here (``None``: nothing):
    they act with ``--until nonmember`` only, on SISS's forget term, which other methods lack.
    With ``level`` or ``track``, an unset ``--balance_every`` becomes ``--max_train_steps`` (the
    coefficient is measured once: a refresh would scale the pull-back's gradient, small near the
    level, up)."""
    if args.stop_rule == "mean":
        return None
    if args.until != "nonmember":
        return (
            f"--stop_rule {args.stop_rule} acts with --until nonmember only, not --until "
            f"{args.until}"
        )
    if args.method != "siss":
        return (
            f"--stop_rule {args.stop_rule} acts on SISS's forget term per noise level: it needs "
            f"--method siss, not {args.method}"
        )
    if args.stop_rule in ("level", "track") and args.balance_every is None:
        args.balance_every = args.max_train_steps
    return None


def add_nonmember_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    *,
    references: int,
    references_help: str,
    every: int | None = 10,
) -> None:
    """``--stop_target``, ``--stop_references`` and (``every`` not ``None``) ``--stop_every``:
    the settings of ``--until nonmember`` (``siss.stopping.NonmemberStop``)."""
    flag(
        parser,
        "--stop_target",
        type=float,
        default=0.5,
        above=0.0,
        below=1.0,
        help="--until nonmember stops once the forget images' mean denoising-error percentile "
        "among the stop references reaches this (0.5: the non-members' median, where a "
        "retrained model puts them on average; siss.stopping.NonmemberStop)",
    )
    flag(
        parser,
        "--stop_rule",
        choices=STOP_RULES,
        default="mean",
        help="mean: stop once the mean over the noise levels reaches --stop_target; per_level: "
        "turn the forget term off at each noise level that has reached it (on again if it "
        "falls back) and stop once every level has; level: no early stop, but drive the forget "
        "images' error at each noise level to the stop references' median (measured at every "
        "check) and pull it back past it, with the forget coefficient measured once "
        "(--balance_every defaults to --max_train_steps); anneal: no early stop, but the forget "
        "term off for good once the mean reaches --stop_target, the keep term alone (naive "
        "deletion with the teacher target) to the last step; track: no early stop, but the "
        "forget term weighed at each noise level by how long that level has been below or past "
        "--stop_target, reversed where it stays past, so that every level settles there "
        "(--balance_every defaults to --max_train_steps; siss.stopping.NonmemberStop)",
    )
    flag(
        parser,
        "--stop_references",
        type=int,
        default=references,
        at_least=2,
        help=references_help,
    )
    if every is not None:
        flag(
            parser,
            "--stop_every",
            type=int,
            default=every,
            at_least=1,
            help="--until nonmember measures the percentile every this many optimizer steps "
            "(a forward pass over the forget images and the stop references, 4 noise levels "
            "and a few noise draws each, without gradient)",
        )
