"""Regression targets per prediction type: the one place where ``prediction_type`` is read.

A model that saw ``x_t = gamma * clean + sigma * noise`` regresses on

===================  ===================================  ===================================
prediction type      target                               used by
===================  ===================================  ===================================
``epsilon``          ``noise``                            DDPM, Stable Diffusion 1.x, SDXL
``v_prediction``     ``gamma * noise - sigma * clean``    SD 2.x 768
``sample``           ``clean``                            x0-prediction models
``flow_prediction``  ``noise - clean``                    rectified flow (SD3, Flux)
===================  ===================================  ===================================

In SISS one noisy point is scored against *two* clean points (Eq. 5): the keep term regresses on
the target for ``x`` and the forget term on the target for ``a``, each with the noise that point
implies, ``(m - gamma c) / sigma``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from siss._checks import append_dims

PredictionType = Literal["epsilon", "v_prediction", "sample", "flow_prediction"]
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction", "sample", "flow_prediction")
"""The ``prediction_type`` values every loss takes: diffusers' names, and ``"flow_prediction"``
for the velocity ``noise - clean`` of rectified flow.

Examples:
    >>> "v_prediction" in PREDICTION_TYPES, "flow_prediction" in PREDICTION_TYPES
    (True, True)
"""


def prediction_target(
    prediction_type: PredictionType, clean: Tensor, noise: Tensor, gamma: Tensor, sigma: Tensor
) -> Tensor:
    """The model's regression target for ``x_t = gamma * clean + sigma * noise``.

    Args:
        prediction_type: one of ``PREDICTION_TYPES``.
        clean: the clean point the target refers to, shape ``(B, ...)``.
        noise: the noise that takes ``clean`` to ``x_t``, shape of ``clean``.
        gamma: per-row schedule value ``γ_t``, shape ``(B,)``.
        sigma: per-row schedule value ``σ_t``, shape ``(B,)``.

    Returns:
        Shape of ``clean``, in the dtype of ``noise``.

    Examples:
        >>> clean, noise = torch.ones(2, 3), torch.zeros(2, 3)
        >>> gamma, sigma = torch.full((2,), 0.6), torch.full((2,), 0.8)
        >>> prediction_target("v_prediction", clean, noise, gamma, sigma)[0]  # γ noise - σ clean
        tensor([-0.8000, -0.8000, -0.8000])
        >>> prediction_target("flow_prediction", clean, noise, gamma, sigma)[0]  # noise - clean
        tensor([-1., -1., -1.])
    """
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return clean.to(noise.dtype)
    if prediction_type == "flow_prediction":
        return noise - clean
    if prediction_type == "v_prediction":
        g, s = (append_dims(v.to(noise.dtype), noise.ndim) for v in (gamma, sigma))
        return torch.addcmul(g * noise, s, clean.to(noise.dtype), value=-1)
    raise ValueError(
        f"`prediction_type` must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}"
    )
