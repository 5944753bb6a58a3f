"""What every command shares: a help formatter that states real defaults, and checks of the
flags every command takes (the device), raised as ``ValueError`` naming the flag before any
model is loaded."""

from __future__ import annotations

import argparse

import torch


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
