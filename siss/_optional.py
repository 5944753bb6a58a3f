"""Optional dependencies: which extra of ``siss-unlearn`` installs each, and the error naming it.

The core needs torch and numpy only; everything else is imported where it is used, inside
``with needs(...)``, so that a missing package says what to install instead of raising a bare
``ModuleNotFoundError``. The extras are declared in ``pyproject.toml``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

# import name -> (distribution, extra that brings it)
PACKAGES: dict[str, tuple[str, str]] = {
    "diffusers": ("diffusers", "diffusers"),
    "accelerate": ("accelerate", "diffusers"),
    "peft": ("peft", "diffusers"),
    "safetensors": ("safetensors", "diffusers"),
    "transformers": ("transformers", "diffusers"),
    "PIL": ("Pillow", "diffusers"),
    "torchmetrics": ("torchmetrics", "metrics"),
    "scipy": ("scipy", "metrics"),
    "torchdiffeq": ("torchdiffeq", "metrics"),
    "tqdm": ("tqdm", "metrics"),
    "sklearn": ("scikit-learn", "audit"),
    "matplotlib": ("matplotlib", "audit"),
}


@contextmanager
def needs(feature: str) -> Iterator[None]:
    """Imports of optional packages for ``feature``: a missing one raises a
    ``ModuleNotFoundError`` naming the package and the extra that installs it.

    Args:
        feature: what needs the package, for the message (``"siss.metrics.nll"``).

    Examples:
        >>> with needs("the audit figure"):
        ...     from matplotlib.figure import Figure  # installed: nothing to say
        >>> Figure.__name__
        'Figure'

    Without matplotlib the block raises ``ModuleNotFoundError: the audit figure needs
    matplotlib, which is not installed: pip install "siss-unlearn[audit]"``
    (``tests/test_optional.py`` hides each package in turn).
    """
    try:
        yield
    except ModuleNotFoundError as err:
        top = (err.name or "").partition(".")[0]
        if top not in PACKAGES:
            raise
        distribution, extra = PACKAGES[top]
        raise ModuleNotFoundError(
            f"{feature} needs {distribution}, which is not installed: "
            f'pip install "siss-unlearn[{extra}]"',
            name=err.name,
        ) from err
