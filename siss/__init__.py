"""siss: data unlearning for diffusion models with Subtracted Importance Sampled Scores.

The top level holds what a training loop needs: the losses (``SISSLoss`` and the baselines),
``NoiseSchedule``, ``NormBalancer``, ``make_loss`` and the method table, the recipe
(``Unlearner``, ``UnlearningConfig``, ``teacher_for``) and the result types. The rest lives in
namespaces of its own:

* ``siss.functional``: the building blocks of the losses (``importance_weights``,
  ``mixture_sample``, ``siss_terms``, ``prediction_target``, ``median_gradient_norm``, ...);
* ``siss.loop``: training-loop helpers (``paired_batches``, ``rank_generator``, ``BatchPlan``,
  ``derived_seed``);
* ``siss.debug``: the switch of the value checks (``set_validate_values``).

The core (this package's top level and those three) depends on torch only; ``siss.adapters``
brings diffusers in and ``siss.metrics`` holds the evaluation metrics.

Examples:
    >>> import siss
    >>> from siss.functional import importance_weights
    >>> from siss.loop import paired_batches
    >>> from siss.debug import set_validate_values
    >>> "SISSLoss" in siss.__all__, "importance_weights" in siss.__all__
    (True, False)
"""

import importlib as _importlib
import sys as _sys
import warnings as _warnings

from siss import _distribution

# The namespaces, loaded with the top level so that ``siss.functional.siss_terms`` works after
# ``import siss`` alone.
from siss import debug as debug
from siss import functional as functional
from siss import loop as loop
from siss.balancer import BalanceStats, NormBalancer
from siss.baselines import (
    DenoisingDraw,
    EraseDiffLoss,
    NaiveDeletionLoss,
    NegGradLoss,
    SISSNoISLoss,
)
from siss.losses import LossTerms, SISSDraw, SISSLoss, UnlearningLoss
from siss.recipe import StepResult, Unlearner, UnlearningConfig, teacher_for
from siss.registry import METHODS, RULES, MethodRules, make_loss
from siss.retrack import ReTrackDraw, ReTrackLoss
from siss.schedule import NoiseSchedule

__version__ = "0.2.0.dev0"  # the one place the version is set (pyproject reads it)

__all__ = [
    "METHODS",
    "RULES",
    "BalanceStats",
    "DenoisingDraw",
    "EraseDiffLoss",
    "LossTerms",
    "MethodRules",
    "NaiveDeletionLoss",
    "NegGradLoss",
    "NoiseSchedule",
    "NormBalancer",
    "ReTrackDraw",
    "ReTrackLoss",
    "SISSDraw",
    "SISSLoss",
    "SISSNoISLoss",
    "StepResult",
    "Unlearner",
    "UnlearningConfig",
    "UnlearningLoss",
    "make_loss",
    "teacher_for",
]

# Names that left the top level in 0.2.0, and their new home. They stay importable from ``siss``
# (``siss.paired_batches``, ``from siss import paired_batches``) with a DeprecationWarning until
# _REMOVED_IN, through the module ``__getattr__`` below (PEP 562); ``dir(siss)`` does not list them.
_REMOVED_IN = "0.3.0"
_MOVED: dict[str, str] = {
    "DEFAULT_MAX_WEIGHT": "siss.functional",
    "PREDICTION_TYPES": "siss.functional",
    "importance_weights": "siss.functional",
    "log_density_ratio": "siss.functional",
    "median_gradient_norm": "siss.functional",
    "mixture_sample": "siss.functional",
    "prediction_target": "siss.functional",
    "siss_terms": "siss.functional",
    "teacher_siss_terms": "siss.functional",
    "BatchPlan": "siss.loop",
    "derived_seed": "siss.loop",
    "paired_batches": "siss.loop",
    "rank_generator": "siss.loop",
    "set_validate_values": "siss.debug",
    "validate_values_enabled": "siss.debug",
}


def __getattr__(name: str) -> object:
    """A name that moved out of the top level: warn once per access, naming the new import."""
    home = _MOVED.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module(home), name)
    # ``from siss import name`` looks the name up twice: ``hasattr`` in importlib's
    # ``_handle_fromlist``, then the import itself. Warn on the second only (at the user's line).
    caller = _sys._getframe(1).f_code
    if not (caller.co_name == "_handle_fromlist" and "importlib" in caller.co_filename):
        _warnings.warn(
            f"siss.{name} is deprecated and will be removed in {_REMOVED_IN}: "
            f"use `from {home} import {name}`",
            DeprecationWarning,
            stacklevel=2,
        )
    return value


_distribution.warn_if_clashing()
