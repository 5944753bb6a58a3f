"""Argument checks of the metrics.

The generic checks (``check_int``, ``check_real``, ``check_choice``, ``check_tensor``,
``nonfinite_rows``) live in ``siss._checks``, the one home of the package's argument checks, and
are re-exported here for the metric modules; what stays here is specific to measuring.

Every check raises at the public call that received the bad value and names the argument in
backticks, so the user reads what to fix instead of an error from inside torch, scipy or
torchdiffeq. Metrics are evaluated off the training hot path, so these checks may read tensor
values (finiteness), which synchronises with an accelerator.
"""

from __future__ import annotations

import torch

from siss._checks import check_choice, check_int, check_real, check_tensor, nonfinite_rows

__all__ = [
    "check_choice",
    "check_finite_rows",
    "check_int",
    "check_real",
    "check_tensor",
    "nonfinite_rows",
]


def check_finite_rows(tensor: torch.Tensor, name: str, what: str = "rows") -> None:
    """Raises ``ValueError`` naming ``name`` with the count of non-finite rows, if any."""
    bad = nonfinite_rows(tensor)
    count = int(bad.sum())
    if count:
        first = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"`{name}` has {count} of {tensor.shape[0]} {what} with NaN or inf values "
            f"(first at index {first}); a diverged model or a bad input cannot be measured"
        )
