"""Evaluation metrics for data unlearning: likelihood, generation rate and sample quality.

Nothing here imports diffusers: every metric takes plain tensors and callables.

- ``bits_per_dim`` / ``log_likelihood`` (VP, DDPM) and ``flow_bits_per_dim`` /
  ``flow_log_likelihood`` (rectified flow): exact NLL through the probability-flow ODE, one
  integrator for both.
- ``generation_rate``: how often samples reproduce a target image, with a binomial CI.
- ``is_score``, ``fid_score`` (and the tensor-level ``inception_score``,
  ``frechet_distance``): quality under an injectable feature extractor.
- ``DigitClassifier``: the small CNN used as that extractor for the digits example.
- ``CLIPQuality``: CLIP-IQA and CLIP score of generated images (torchmetrics, a local CLIP).
"""

from siss.metrics.classifier import ClassifierOutput, DigitClassifier
from siss.metrics.clip import CLIPQuality
from siss.metrics.nll import (
    VPSchedule,
    bits_per_dim,
    flow_bits_per_dim,
    flow_log_likelihood,
    log_likelihood,
)
from siss.metrics.quality import (
    ScoreEstimate,
    extract,
    fid_score,
    frechet_distance,
    frechet_distance_from_statistics,
    gaussian_statistics,
    inception_score,
    is_score,
)
from siss.metrics.rate import (
    RateEstimate,
    default_threshold,
    generation_rate,
    l2_distances,
    proportion_ci,
)

__all__ = [
    "CLIPQuality",
    "ClassifierOutput",
    "DigitClassifier",
    "RateEstimate",
    "ScoreEstimate",
    "VPSchedule",
    "bits_per_dim",
    "default_threshold",
    "extract",
    "fid_score",
    "flow_bits_per_dim",
    "flow_log_likelihood",
    "frechet_distance",
    "frechet_distance_from_statistics",
    "gaussian_statistics",
    "generation_rate",
    "inception_score",
    "is_score",
    "l2_distances",
    "log_likelihood",
    "proportion_ci",
]
