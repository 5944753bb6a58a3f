"""Importance weights of the SISS loss (Eqs. 5, 8–10), in log space and float32.

With ``r = log q(m|x) - log q(m|a)`` the weights are

    w_x = q(m|x) / ((1-λ) q(m|x) + λ q(m|a)) = 1 / ((1-λ) + λ e^{-r})
    w_a = q(m|a) / ((1-λ) q(m|x) + λ q(m|a)) = 1 / ((1-λ) e^{r} + λ)

so ``(1-λ) w_x + λ w_a = 1`` and ``0 <= w_x <= 1/(1-λ)``, ``0 <= w_a <= 1/λ`` (Eqs. 9–10).

Two numerical traps of the authors' research code are avoided here (see REFERENCE-NOTES):
``r`` is not the difference of two squared distances, each a sum over every pixel of the image and
huge below t≈800 (their difference loses ~1e-2 absolute in float32), but one inner product,

    r = gamma <x - a, 2m - gamma (x + a)> / (2 sigma^2),

and the weights are formed with ``logaddexp``, never ``exp(r)``: ``r`` reaches thousands at
3x256x256 and overflows any float.

Each row is first divided by a power of two that brings its values into ``[-2, 2]`` (exact, so the
result is unchanged) and ``r`` is scaled back at the end: finite inputs of any size then give
either a finite ``r`` or ``±inf`` (whose weights, ``0`` and the bound, are the exact limits),
never ``inf - inf = NaN`` from products that overflow one by one.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor

from siss._checks import (
    check_batch,
    check_max_weight,
    check_pair,
    check_positive_values,
    check_probability,
    check_rows,
    work_dtype,
)


def _no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast disabled, where the device type has autocast at all (not "meta")."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


DEFAULT_MAX_WEIGHT = 1e4
"""Cap on the one weight that is unbounded at ``λ = 0`` (``w_a``) or ``λ = 1`` (``w_x``).

Examples:
    >>> x0, a0 = torch.zeros(1, 4), torch.full((1, 4), 10.0)
    >>> # λ = 0, a noisy point right at a: w_a = e^{-r} = e^{200}, capped
    >>> w_x, w_a = importance_weights(a0, x0, a0, torch.ones(1), torch.ones(1), lam=0.0)
    >>> w_x.item(), round(w_a.item()) == DEFAULT_MAX_WEIGHT
    (1.0, True)
"""


def log_density_ratio(
    noisy: Tensor, x0: Tensor, a0: Tensor, gamma: Tensor, sigma: Tensor
) -> Tensor:
    """``r = log q(m|x) - log q(m|a)`` per row for ``q(m|c) = N(gamma c, sigma^2 I)``.

    Args:
        noisy: the noisy points ``m``, shape ``(B, ...)``.
        x0: keep points ``x``, shape of ``noisy``.
        a0: forget points ``a``, shape of ``noisy``.
        gamma: per-row schedule value ``γ_t``, shape ``(B,)``.
        sigma: per-row schedule value ``σ_t > 0``, shape ``(B,)``.

    Returns:
        ``(B,)``, float32 (float64 for float64 inputs), detached; autocast is disabled inside.

    Examples:
        >>> x0, a0 = torch.zeros(2, 4), torch.ones(2, 4)
        >>> # m = x: r = ||γ(x - a)||² / 2σ² = 4 / 2
        >>> log_density_ratio(x0, x0, a0, torch.ones(2), torch.ones(2))
        tensor([2., 2.])
    """
    dtype = work_dtype(noisy, x0, a0)
    with torch.no_grad(), _no_autocast(noisy.device.type):
        m, x, a = (t.to(dtype).flatten(1) for t in (noisy, x0, a0))
        g = gamma.to(dtype)
        largest = torch.stack([t.abs().amax(1) for t in (m, x, a)]).amax(0)
        # 2^(e-1) <= largest < 2^e: values land in [-2, 2) and 2^(e-1) is representable.
        scale = torch.ldexp(torch.ones_like(largest), torch.frexp(largest).exponent - 1)
        m, x, a = (t / scale[:, None] for t in (m, x, a))
        # 2m - g(x + a) is O(1) per pixel whatever t is: no large sums get subtracted.
        centred = torch.addcmul(2 * m, g[:, None], x + a, value=-1)
        inner = torch.linalg.vecdot(x - a, centred)
        s = sigma.to(dtype)
        # (g/s)(inner/s)/2 rather than g inner/(2 s²): no inf/inf when g and s are both huge.
        # Multiplying by the finite scale twice then overflows to ±inf (the exact limit), never
        # to NaN; an exact zero stays zero even where a factor overflowed.
        scaled = (g / s) * (inner / s) / 2
        return torch.where((g == 0) | (inner == 0), 0.0, scaled * scale * scale)


def importance_weights(
    noisy: Tensor,
    x0: Tensor,
    a0: Tensor,
    gamma: Tensor,
    sigma: Tensor,
    lam: float,
    *,
    max_weight: float = DEFAULT_MAX_WEIGHT,
) -> tuple[Tensor, Tensor]:
    """Defensive-mixture importance weights ``(w_x, w_a)`` of Eq. 8, one per row.

    Args:
        noisy: the noisy points ``m_t``, shape ``(B, ...)``, any float dtype.
        x0: keep points, shape of ``noisy``.
        a0: forget points, shape of ``noisy``.
        gamma: per-row schedule value ``γ_t``, shape ``(B,)``.
        sigma: per-row schedule value ``σ_t > 0``, shape ``(B,)``.
        lam: mixture weight ``λ`` in ``[0, 1]``.
        max_weight: cap applied in log space. It binds only where a weight is unbounded, i.e.
            ``w_a`` at ``λ = 0`` and ``w_x`` at ``λ = 1``; for ``0 < λ < 1`` the weights are
            bounded by ``1/(1-λ)`` and ``1/λ`` (Eqs. 9–10) and the cap is inactive when above both.

    Returns:
        ``(w_x, w_a)``, each ``(B,)``, detached, float32 (float64 for float64 inputs) whatever the
        input dtype, with ``(1-λ) w_x + λ w_a = 1`` up to rounding where the cap does not bind.

    Examples:
        >>> x0, a0 = torch.zeros(3, 4), torch.ones(3, 4)
        >>> w_x, w_a = importance_weights(x0, x0, a0, torch.ones(3), torch.ones(3), 0.5)
        >>> torch.allclose(0.5 * w_x + 0.5 * w_a, torch.ones(3))
        True
    """
    check_pair(x0, a0)
    check_batch(noisy, "noisy")
    if noisy.shape != x0.shape:
        raise ValueError(
            f"`noisy` must have the shape of `x0` {tuple(x0.shape)}, got {tuple(noisy.shape)}"
        )
    lam = check_probability(lam, "lam")
    check_rows(gamma, "gamma", x0)
    check_rows(sigma, "sigma", x0)
    check_positive_values(sigma, "sigma")
    max_weight = check_max_weight(max_weight)

    r = log_density_ratio(noisy, x0, a0, gamma, sigma)
    log_keep = math.log1p(-lam) if lam < 1 else -math.inf
    log_forget = math.log(lam) if lam > 0 else -math.inf
    log_cap = math.log(max_weight)
    with torch.no_grad():
        # At λ = 0 (λ = 1) w_x (w_a) is exactly 1: never form -inf ± inf with an infinite r.
        if lam == 0:
            log_w_x = torch.zeros_like(r)
        else:
            log_w_x = -torch.logaddexp(torch.full_like(r, log_keep), log_forget - r)
        if lam == 1:
            log_w_a = torch.zeros_like(r)
        else:
            log_w_a = -torch.logaddexp(log_keep + r, torch.full_like(r, log_forget))
        return log_w_x.clamp(max=log_cap).exp(), log_w_a.clamp(max=log_cap).exp()
