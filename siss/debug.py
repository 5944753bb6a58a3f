"""Debug switches: the checks of tensor *values* (non-finite inputs, ``sigma <= 0`` or a timestep
index out of range on an accelerator, a loss that overflowed float32).

They read tensors back to the host, so they are off by default; turn them on to find where a run
that produced NaN went wrong, globally (``set_validate_values(True)``), for a block (``with
set_validate_values(True):``) or from the start with ``SISS_VALIDATE_VALUES=1`` in the
environment. This module only re-exports them from ``siss._checks``, their home.

Examples:
    >>> from siss.debug import set_validate_values, validate_values_enabled
    >>> with set_validate_values(True):
    ...     validate_values_enabled()
    True
"""

from siss._checks import set_validate_values, validate_values_enabled

__all__ = ["set_validate_values", "validate_values_enabled"]
