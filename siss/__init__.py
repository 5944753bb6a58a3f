"""siss: data unlearning for diffusion models with Subtracted Importance Sampled Scores.

The core (this package's top level) depends on torch only; ``siss.adapters`` brings diffusers in
and ``siss.metrics`` holds the evaluation metrics.
"""

from siss._checks import set_validate_values, validate_values_enabled
from siss.balancer import BalanceStats, NormBalancer, median_gradient_norm
from siss.baselines import (
    DenoisingDraw,
    EraseDiffLoss,
    NaiveDeletionLoss,
    NegGradLoss,
    SISSNoISLoss,
)
from siss.loop import BatchPlan, derived_seed, paired_batches, rank_generator
from siss.losses import (
    LossTerms,
    SISSDraw,
    SISSLoss,
    UnlearningLoss,
    siss_terms,
    teacher_siss_terms,
)
from siss.recipe import StepResult, Unlearner, UnlearningConfig, teacher_for
from siss.registry import METHODS, RULES, MethodRules, make_loss
from siss.sampler import mixture_sample
from siss.schedule import NoiseSchedule
from siss.targets import PREDICTION_TYPES, prediction_target
from siss.weights import DEFAULT_MAX_WEIGHT, importance_weights, log_density_ratio

__version__ = "0.2.0.dev0"  # the one place the version is set (pyproject reads it)

__all__ = [
    "DEFAULT_MAX_WEIGHT",
    "METHODS",
    "PREDICTION_TYPES",
    "RULES",
    "BalanceStats",
    "BatchPlan",
    "DenoisingDraw",
    "EraseDiffLoss",
    "LossTerms",
    "MethodRules",
    "NaiveDeletionLoss",
    "NegGradLoss",
    "NoiseSchedule",
    "NormBalancer",
    "SISSDraw",
    "SISSLoss",
    "SISSNoISLoss",
    "StepResult",
    "Unlearner",
    "UnlearningConfig",
    "UnlearningLoss",
    "derived_seed",
    "importance_weights",
    "log_density_ratio",
    "make_loss",
    "median_gradient_norm",
    "mixture_sample",
    "paired_batches",
    "prediction_target",
    "rank_generator",
    "set_validate_values",
    "siss_terms",
    "teacher_for",
    "teacher_siss_terms",
    "validate_values_enabled",
]
