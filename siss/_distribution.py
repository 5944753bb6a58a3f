"""The name ``siss`` on PyPI belongs to an unrelated program; this library is ``siss-unlearn``.

The registry's ``siss`` ("a command-line utility for applying artistic effects to videos")
installs a top-level import package ``siss/`` too. Installed side by side with ``siss-unlearn``,
the two write into the same folder and overwrite each other's files, so ``import siss`` may load
a mix of both. That cannot be prevented from here (the import name is fixed by the design); it
can be detected from the installed metadata, and ``import siss`` says so.
"""

from __future__ import annotations

import importlib.metadata
import warnings
from collections.abc import Sequence

DISTRIBUTION = "siss-unlearn"
CLASHING = "siss"


def _is_ours(distribution: importlib.metadata.Distribution) -> bool:
    """An install of this library under its former distribution name (``siss`` 0.1/0.2.dev)."""
    summary = distribution.metadata.get("Summary") or ""
    return "unlearning for diffusion models" in summary.lower()


def clashing_distributions(
    path: Sequence[str] | None = None,
) -> list[importlib.metadata.Distribution]:
    """Installed distributions named ``siss`` that are not this library.

    Args:
        path: the folders searched (``sys.path`` when ``None``).
    """
    kwargs = {} if path is None else {"path": list(path)}
    found = importlib.metadata.distributions(name=CLASHING, **kwargs)
    return [d for d in found if not _is_ours(d)]


def warn_if_clashing(path: Sequence[str] | None = None) -> None:
    """A ``RuntimeWarning`` per unrelated ``siss`` distribution installed beside this one."""
    for distribution in clashing_distributions(path):
        summary = distribution.metadata.get("Summary") or "no summary"
        warnings.warn(
            f"an unrelated distribution named 'siss' ({distribution.version}: {summary}) is "
            "installed in this environment and writes the same import package `siss`, so the "
            "two overwrite each other's files. Remove both and reinstall this library: "
            f"`pip uninstall -y siss {DISTRIBUTION} && pip install {DISTRIBUTION}`",
            RuntimeWarning,
            stacklevel=3,
        )
