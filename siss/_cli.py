"""What every command shares: a help formatter that states real defaults, and checks of the
flags every command takes (the device), raised as ``ValueError`` naming the flag before any
model is loaded."""

from __future__ import annotations

import argparse
from typing import Any

import torch

# The commands' flag for each UnlearningConfig field whose flag is not ``--field-name``.
RECIPE_FLAGS = {
    "max_train_steps": "--steps",
    "learning_rate": "--lr",
    "lr_scheduler": "--lr-schedule",
    "adam_weight_decay": "--weight-decay",
}


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``ArgumentDefaultsHelpFormatter`` that adds ``(default: X)`` only where it says something:
    not for ``None`` (a help text that resolves a default states it itself), flags without a
    value, or help that already names its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            action.default is None
            or action.default is argparse.SUPPRESS
            or action.nargs == 0
            or "default" in text
        ):
            return text
        return super()._get_help_string(action)


def resolve_device(value: str | None, flag: str = "--device") -> torch.device:
    """The ``torch.device`` of ``value`` (``None``: CUDA if available, else the CPU); a
    ``ValueError`` naming ``flag`` for a malformed device or one this machine does not have.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
        >>> resolve_device("tpu")
        Traceback (most recent call last):
        ...
        ValueError: --device tpu: not a torch device (e.g. cpu, cuda, cuda:1, mps)
    """
    if value is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise ValueError(
            f"{flag} {value}: not a torch device (e.g. cpu, cuda, cuda:1, mps)"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{flag} {value}: CUDA is not available on this machine; use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"{flag} {value}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{flag} {value}: MPS is not available on this machine; use cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{flag} {value}: this command runs on cpu, cuda or mps")
    return device


def add_keep_target_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, keep_target: str | None = None
) -> None:
    """``--keep-target``, ``--balance-mode``, ``--balance-every`` and ``--calibration-batches``:
    the recipe's flags beyond the paper's (``recipe_config`` resolves their defaults).
    ``keep_target``: the command's default (``None``: the method's, the teacher for SISS)."""
    default = "the teacher for --method siss" if keep_target is None else repr(keep_target)
    parser.add_argument(
        "--keep-target",
        choices=("teacher", "noise"),
        default=keep_target,
        help="SISS's keep term: 'teacher' matches the frozen model's prediction (a frozen copy; "
        "for a LoRA, its base model): the same expected gradient without the noise fine-tuning "
        "otherwise follows away from the model (siss.functional.teacher_siss_terms); 'noise' "
        "regresses on the drawn noise (the paper's Eq. 15, the only choice for the other "
        f"methods). Default: {default}",
    )
    parser.add_argument(
        "--balance-mode",
        choices=("fix", "clip", "absolute"),
        default=None,
        help="superfactor rule (siss.NormBalancer). Default: 'absolute' with the teacher keep "
        "target (the forget gradient at --ratio times the naive-deletion gradient's norm, "
        "measured over --calibration-batches steps at the start), 'fix' otherwise (--ratio times "
        "the keep gradient's norm, every step)",
    )
    parser.add_argument(
        "--balance-every",
        type=int,
        default=None,
        help="refresh the balancer's coefficient every this many steps (a second backward); "
        "in between one backward of keep - c * forget. Default: 10 for 'absolute' "
        "(siss.recipe.DEFAULT_BALANCE_EVERY), 1 otherwise",
    )
    parser.add_argument(
        "--calibration-batches",
        type=int,
        default=8,
        help="steps whose median naive-deletion gradient norm sets 'absolute' mode's scale",
    )


def recipe_config(args: argparse.Namespace, **fields: Any) -> Any:
    """The ``siss.UnlearningConfig`` of a command's recipe flags (``--method``, ``--lam``,
    ``--keep-target``, ``--superfactor``, ``--ratio``, ``--balance-mode``, ``--balance-every``,
    ``--calibration-batches``, ``--timesteps``, ``--lr``, ``--steps``, ``--max-grad-norm``,
    ``--seed``); ``fields`` set or override the others. A ``ValueError`` naming the flag of a
    bad value (``RECIPE_FLAGS``)."""
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
        "learning_rate": args.lr,
        "max_train_steps": getattr(args, "steps", None),
        "max_grad_norm": args.max_grad_norm,
        "seed": args.seed,
        **fields,
    }
    try:
        return UnlearningConfig(**values)
    except ValueError as error:
        field, _, message = str(error).removeprefix("UnlearningConfig.").partition(": ")
        flag = RECIPE_FLAGS.get(field, "--" + field.replace("_", "-"))
        raise ValueError(f"{flag}: {message}") from None
