"""ReTrack: redirect the forget points' denoising trajectories to their nearest kept neighbours.

(Shi, Jin, Zhang and Gu, "ReTrack: Data Unlearning in Diffusion Models through Redirecting the
Denoising Trajectory", arXiv 2509.13007, 2025.) The model retrained on ``X \\ A`` minimises
``L_{X\\A}``, whose minimiser at a noisy point ``x_t`` is the posterior mean of the regression
target given ``x_t``, with the clean point drawn from ``X \\ A``:

    E[x_0 | x_t] = Σ_j w_j x_j,   w_j = softmax_j(-||x_t - γ_t x_j||² / (2 σ_t²)),   x_j ∈ X \\ A.

Naive deletion samples ``x_t`` around the kept points only, so it rarely visits the noisy points
near ``A``, where the pretrained model still denoises towards ``A``. ReTrack draws ``x_t`` around
the forget points instead (importance sampling: the same ``L_{X\\A}``, another proposal) and keeps
the dominant terms of that sum, the ``k`` nearest neighbours of the forget point in ``X \\ A``:
the forget rows regress on the posterior-mean target restricted to those neighbours, which
redirects their denoising trajectories to the neighbours; the keep rows carry the usual
fine-tuning loss on ``X \\ A``.

This module holds the two building blocks as functions (``nearest_neighbors``,
``neighbor_posterior``) and the loss (``ReTrackLoss``, registered as ``"retrack"``). What is ours
rather than the paper's is listed in ``ReTrackLoss``'s docstring and docs/methods.md.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from siss._checks import (
    append_dims,
    broadcast_forget,
    check_finite_values,
    check_floating,
    check_int,
    check_pair,
    work_dtype,
)
from siss.baselines import DenoisingDraw, _PairedLoss
from siss.losses import LossTerms, Reduction
from siss.schedule import NoiseSchedule, TimestepSpec
from siss.targets import PredictionType, prediction_target

DEFAULT_NEIGHBORS = 5
"""``ReTrackLoss``'s default ``num_neighbors`` (ours: the paper tunes ``k`` per data set)."""


def nearest_neighbors(points: Tensor, pool: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` nearest rows of ``pool`` to each row of ``points``, by Euclidean distance.

    Distances are taken over the flattened non-batch dimensions (``torch.cdist``, in float32, or
    float64 for float64 inputs); ties go to the lower index. Compute them once for the forget set
    and pass the result to ``ReTrackLoss.sample(..., neighbors=)``, or give the loss the pool.

    Args:
        points: the forget points ``a``, shape ``(B, ...)``.
        pool: the candidates, e.g. all of ``X \\ A``, shape ``(N, ...)`` with ``points``' trailing
            shape, on its device.
        k: how many neighbours, ``1 <= k <= N``.

    Returns:
        ``(neighbors, indices)``: ``neighbors[i, j] = pool[indices[i, j]]``, shapes ``(B, k, ...)``
        and ``(B, k)`` (int64), nearest first.

    Examples:
        >>> pool = torch.tensor([[0.0, 0.0], [1.0, 0.0], [5.0, 5.0]])
        >>> neighbors, indices = nearest_neighbors(torch.tensor([[0.9, 0.1]]), pool, 2)
        >>> indices.tolist(), neighbors.shape
        ([[1, 0]], torch.Size([1, 2, 2]))
    """
    check_floating(points, "points")
    check_floating(pool, "pool")
    if points.shape[1:] != pool.shape[1:]:
        raise ValueError(
            f"`pool` rows must have the shape of `points`' rows {tuple(points.shape[1:])}, got "
            f"{tuple(pool.shape[1:])}"
        )
    if pool.device != points.device:
        raise ValueError(f"`pool` must be on the device of `points` ({points.device})")
    k = check_int(k, "k", minimum=1)
    if k > pool.shape[0]:
        raise ValueError(f"`k` ({k}) must be at most the pool's size ({pool.shape[0]})")
    dtype = work_dtype(points, pool)
    distances = torch.cdist(
        points.flatten(1).to(dtype).unsqueeze(0), pool.flatten(1).to(dtype).unsqueeze(0)
    ).squeeze(0)
    indices = _nearest(distances, k)
    return pool[indices], indices


def _nearest(distances: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` smallest entries of each row of ``distances`` ``(B, N)``, stably."""
    return torch.sort(distances, dim=-1, stable=True).indices[:, :k]


def neighbor_posterior(
    a0: Tensor, noise: Tensor, gamma: Tensor, sigma: Tensor, neighbors: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The posterior over a forget point's neighbours at ``x_t = γ a + σ ε``, and its means.

    With ``d_j = (x_t - γ x_j) / σ = ε + (γ/σ)(a - x_j)``, the noise that takes neighbour ``x_j``
    to ``x_t`` (written without the cancellation of ``x_t - γ x_j`` at small ``σ``):

    * ``log w_j = log_softmax_j(-||d_j||² / 2)``: the posterior ``p(x_j | x_t)`` under a uniform
      prior over the neighbours, since ``log q(x_t | x_j) = -||x_t - γ x_j||²/(2σ²) + const``.
      Computed in log space in float32 (float64 for float64 inputs), so a far neighbour at a
      small ``σ`` gets weight 0, never an overflow;
    * ``clean = Σ_j w_j x_j``, the posterior mean of ``x_0``;
    * ``noise = Σ_j w_j d_j = ε + (γ/σ)(a - clean)``, the posterior mean of ``ε``.

    Every prediction target is affine in ``(x_0, ε)`` (``siss.targets``), so
    ``prediction_target(type, clean, noise, γ, σ)`` is the posterior-mean target ``Σ_j w_j
    target_j``, the minimiser of ``Σ_j w_j ||f - target_j||²``.

    Args:
        a0: forget points ``a``, shape ``(B, ...)``.
        noise: ``ε`` with ``x_t = γ a + σ ε``, shape ``(B, ...)``.
        gamma: ``γ_t`` per row, shape ``(B,)``.
        sigma: ``σ_t > 0`` per row, shape ``(B,)``.
        neighbors: the candidates ``x_j`` of each row, shape ``(B, k, ...)``.

    Returns:
        ``(weights, clean, noise)``: ``(B, k)``, ``(B, ...)``, ``(B, ...)``, in float32 (float64
        for float64 inputs), detached.

    Examples:
        >>> a0, noise = torch.zeros(1, 2), torch.zeros(1, 2)
        >>> neighbors = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]])  # symmetric about a
        >>> weights, clean, _ = neighbor_posterior(a0, noise, torch.ones(1), torch.ones(1),
        ...                                        neighbors)
        >>> weights.tolist(), clean.tolist()
        ([[0.5, 0.5]], [[0.0, 0.0]])
    """
    dtype = work_dtype(a0, noise, neighbors)
    a0, noise, neighbors = (t.detach().to(dtype) for t in (a0, noise, neighbors))
    ratio = append_dims(gamma.detach().to(dtype) / sigma.detach().to(dtype), neighbors.ndim)
    implied = noise.unsqueeze(1) + ratio * (a0.unsqueeze(1) - neighbors)  # d_j, (B, k, ...)
    log_weights = torch.log_softmax(-0.5 * implied.square().flatten(2).sum(-1), dim=1)
    weights = log_weights.exp()
    view = append_dims(weights, neighbors.ndim)
    clean = (view * neighbors).sum(1)
    mean_noise = (view * implied).sum(1)
    return weights, clean, mean_noise


@dataclass(frozen=True)
class ReTrackDraw(DenoisingDraw):
    """A ``DenoisingDraw`` of ``2B`` rows (keep rows, then forget rows) with ReTrack's targets.

    Attributes:
        neighbors: the neighbours each forget row is redirected to, shape ``(B, k, ...)``.
        neighbor_weights: their posterior weights at the forget row's ``x_t``, shape ``(B, k)``,
            summing to 1 (float32, or float64 for float64 inputs).
        redirect_clean: ``Σ_j w_j x_j``, shape ``(B, ...)``.
        redirect_noise: ``Σ_j w_j (x_t - γ x_j)/σ``, shape ``(B, ...)``.

    Examples:
        >>> alphas_cumprod = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)
        >>> loss_fn = ReTrackLoss(alphas_cumprod, num_neighbors=2)
        >>> draw = loss_fn.sample(torch.randn(3, 4), torch.randn(1, 4))
        >>> draw.noisy.shape, draw.neighbors.shape
        (torch.Size([6, 4]), torch.Size([3, 2, 4]))
        >>> torch.allclose(draw.neighbor_weights.sum(1), torch.ones(3))  # to float32 rounding
        True
    """

    neighbors: Tensor
    neighbor_weights: Tensor
    redirect_clean: Tensor
    redirect_noise: Tensor


class ReTrackLoss(_PairedLoss):
    """ReTrack (Shi et al., arXiv 2509.13007): redirect the forget points' trajectories to their
    ``k`` nearest neighbours in ``X \\ A``, plus the fine-tuning loss on ``X \\ A``.

    The draw holds ``2B`` rows, ``torch.cat([x_t, a_t])`` as the other two-pass baselines'
    (``siss.baselines``): keep row ``i`` is ``x_t = γ x + σ ε``, forget row ``B + i`` is
    ``a_t = γ a + σ ε`` (same ``t`` and ``ε``). With ``x_1..x_k`` the ``k`` nearest neighbours of
    ``a`` in ``X \\ A`` and ``w_j ∝ exp(-||a_t - γ x_j||²/(2σ²))`` (``neighbor_posterior``):

    * ``keep = l_x = mean((f(x_t) - target(x, ε))²)``, the naive-deletion loss (Eq. 2);
    * ``l_r = mean((f(a_t) - Σ_j w_j target(x_j, ε_j))²)`` with ``ε_j = (a_t - γ x_j)/σ``: the
      forget row regresses on the posterior-mean target of ``X \\ A`` restricted to the
      neighbours, which for ``k = |X \\ A|`` is exactly what the retrained model predicts at
      ``a_t`` (the minimiser of ``L_{X\\A}``);
    * ``forget = -l_r``, so ``loss = keep - s forget = l_x + s l_r`` (EraseDiff's convention:
      the forget term is what the update increases).

    ``Σ_j w_j ||f - target_j||² = ||f - Σ_j w_j target_j||² + (terms free of f)`` for weights
    summing to 1: the per-neighbour loss and the posterior-mean regression here have the same
    gradient; this form has the smaller value and variance.

    Where the neighbours come from, in this order: ``sample(..., neighbors=)`` (candidates per
    forget row, e.g. from ``nearest_neighbors``); the loss's ``retain`` set (all of ``X \\ A``,
    searched each call with ``torch.cdist``: ``B × N × D`` work); otherwise the keep batch ``x0``
    itself (an in-batch approximation: the ``k`` nearest of ``B`` random kept points, not of
    ``X \\ A``). From the candidates the ``num_neighbors`` nearest to ``a`` (Euclidean, over the
    flattened values) are kept, all of them when there are fewer.

    What is ours rather than the paper's (whose full text we could not consult; docs/methods.md):
    the weights are normalised over the ``k`` neighbours (self-normalised importance sampling per
    forget row), so the row's scale ``Σ_j q(a_t|x_j) / q(a_t|a)`` of an unnormalised importance
    weight is dropped; ``superfactor`` is the weight of the redirect term against the keep term
    (a ``L_redirect + λ L_{X\\A}`` form is ``s = 1/λ`` up to an overall scale); the neighbours
    are chosen in data space (pixels or latents). Restricting the sum to the nearest neighbours
    of ``a`` is accurate where ``σ_t`` is small against the gaps in ``X \\ A``; at large ``t``
    the posterior spreads over points that are not ``a``'s nearest, and the target is then
    ReTrack's approximation, not the retrained model's. At small ``σ_t`` the ε-target's norm
    grows as ``(γ/σ) ||a - Σ w_j x_j||``: those rows dominate the loss unless ``snr_gamma`` or a
    ``timesteps`` window tempers them.

    Args:
        alphas_cumprod: ``ᾱ_t``, shape ``(T,)``, or a ``NoiseSchedule``.
        superfactor: ``s >= 0``, the redirect term's weight (default 1; 0 is naive deletion).
        num_neighbors: ``k >= 1``, the neighbours per forget point (default
            ``DEFAULT_NEIGHBORS`` = 5, ours; the paper tunes ``k``).
        retain: optional candidates for every forget row, all of ``X \\ A`` or a subset, shape
            ``(N, ...)`` with the rows' shape; held as a non-persistent buffer (``.to(device)``
            moves it; ``set_retain`` replaces it).
        prediction_type: any of ``siss.targets.PREDICTION_TYPES``: each is affine in
            ``(x_0, ε)``, so the posterior-mean target exists for all of them, rectified flow's
            velocity ``ε - x_0`` included.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``(B,)``, one value per pair).
        snr_gamma: min-SNR-γ row weighting, as in ``SISSLoss``.

    Examples:
        >>> betas = torch.linspace(1e-4, 0.02, 1000)
        >>> retain = torch.randn(50, 3, 8, 8)  # X \\ A
        >>> loss_fn = ReTrackLoss(torch.cumprod(1 - betas, 0), num_neighbors=4, retain=retain)
        >>> x0, a0 = retain[:8], torch.randn(1, 3, 8, 8)
        >>> draw = loss_fn.sample(x0, a0, generator=torch.Generator().manual_seed(0))
        >>> draw.noisy.shape, draw.neighbors.shape  # torch.cat([x_t, a_t]); 4 neighbours a row
        (torch.Size([16, 3, 8, 8]), torch.Size([8, 4, 3, 8, 8]))
        >>> loss_fn(torch.zeros_like(draw.noisy), draw).shape
        torch.Size([])
    """

    method = "retrack"
    retain: Tensor | None

    def __init__(
        self,
        alphas_cumprod: Tensor | NoiseSchedule,
        superfactor: float = 1.0,
        num_neighbors: int = DEFAULT_NEIGHBORS,
        *,
        retain: Tensor | None = None,
        prediction_type: PredictionType = "epsilon",
        reduction: Reduction = "mean",
        snr_gamma: float | None = None,
    ) -> None:
        super().__init__(
            alphas_cumprod,
            superfactor=superfactor,
            prediction_type=prediction_type,
            reduction=reduction,
            snr_gamma=snr_gamma,
        )
        self.num_neighbors = check_int(num_neighbors, "num_neighbors", minimum=1)
        self.register_buffer("retain", None, persistent=False)
        if retain is not None:
            self.set_retain(retain)

    def set_retain(self, retain: Tensor | None) -> None:
        """Replace the candidate set (``(N, ...)``, finite; ``None``: the keep batch)."""
        if retain is not None:
            check_floating(retain, "retain")
            if retain.ndim < 2 or retain.shape[0] == 0:
                raise ValueError(
                    f"`retain` must have shape (N, ...) with N >= 1, got {tuple(retain.shape)}"
                )
            check_finite_values(retain, "retain")
            retain = retain.detach()
        self.retain = retain

    def extra_repr(self) -> str:
        size = None if self.retain is None else self.retain.shape[0]
        return f"num_neighbors={self.num_neighbors}, retain={size}, " + super().extra_repr()

    def sample(
        self,
        x0: Tensor,
        a0: Tensor,
        timesteps: TimestepSpec = None,
        generator: torch.Generator | None = None,
        neighbors: Tensor | None = None,
    ) -> ReTrackDraw:
        """Noise ``x0`` and ``a0`` into ``2B`` rows and find each forget row's redirect target.

        Args:
            x0: clean keep points from ``X \\ A``, shape ``(B, ...)``.
            a0: clean forget points, shape of ``x0`` or ``(1, ...)``.
            timesteps: as in ``SISSLoss.sample``.
            generator: source of all randomness of the draw (timesteps, then noise; the
                neighbours add none).
            neighbors: optional candidates per forget row, shape ``(B, P, ...)`` or
                ``(1, P, ...)`` (shared); the nearest ``num_neighbors`` are kept. ``None``: the
                loss's ``retain`` set, else the keep batch ``x0``.
        """
        a0 = broadcast_forget(x0, a0)
        check_pair(x0, a0)
        chosen = self._neighbors(x0, a0, neighbors)
        draw = self._draw(x0, a0, timesteps, generator)
        rows = slice(draw.num_keep, None)
        weights, clean, noise = neighbor_posterior(
            a0, draw.noise[rows], draw.gamma[rows], draw.sigma[rows], chosen
        )
        return ReTrackDraw(
            **{field.name: getattr(draw, field.name) for field in fields(DenoisingDraw)},
            neighbors=chosen,
            neighbor_weights=weights,
            redirect_clean=clean,
            redirect_noise=noise,
        )

    def _neighbors(self, x0: Tensor, a0: Tensor, neighbors: Tensor | None) -> Tensor:
        """The ``min(num_neighbors, P)`` nearest candidates of each forget row, ``(B, k, ...)``."""
        rows = a0.shape[0]
        if neighbors is None:
            pool = x0 if self.retain is None else self.retain
            name = "x0" if self.retain is None else "retain"
            if pool.shape[1:] != a0.shape[1:]:
                raise ValueError(
                    f"`{name}` rows must have the shape of `a0`'s rows {tuple(a0.shape[1:])}, got "
                    f"{tuple(pool.shape[1:])}"
                )
            if pool.device != a0.device:
                raise ValueError(
                    f"`{name}` is on {pool.device} but `a0` is on {a0.device}: move the loss "
                    "with `loss_fn.to(device)`"
                )
            chosen, _ = nearest_neighbors(a0, pool, min(self.num_neighbors, pool.shape[0]))
            return chosen
        check_floating(neighbors, "neighbors")
        if (
            neighbors.ndim != a0.ndim + 1
            or neighbors.shape[0] not in (1, rows)
            or neighbors.shape[1] == 0
            or neighbors.shape[2:] != a0.shape[1:]
        ):
            raise ValueError(
                f"`neighbors` must have shape ({rows}, P, {', '.join(map(str, a0.shape[1:]))}) "
                f"or (1, P, ...) with P >= 1, got {tuple(neighbors.shape)}"
            )
        if neighbors.device != a0.device:
            raise ValueError(f"`neighbors` must be on the device of `a0` ({a0.device})")
        check_finite_values(neighbors, "neighbors")
        neighbors = neighbors.detach().expand(rows, *neighbors.shape[1:])
        k = min(self.num_neighbors, neighbors.shape[1])
        if k == neighbors.shape[1]:
            return neighbors
        dtype = work_dtype(a0, neighbors)
        distances = torch.cdist(
            a0.flatten(1).to(dtype).unsqueeze(1), neighbors.flatten(2).to(dtype)
        )
        indices = _nearest(distances.squeeze(1), k)
        return neighbors[torch.arange(rows, device=a0.device).unsqueeze(1), indices]

    def terms(
        self, model_output: Tensor, draw: ReTrackDraw, weights: Tensor | None = None
    ) -> LossTerms:
        """``keep = l_x``, ``forget = -l_r``; model output ``(2B, ...)``, terms per pair."""
        if not isinstance(draw, ReTrackDraw):
            raise TypeError(
                "`draw` must come from ReTrackLoss.sample, got "
                f"{getattr(draw, 'method', type(draw).__name__)!r}"
            )
        draw, prediction = self._prediction(model_output, draw)
        keep = self._errors(prediction, draw, slice(None, draw.num_keep))
        rows = slice(draw.num_keep, None)
        dtype = prediction.dtype
        target = prediction_target(
            self.prediction_type,
            draw.redirect_clean.to(dtype),
            draw.redirect_noise.to(dtype),
            draw.gamma[rows],
            draw.sigma[rows],
        )
        redirect = (prediction[rows] - target).square().flatten(1).mean(1)
        return self._combine(keep, -redirect, draw, weights)
