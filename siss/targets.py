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


def _promote(prediction: Tensor, noisy: Tensor, gamma: Tensor, sigma: Tensor):
    dtype = torch.float64 if torch.float64 in (prediction.dtype, noisy.dtype) else torch.float32
    g = append_dims(torch.as_tensor(gamma).to(dtype), noisy.ndim)
    s = append_dims(torch.as_tensor(sigma).to(dtype), noisy.ndim)
    return prediction.to(dtype), noisy.to(dtype), g, s


def eps_from_prediction(
    prediction: Tensor, noisy: Tensor, gamma: Tensor, sigma: Tensor, prediction_type: str
) -> Tensor:
    """The noise prediction implied by a model output, for ``x_t = gamma x_0 + sigma eps``.

    With the targets of ``siss.targets`` (``v = gamma eps - sigma x_0``; flow velocity
    ``u = eps - x_0``), solving ``x_t = gamma x_0 + sigma eps`` for ``eps``:

    * ``epsilon``: ``eps = prediction``;
    * ``v_prediction``: ``eps = (sigma x_t + gamma v) / (gamma^2 + sigma^2)``
      (``sigma x_t + gamma v`` on a variance-preserving schedule);
    * ``sample``: ``eps = (x_t - gamma x_0) / sigma``;
    * ``flow_prediction``: ``eps = (x_t + gamma u) / (gamma + sigma)`` (``x_t + (1 - s) u`` on
      rectified flow, ``gamma = 1 - s``, ``sigma = s``).

    Args:
        prediction, noisy: ``(B, ...)``.
        gamma, sigma: ``(B,)``, or already broadcastable to ``noisy`` (``(B, 1, ..., 1)``, 0-dim).
        prediction_type: one of ``siss.functional.PREDICTION_TYPES``.

    Returns:
        ``(B, ...)`` in float32 (float64 if an input is float64).

    Examples:
        >>> x0, eps = torch.randn(2, 3), torch.randn(2, 3)
        >>> g, s = torch.tensor([0.6, 0.8]), torch.tensor([0.8, 0.6])
        >>> x_t = g[:, None] * x0 + s[:, None] * eps
        >>> v = g[:, None] * eps - s[:, None] * x0
        >>> torch.allclose(eps_from_prediction(v, x_t, g, s, "v_prediction"), eps, atol=1e-6)
        True
    """
    pred, x, g, s = _promote(prediction, noisy, gamma, sigma)
    if prediction_type == "epsilon":
        return pred
    if prediction_type == "v_prediction":
        return (s * x + g * pred) / (g * g + s * s)
    if prediction_type == "sample":
        return (x - g * pred) / s
    if prediction_type == "flow_prediction":
        return (x + g * pred) / (g + s)
    raise ValueError(
        f"`prediction_type` must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}"
    )


def x0_from_prediction(
    prediction: Tensor, noisy: Tensor, gamma: Tensor, sigma: Tensor, prediction_type: str
) -> Tensor:
    """The clean-sample estimate implied by a model output (the inverse relations of
    ``eps_from_prediction``), for ``x_t = gamma x_0 + sigma eps``."""
    pred, x, g, s = _promote(prediction, noisy, gamma, sigma)
    if prediction_type == "epsilon":
        return (x - s * pred) / g
    if prediction_type == "v_prediction":
        return (g * x - s * pred) / (g * g + s * s)
    if prediction_type == "sample":
        return pred
    if prediction_type == "flow_prediction":
        return (x - s * pred) / (g + s)
    raise ValueError(
        f"`prediction_type` must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}"
    )


def eps_error_scale(prediction_type: str, gamma: Tensor, sigma: Tensor) -> Tensor:
    """``(d eps / d prediction)^2`` per row: a squared error against the ``prediction_type``'s
    target times this is the squared error of the implied noise (``eps_from_prediction`` is
    affine in the prediction), e.g. to compare a loss's ``l_a`` with a denoising error.

    * ``epsilon``: 1; ``v_prediction``: ``(gamma / (gamma^2 + sigma^2))^2``;
      ``sample``: ``(gamma / sigma)^2``; ``flow_prediction``: ``(gamma / (gamma + sigma))^2``.

    Args:
        gamma, sigma: ``(B,)`` (or any matching shape), the schedule at each row.

    Examples:
        >>> eps_error_scale("sample", torch.tensor([0.6]), torch.tensor([0.8]))
        tensor([0.5625])
    """
    g, s = gamma.double(), sigma.double()
    if prediction_type == "epsilon":
        scale = torch.ones_like(g)
    elif prediction_type == "v_prediction":
        scale = (g / (g * g + s * s)).square()
    elif prediction_type == "sample":
        scale = (g / s).square()
    elif prediction_type == "flow_prediction":
        scale = (g / (g + s)).square()
    else:
        raise ValueError(
            f"`prediction_type` must be one of {', '.join(PREDICTION_TYPES)}, got "
            f"{prediction_type!r}"
        )
    return scale.to(torch.promote_types(gamma.dtype, torch.float32))
