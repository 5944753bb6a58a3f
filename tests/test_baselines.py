"""Baselines: each loss against a float64 transcription of its equation; SISS (No IS) vs SISS.

The transcriptions recompute every target from the draw's clean points and noisy inputs
(``eps = (x_t - gamma x) / sigma``), not from the loss's own bookkeeping. The Eq. 15 test uses the
elementwise linear denoiser of tests/test_losses.py, whose expected loss is closed form.
"""

import math

import pytest
import torch

from siss import SISSLoss
from siss.baselines import (
    DenoisingDraw,
    EraseDiffLoss,
    NaiveDeletionLoss,
    NegGradLoss,
    SISSNoISLoss,
)

SHAPE = (2, 4, 4)


def data(seed=0, batch=6, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, *SHAPE, generator=g, dtype=dtype)
    a0 = x0 + 0.3 * torch.randn(batch, *SHAPE, generator=g, dtype=dtype)
    return x0, a0, g


def per_row_error(out, noisy, clean, gamma, sigma, prediction_type="epsilon"):
    """mean over pixels of (target - out)^2, target written out from the forward process."""
    m, c, o = (t.double().flatten(1) for t in (noisy, clean, out))
    g, s = gamma.double()[:, None], sigma.double()[:, None]
    eps = (m - g * c) / s
    target = {
        "epsilon": eps,
        "sample": c,
        "v_prediction": g * eps - s * c,
        "flow_prediction": eps - c,
    }[prediction_type]
    return ((target - o) ** 2).mean(1)


def check_draw(draw, x0, a0):
    """The draw is what it says: noisy = gamma clean + sigma eps, rows in the documented order."""
    b = x0.shape[0]
    view = (-1,) + (1,) * len(SHAPE)
    rebuilt = draw.gamma.double().view(view) * draw.clean + draw.sigma.double().view(view) * (
        draw.noise
    )
    torch.testing.assert_close(draw.noisy, rebuilt)
    if draw.blocks == 2:
        assert draw.num_keep == b and draw.noisy.shape[0] == 2 * b
        assert torch.equal(draw.clean[:b], x0) and torch.equal(draw.clean[b:], a0)
        assert torch.equal(draw.noise[:b], draw.noise[b:])  # pair i shares eps ...
        assert torch.equal(draw.timesteps[:b], draw.timesteps[b:])  # ... and t
        assert draw.from_forget.tolist() == [False] * b + [True] * b


@pytest.mark.parametrize(
    "prediction_type", ["epsilon", "v_prediction", "sample", "flow_prediction"]
)
def test_naive_deletion_is_eq2(alphas_cumprod, prediction_type):
    x0, a0, g = data()
    loss_fn = NaiveDeletionLoss(alphas_cumprod, prediction_type=prediction_type)
    draw = loss_fn.sample(x0, a0, generator=g)
    assert draw.blocks == 1 and draw.num_keep == 6 and torch.equal(draw.clean, x0)
    check_draw(draw, x0, a0)
    out = torch.randn(draw.noisy.shape, generator=g, dtype=torch.float64)
    expected = per_row_error(
        out, draw.noisy, x0, draw.gamma, draw.sigma, prediction_type=prediction_type
    ).mean()
    torch.testing.assert_close(loss_fn(out, draw), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("superfactor", [1.0, 0.25])
def test_neggrad_is_minus_eq3(alphas_cumprod, superfactor):
    x0, a0, g = data(1)
    loss_fn = NegGradLoss(alphas_cumprod, superfactor=superfactor)
    draw = loss_fn.sample(x0, a0, timesteps=(100, 900), generator=g)
    assert draw.blocks == 1 and draw.num_keep == 0 and torch.equal(draw.clean, a0)
    check_draw(draw, x0, a0)
    out = torch.randn(draw.noisy.shape, generator=g, dtype=torch.float64)
    l_a = per_row_error(out, draw.noisy, a0, draw.gamma, draw.sigma).mean()
    terms = loss_fn.terms(out, draw)
    torch.testing.assert_close(terms.loss, -superfactor * l_a, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(terms.forget, l_a, rtol=1e-9, atol=1e-12)
    assert terms.keep.item() == 0.0


@pytest.mark.parametrize("x_from", ["retain", "all"])
@pytest.mark.parametrize("sizes", [(None, None), (10, 3)])
def test_siss_nois_is_eq4_and_eq15(alphas_cumprod, x_from, sizes):
    n, k = sizes
    x0, a0, g = data(2)
    if x_from == "all" and n is None:  # Eq. 8's n/(n-k) cannot be folded into s
        with pytest.raises(ValueError, match="`n`"):
            SISSNoISLoss(alphas_cumprod, superfactor=0.7, x_from=x_from)
        return
    loss_fn = SISSNoISLoss(alphas_cumprod, superfactor=0.7, n=n, k=k, x_from=x_from)
    draw = loss_fn.sample(x0, a0, generator=g)
    check_draw(draw, x0, a0)
    out = torch.randn(draw.noisy.shape, generator=g, dtype=torch.float64)
    b = 6
    l_x = per_row_error(out[:b], draw.noisy[:b], x0, draw.gamma[:b], draw.sigma[:b])
    l_a = per_row_error(out[b:], draw.noisy[b:], a0, draw.gamma[b:], draw.sigma[b:])
    rho = 1.0 if n is None else k / (n - k)
    if x_from == "all":  # Eq. 4 with the (1 + s) of Eq. 8
        expected = (1 + rho) * l_x - (1 + 0.7) * rho * l_a
    else:  # Eq. 14 (Eq. 15 without importance sampling)
        expected = l_x - 0.7 * rho * l_a
    torch.testing.assert_close(loss_fn(out, draw), expected.mean(), rtol=1e-9, atol=1e-12)
    terms = loss_fn.terms(out, draw)
    torch.testing.assert_close(terms.forget, (rho * l_a).mean(), rtol=1e-9, atol=1e-12)


def test_erasediff_fits_uniform_targets(alphas_cumprod):
    x0, a0, g = data(3)
    loss_fn = EraseDiffLoss(alphas_cumprod, superfactor=0.4)
    draw = loss_fn.sample(x0, a0, generator=g)
    check_draw(draw, x0, a0)
    u = draw.uniform_target
    assert u.shape == x0.shape and u.dtype == x0.dtype
    assert (u >= 0).all() and (u < 1).all() and 0.4 < u.mean() < 0.6
    out = torch.randn(draw.noisy.shape, generator=g, dtype=torch.float64)
    l_x = per_row_error(out[:6], draw.noisy[:6], x0, draw.gamma[:6], draw.sigma[:6])
    l_u = ((u.flatten(1) - out[6:].flatten(1)) ** 2).mean(1)
    terms = loss_fn.terms(out, draw)
    torch.testing.assert_close(terms.loss, (l_x + 0.4 * l_u).mean(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(terms.keep, l_x.mean(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(terms.forget, -l_u.mean(), rtol=1e-9, atol=1e-12)


LOSSES = [NaiveDeletionLoss, NegGradLoss, SISSNoISLoss, EraseDiffLoss]


@pytest.mark.parametrize("cls", LOSSES)
def test_terms_recombine_reduce_and_stay_connected(alphas_cumprod, cls):
    loss_fn = cls(alphas_cumprod, superfactor=0.3, reduction="none")
    x0, a0, g = data(4, dtype=torch.float32)
    draw = loss_fn.sample(x0, a0, generator=g)
    out = torch.randn(draw.noisy.shape, generator=g).requires_grad_()
    terms = loss_fn.terms(out, draw)
    assert terms.loss.shape == terms.keep.shape == terms.forget.shape == (6,)
    torch.testing.assert_close(terms.loss, terms.keep - 0.3 * terms.forget)
    for term in (terms.keep, terms.forget):  # a zero term is still in the graph
        (grad,) = torch.autograd.grad(term.sum(), out, retain_graph=True)
        assert grad is not None and torch.isfinite(grad).all()
    loss_fn.reduction = "sum"
    torch.testing.assert_close(loss_fn(out, draw), terms.loss.sum())
    loss_fn.reduction = "mean"
    torch.testing.assert_close(loss_fn(out, draw), terms.loss.mean())


@pytest.mark.parametrize("cls", LOSSES)
def test_draws_are_reproducible_and_broadcast_one_forget_point(alphas_cumprod, cls):
    loss_fn = cls(alphas_cumprod, superfactor=0.1)
    x0, a0 = torch.randn(5, 3, 4), torch.randn(1, 3, 4)
    first = loss_fn.sample(x0, a0, generator=torch.Generator().manual_seed(7))
    second = loss_fn.sample(x0, a0, generator=torch.Generator().manual_seed(7))
    for name in ("noisy", "timesteps", "noise"):
        assert torch.equal(getattr(first, name), getattr(second, name))
    assert first.noisy.shape[0] == 5 * first.blocks
    if cls is not NaiveDeletionLoss:
        assert torch.equal(first.clean[-1], a0[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_output_is_reduced_in_float32(alphas_cumprod, dtype):
    loss_fn = SISSNoISLoss(alphas_cumprod, superfactor=0.1)
    x0, a0 = torch.randn(4, 3, 8, 8).to(dtype), torch.randn(4, 3, 8, 8).to(dtype)
    draw = loss_fn.sample(x0, a0, generator=torch.Generator().manual_seed(2))
    out = torch.randn(draw.noisy.shape).to(dtype).requires_grad_()
    loss = loss_fn(out, draw)
    assert loss.dtype == torch.float32
    loss.backward()
    assert out.grad.dtype == dtype and torch.isfinite(out.grad).all()


def test_neggrad_without_x0_uses_a0_batch(alphas_cumprod):
    draw = NegGradLoss(alphas_cumprod).sample(None, torch.randn(3, 2))
    assert draw.noisy.shape == (3, 2)


def test_errors(alphas_cumprod):
    with pytest.raises(ValueError, match="`prediction_type` must be 'epsilon'"):
        EraseDiffLoss(alphas_cumprod, prediction_type="v_prediction")
    with pytest.raises(ValueError, match="`superfactor`"):
        NegGradLoss(alphas_cumprod, superfactor=-1.0)
    with pytest.raises(ValueError, match="`x_from`"):
        SISSNoISLoss(alphas_cumprod, superfactor=0.1, x_from="forget")
    with pytest.raises(ValueError, match="both `n`"):
        SISSNoISLoss(alphas_cumprod, superfactor=0.1, n=4)
    x0 = torch.randn(4, 3)
    nois = SISSNoISLoss(alphas_cumprod, superfactor=0.1)
    with pytest.raises(ValueError, match="`a0` must have the shape"):
        nois.sample(x0, torch.randn(4, 5))
    naive_draw = NaiveDeletionLoss(alphas_cumprod).sample(x0)
    with pytest.raises(TypeError, match=r"`draw` must come from SISSNoISLoss\.sample"):
        nois(torch.randn(4, 3), naive_draw)
    with pytest.raises(TypeError, match=r"`draw` must come from NaiveDeletionLoss\.sample"):
        NaiveDeletionLoss(alphas_cumprod)(
            torch.randn(4, 3), SISSLoss(alphas_cumprod, superfactor=0.1).sample(x0, x0)
        )
    draw = nois.sample(x0, x0)
    with pytest.raises(ValueError, match=r"`model_output` must have the shape .*\(8, 3\)"):
        nois(torch.randn(4, 3), draw)
    assert isinstance(draw, DenoisingDraw)


# --- Eq. 15: SISS (No IS) and SISS estimate the same thing ------------------------------------

Z = 4.5  # per z-test; false-alarm probability 7e-6 each
BATCHES, ROWS = 200, 64


def linear_problem(seed, gap):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(5, 3, generator=g, dtype=torch.float64) * 2 - 1
    forget = keep[:2] + gap * torch.randn(2, 3, generator=g, dtype=torch.float64)
    w = 1 + 0.3 * torch.randn(3, generator=g, dtype=torch.float64)
    b = 0.2 * torch.randn(3, generator=g, dtype=torch.float64)
    return keep, forget, w, b, g


def closed_form(w, b, points, schedule):
    """E over t ~ U and eps of mean_i (eps_i - w_i x_t,i - b_i)^2 for eps_θ(m) = w m + b."""
    gamma, sigma = schedule.gamma.double()[:, None, None], schedule.sigma.double()[:, None, None]
    c = points[None]
    return ((1 - w * sigma) ** 2 + (w * gamma * c + b) ** 2).mean()


def batch_losses(loss_fn, keep, forget, w, b, g):
    x0 = keep[torch.randint(len(keep), (BATCHES * ROWS,), generator=g)]
    a0 = forget[torch.randint(len(forget), (BATCHES * ROWS,), generator=g)]
    draw = loss_fn.sample(x0, a0, generator=g)
    loss_fn.reduction = "none"
    rows = loss_fn(w * draw.noisy + b, draw)  # per pair, (BATCHES * ROWS,)
    return rows.view(BATCHES, ROWS).mean(1)


@pytest.mark.parametrize(("seed", "gap", "superfactor"), [(0, 0.1, 0.5), (1, 1.0, 2.0)])
def test_siss_nois_and_siss_agree_in_expectation_eq15(alphas_cumprod, seed, gap, superfactor):
    """Both are unbiased for L_{X\\A} - s k/(n-k) L_A (Eq. 15): z-tests against the closed form
    and a two-sample z-test between them."""
    keep, forget, w, b, g = linear_problem(seed, gap)
    n, k = 7, 2
    nois = SISSNoISLoss(alphas_cumprod, superfactor=superfactor, n=n, k=k)
    siss = SISSLoss(alphas_cumprod, lam=0.5, superfactor=superfactor, n=n, k=k)
    truth = closed_form(w, b, keep, nois.schedule) - superfactor * k / (n - k) * closed_form(
        w, b, forget, nois.schedule
    )
    means, errors = [], []
    for loss_fn in (nois, siss):
        losses = batch_losses(loss_fn, keep, forget, w, b, g)
        means.append(losses.mean())
        errors.append(losses.std() / math.sqrt(BATCHES))
        assert abs((losses.mean() - truth) / errors[-1]) <= Z
    assert abs((means[0] - means[1]) / math.hypot(*errors)) <= Z


def test_the_eq15_check_has_power(alphas_cumprod):
    """Dropping the constant k/(n-k) (a classic slip) is detected by the same test."""
    keep, forget, w, b, g = linear_problem(0, 0.1)
    nois = SISSNoISLoss(alphas_cumprod, superfactor=2.0)  # k/(n-k) taken as 1, not 2/5
    truth = closed_form(w, b, keep, nois.schedule) - 2.0 * 2 / 5 * closed_form(
        w, b, forget, nois.schedule
    )
    losses = batch_losses(nois, keep, forget, w, b, g)
    assert abs((losses.mean() - truth) / (losses.std() / math.sqrt(BATCHES))) > Z
