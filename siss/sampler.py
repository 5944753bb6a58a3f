"""Sampling from the defensive mixture ``q_λ(m|x, a) = (1 - λ) q(m|x) + λ q(m|a)`` (Eq. 6)."""

from __future__ import annotations

import torch
from torch import Tensor

from siss import _random
from siss._checks import (
    append_dims,
    check_finite_values,
    check_pair,
    check_positive_values,
    check_probability,
    check_rows,
    validate_values_enabled,
    work_dtype,
)


def mixture_sample(
    x0: Tensor,
    a0: Tensor,
    gamma: Tensor,
    sigma: Tensor,
    lam: float,
    generator: torch.Generator | None = None,
    *,
    noise: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Draw one noisy point per row from the defensive mixture of Eq. 6.

    Row ``i`` picks its source by a Bernoulli(``lam``) coin: the forget point ``a0[i]`` with
    probability ``lam``, the keep point ``x0[i]`` otherwise; then
    ``noisy[i] = gamma[i] * source + sigma[i] * eps[i]`` with ``eps ~ N(0, I)``. Each pair shares
    one ``eps`` and one timestep, as in the paper. No host sync: the coin is a tensor comparison.

    Args:
        x0: clean keep points, shape ``(B, ...)``.
        a0: clean forget points, shape of ``x0``.
        gamma: signal scale per row, shape ``(B,)``.
        sigma: noise scale per row, shape ``(B,)``.
        lam: mixture weight ``λ`` in ``[0, 1]``; 0 always picks ``x0``, 1 always ``a0``.
        generator: source of randomness (coins first, then noise).
        noise: the ``eps`` to use, shape of ``x0``; drawn from ``generator`` when omitted.

    Returns:
        ``(noisy, from_forget)``: the noisy batch in ``x0``'s dtype, shape of ``x0`` (computed in
        float32 or float64, then cast), and the boolean coin per row, shape ``(B,)``.

    Examples:
        >>> x0, a0 = torch.zeros(4, 2), torch.ones(4, 2)
        >>> g = torch.Generator().manual_seed(0)
        >>> gamma, sigma = torch.ones(4), torch.full((4,), 1e-3)
        >>> noisy, from_forget = mixture_sample(x0, a0, gamma, sigma, 0.5, g)
        >>> noisy.round().tolist() == [[float(f)] * 2 for f in from_forget.tolist()]
        True
    """
    check_pair(x0, a0)
    lam = check_probability(lam, "lam")
    check_rows(gamma, "gamma", x0)
    check_rows(sigma, "sigma", x0)
    check_positive_values(sigma, "sigma")
    if noise is not None:
        if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
            raise TypeError("`noise` must be a floating-point tensor of the shape of `x0`")
        check_finite_values(noise, "noise")
    from_forget = _random.rand((x0.shape[0],), generator=generator, device=x0.device) < lam
    if noise is None:
        noise = _random.randn(
            tuple(x0.shape), generator=generator, device=x0.device, dtype=x0.dtype
        )
    elif noise.shape != x0.shape or noise.device != x0.device:
        raise ValueError(
            f"`noise` must have the shape {tuple(x0.shape)} and device {x0.device} of `x0`, "
            f"got {tuple(noise.shape)} on {noise.device}"
        )
    source = torch.where(append_dims(from_forget, x0.ndim), a0, x0)
    dtype = work_dtype(x0)
    noisy = torch.addcmul(
        append_dims(gamma.to(dtype), x0.ndim) * source.to(dtype),
        append_dims(sigma.to(dtype), x0.ndim),
        noise.to(dtype),
    )
    noisy = noisy.to(x0.dtype)
    if validate_values_enabled() and noisy.device.type != "meta":
        if not bool(torch.isfinite(noisy).all()):
            raise ValueError(
                "the noisy batch gamma * source + sigma * noise overflowed although `x0`, `a0`, "
                f"`gamma` and `sigma` are finite: their values are too large for {x0.dtype}"
            )
    return noisy, from_forget
