"""The building blocks of the SISS loss as plain functions: the defensive-mixture sampler, the
importance weights, the per-sample SISS terms, the prediction targets and the gradient-norm scale
of the superfactor rule.

``SISSLoss`` and the other losses of the top level (``siss.SISSLoss``) are built from these; import
them from here to assemble a loss of your own (Eqs. 6, 8–10, 15 of the paper). This module only
re-exports: each object lives in its home module (``siss.weights``, ``siss.sampler``,
``siss.losses``, ``siss.targets``, ``siss.balancer``), whose name the API reference shows. Like the
top level, it depends on torch only.

Examples:
    >>> import torch
    >>> from siss.functional import importance_weights, mixture_sample
    >>> x0, a0 = torch.zeros(3, 4), torch.ones(3, 4)
    >>> gamma, sigma = torch.ones(3), torch.ones(3)
    >>> g = torch.Generator().manual_seed(0)
    >>> noisy, _ = mixture_sample(x0, a0, gamma, sigma, 0.5, g)
    >>> w_x, w_a = importance_weights(noisy, x0, a0, gamma, sigma, 0.5)
    >>> torch.allclose(0.5 * w_x + 0.5 * w_a, torch.ones(3))
    True
"""

from siss.balancer import median_gradient_norm
from siss.losses import siss_terms, teacher_siss_terms
from siss.sampler import mixture_sample
from siss.targets import PREDICTION_TYPES, prediction_target
from siss.weights import DEFAULT_MAX_WEIGHT, importance_weights, log_density_ratio

__all__ = [
    "DEFAULT_MAX_WEIGHT",
    "PREDICTION_TYPES",
    "importance_weights",
    "log_density_ratio",
    "median_gradient_norm",
    "mixture_sample",
    "prediction_target",
    "siss_terms",
    "teacher_siss_terms",
]
