"""ReTrack (siss.retrack) against a closed form on a finite data set, in float64.

Six points in 2-D, two of them forgotten: X \\ A has four. The retrained model's optimal
prediction at a noisy point is the posterior mean of its target over X \\ A; ReTrack regresses the
forget rows on that posterior restricted to the forget point's k nearest kept neighbours. The
expected values below are written out with plain Python loops over the points (log-sum-exp by
hand), not with the module's functions.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import fuzz_settings, tiny_unet
from hypothesis import given
from hypothesis import strategies as st

from siss import RULES, NoiseSchedule, ReTrackDraw, ReTrackLoss, make_loss
from siss.retrack import DEFAULT_NEIGHBORS, nearest_neighbors, neighbor_posterior

POINTS = torch.tensor(
    [[0.0, 0.0], [0.9, 0.2], [2.0, 0.1], [-0.4, 1.1], [1.2, -0.9], [0.3, 2.2]],
    dtype=torch.float64,
)
FORGET = [1, 4]
KEEP = [0, 2, 3, 5]
# grid indices from nearly clean (one-hot weights) to nearly pure noise (almost uniform ones)
TIMESTEPS = torch.tensor([3, 60, 250, 999])


def ddpm():
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


def flow():
    return NoiseSchedule.from_flow_sigmas(torch.linspace(0.005, 1.0, 1000, dtype=torch.float64))


def knn(a, pool, k):
    """Indices of the k nearest rows of ``pool`` to ``a``, by a plain sort."""
    distances = [sum((float(a[d]) - float(p[d])) ** 2 for d in range(len(a))) for p in pool]
    return sorted(range(len(pool)), key=lambda j: (distances[j], j))[:k]


def posterior_mean(x_t, gamma, sigma, points):
    """E[x0 | x_t] for x0 uniform on ``points`` and x_t ~ N(gamma x0, sigma^2 I), by hand."""
    logs = [
        -sum((float(x_t[d]) - gamma * float(p[d])) ** 2 for d in range(len(p))) / (2 * sigma**2)
        for p in points
    ]
    top = max(logs)
    weights = [math.exp(v - top) for v in logs]
    total = sum(weights)
    return torch.tensor(
        [
            sum(w * float(p[d]) for w, p in zip(weights, points, strict=True)) / total
            for d in range(len(x_t))
        ],
        dtype=torch.float64,
    )


def target(prediction_type, clean, noise, gamma, sigma):
    return {
        "epsilon": noise,
        "sample": clean,
        "v_prediction": gamma * noise - sigma * clean,
        "flow_prediction": noise - clean,
    }[prediction_type]


def draw_problem(k, prediction_type, schedule, **kwargs):
    keep, forget = POINTS[KEEP], POINTS[FORGET]
    loss_fn = ReTrackLoss(
        schedule,
        num_neighbors=k,
        retain=keep,
        prediction_type=prediction_type,
        reduction="none",
        **kwargs,
    )
    x0 = keep  # B = 4 keep rows ...
    a0 = forget[[0, 1, 0, 1]]  # ... each paired with a forget point
    draw = loss_fn.sample(x0, a0, timesteps=TIMESTEPS, generator=torch.Generator().manual_seed(0))
    return loss_fn, x0, a0, draw


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize(
    "prediction_type", ["epsilon", "v_prediction", "sample", "flow_prediction"]
)
def test_the_forget_target_is_the_posterior_mean_over_the_k_neighbours(k, prediction_type):
    schedule = flow() if prediction_type == "flow_prediction" else ddpm()
    loss_fn, x0, a0, draw = draw_problem(k, prediction_type, schedule)
    b = x0.shape[0]
    out = torch.randn(
        draw.noisy.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    terms = loss_fn.terms(out, draw)
    keep_points = POINTS[KEEP]
    for i in range(b):
        x_t = draw.noisy[b + i]  # the forget row's model input
        gamma, sigma = float(draw.gamma[b + i]), float(draw.sigma[b + i])
        assert torch.allclose(x_t, gamma * a0[i] + sigma * draw.noise[b + i], atol=1e-14)
        chosen = knn(a0[i], keep_points, k)
        assert torch.equal(draw.neighbors[i], keep_points[chosen])
        mean = posterior_mean(x_t, gamma, sigma, keep_points[chosen])
        noise = (x_t - gamma * mean) / sigma
        torch.testing.assert_close(draw.redirect_clean[i], mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(draw.redirect_noise[i], noise, rtol=1e-9, atol=1e-10)
        expected = target(prediction_type, mean, noise, gamma, sigma)
        redirect = ((out[b + i] - expected) ** 2).mean()
        torch.testing.assert_close(-terms.forget[i], redirect, rtol=1e-9, atol=1e-12)
        # the keep row: the plain denoising loss on X \ A, target from the forward process
        x_keep = draw.noisy[i]
        keep_noise = (x_keep - gamma * x0[i]) / sigma
        keep_target = target(prediction_type, x0[i], keep_noise, gamma, sigma)
        torch.testing.assert_close(terms.keep[i], ((out[i] - keep_target) ** 2).mean())
    torch.testing.assert_close(terms.loss, terms.keep - terms.forget)  # s = 1: l_x + l_r


def test_with_every_kept_point_it_is_the_retrained_models_optimum():
    """k = |X \\ A|: the target is E[target | x_t] over all of X \\ A, the minimiser of L_{X\\A};
    with fewer neighbours it is an approximation that differs where the posterior is spread."""
    _, _, a0, full = draw_problem(len(KEEP), "epsilon", ddpm())
    _, _, _, nearest = draw_problem(1, "epsilon", ddpm())
    b = a0.shape[0]
    for i in range(b):
        x_t = full.noisy[b + i]
        gamma, sigma = float(full.gamma[b + i]), float(full.sigma[b + i])
        mean = posterior_mean(x_t, gamma, sigma, POINTS[KEEP])
        torch.testing.assert_close(full.redirect_clean[i], mean, rtol=1e-10, atol=1e-12)
        # the retrained denoiser's noise prediction, E[eps | x_t] = (x_t - gamma E[x0 | x_t])/sigma
        torch.testing.assert_close(
            full.redirect_noise[i], (x_t - gamma * mean) / sigma, rtol=1e-9, atol=1e-10
        )
    # at t = 999 (row 3) the full posterior is nearly uniform over the four kept points, while
    # k = 1 puts all the weight on the nearest one
    assert torch.allclose(
        full.neighbor_weights[3], torch.full((4,), 0.25, dtype=torch.float64), atol=0.02
    )
    assert nearest.neighbor_weights[3].tolist() == [1.0]
    assert not torch.allclose(full.redirect_clean[3], nearest.redirect_clean[3], atol=0.1)
    # at t = 3 (row 0) both are the nearest neighbour: the dominant term is the whole sum
    torch.testing.assert_close(full.redirect_clean[0], nearest.redirect_clean[0])


def test_the_gradient_is_finite_and_the_per_neighbour_loss_s():
    """gradcheck in float64; and Σ_j w_j ||f - target_j||², the loss written per neighbour, has
    the gradient of the posterior-mean regression (weights summing to 1)."""
    loss_fn, _, _, draw = draw_problem(3, "epsilon", ddpm())
    out = torch.randn(draw.noisy.shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda o: loss_fn(o, draw).sum(), (out,))
    loss_fn(out, draw).sum().backward()
    assert torch.isfinite(out.grad).all()
    b = draw.num_keep
    forget_out = out.detach()[b:].clone().requires_grad_(True)
    x_t = draw.noisy[b:].unsqueeze(1)
    sigma, gamma = draw.sigma[b:].double()[:, None, None], draw.gamma[b:].double()[:, None, None]
    per_neighbour = (x_t - gamma * draw.neighbors) / sigma  # eps_j, (B, k, 2)
    squared = ((forget_out.unsqueeze(1) - per_neighbour) ** 2).mean(-1)
    (draw.neighbor_weights * squared).sum().backward()
    torch.testing.assert_close(forget_out.grad, out.grad[b:], rtol=1e-10, atol=1e-12)


@fuzz_settings(60)
@given(
    pool=st.integers(1, 6),
    dims=st.integers(1, 3),
    k=st.integers(1, 6),
    gamma=st.floats(0.0, 1.0),
    sigma=st.floats(0.005, 1.0),
    seed=st.integers(0, 2**16),
)
def test_weights_are_a_distribution_invariant_to_the_neighbours_order(
    pool, dims, k, gamma, sigma, seed
):
    g = torch.Generator().manual_seed(seed)
    k = min(k, pool)
    a0 = torch.randn(2, dims, generator=g, dtype=torch.float64)
    noise = torch.randn(2, dims, generator=g, dtype=torch.float64)
    neighbors = 3 * torch.randn(2, k, dims, generator=g, dtype=torch.float64)
    gammas, sigmas = torch.full((2,), gamma), torch.full((2,), sigma)
    weights, clean, mean_noise = neighbor_posterior(a0, noise, gammas, sigmas, neighbors)
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(1), torch.ones(2, dtype=torch.float64))
    low, high = neighbors.min(1).values, neighbors.max(1).values  # in the convex hull
    assert (clean >= low - 1e-12).all() and (clean <= high + 1e-12).all()
    order = torch.randperm(k, generator=g)
    weights_p, clean_p, noise_p = neighbor_posterior(a0, noise, gammas, sigmas, neighbors[:, order])
    torch.testing.assert_close(weights_p, weights[:, order])
    torch.testing.assert_close(clean_p, clean)
    torch.testing.assert_close(noise_p, mean_noise)
    # and the loss picks the same neighbours from a permuted candidate pool
    candidates = 3 * torch.randn(1, pool, dims, generator=g, dtype=torch.float64)
    loss_fn = ReTrackLoss(ddpm(), num_neighbors=k)
    x0 = torch.randn(2, dims, generator=g, dtype=torch.float64)
    first = loss_fn.sample(
        x0, a0, timesteps=500, generator=torch.Generator().manual_seed(0), neighbors=candidates
    )
    shuffled = candidates[:, torch.randperm(pool, generator=g)]
    second = loss_fn.sample(
        x0, a0, timesteps=500, generator=torch.Generator().manual_seed(0), neighbors=shuffled
    )
    torch.testing.assert_close(second.redirect_clean, first.redirect_clean)
    torch.testing.assert_close(second.redirect_noise, first.redirect_noise)


def test_far_neighbours_at_small_sigma_give_one_hot_weights_not_nan():
    a0 = torch.zeros(1, 4)
    neighbors = torch.tensor([[[1e3] * 4, [1e4] * 4, [-1e6] * 4]])
    weights, clean, noise = neighbor_posterior(
        a0, torch.zeros(1, 4), torch.ones(1), torch.full((1,), 1e-3), neighbors
    )
    assert weights.dtype == torch.float32 and torch.isfinite(weights).all()
    assert weights.tolist() == [[1.0, 0.0, 0.0]]
    assert torch.equal(clean, neighbors[:, 0]) and torch.isfinite(noise).all()
    # half precision data: the weights are still computed in float32
    weights_half, _, _ = neighbor_posterior(
        a0.half(),
        torch.zeros(1, 4).half(),
        torch.ones(1),
        torch.full((1,), 1e-3),
        neighbors.clamp(-6e4, 6e4).half(),
    )
    assert weights_half.dtype == torch.float32 and torch.isfinite(weights_half).all()


def test_the_neighbour_sources_agree():
    keep = POINTS[KEEP]
    a0 = POINTS[FORGET]
    x0 = keep[:2]

    def sample(loss_fn, **extra):
        return loss_fn.sample(
            x0, a0, timesteps=100, generator=torch.Generator().manual_seed(3), **extra
        )

    bank = sample(ReTrackLoss(ddpm(), num_neighbors=2, retain=keep))
    given_pool = sample(ReTrackLoss(ddpm(), num_neighbors=2), neighbors=keep[None])
    found, indices = nearest_neighbors(a0, keep, 2)
    given_exact = sample(ReTrackLoss(ddpm(), num_neighbors=2), neighbors=found)
    assert indices.tolist() == [knn(a, keep, 2) for a in a0]
    for draw in (given_pool, given_exact):
        assert torch.equal(draw.neighbors, bank.neighbors)
        torch.testing.assert_close(draw.redirect_clean, bank.redirect_clean)
    # no pool given: the keep batch itself is the pool
    in_batch = sample(ReTrackLoss(ddpm(), num_neighbors=5))
    assert torch.equal(in_batch.neighbors, nearest_neighbors(a0, x0, 2)[0])
    # the same draw for every source: same timesteps and noise
    assert torch.equal(in_batch.noise, bank.noise) and torch.equal(in_batch.indices, bank.indices)


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="`num_neighbors` must be >= 1"):
        ReTrackLoss(ddpm(), num_neighbors=0)
    with pytest.raises(TypeError, match="`num_neighbors`"):
        ReTrackLoss(ddpm(), num_neighbors=2.5)
    with pytest.raises(ValueError, match="`retain` must have shape"):
        ReTrackLoss(ddpm(), retain=torch.zeros(3))
    with pytest.raises(ValueError, match="`retain` rows must have the shape"):
        ReTrackLoss(ddpm(), retain=torch.zeros(3, 5)).sample(torch.zeros(2, 4), torch.ones(2, 4))
    loss_fn = ReTrackLoss(ddpm())
    with pytest.raises(ValueError, match="`neighbors` must have shape"):
        loss_fn.sample(torch.zeros(2, 4), torch.ones(2, 4), neighbors=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="`neighbors` must have shape"):
        loss_fn.sample(torch.zeros(2, 4), torch.ones(2, 4), neighbors=torch.zeros(3, 1, 4))
    with pytest.raises(ValueError, match=r"`k` \(3\) must be at most the pool's size"):
        nearest_neighbors(torch.zeros(1, 2), torch.zeros(2, 2), 3)
    naive = make_loss("naive", ddpm())
    other = naive.sample(torch.zeros(2, 4), None)
    with pytest.raises(TypeError, match=r"ReTrackLoss\.sample"):
        loss_fn.terms(torch.zeros(2, 4), other)


def test_registry_rules():
    rules = RULES["retrack"]
    assert rules.loss is ReTrackLoss and not rules.teacher and not rules.subsets
    assert rules.superfactor == 1.0 and rules.balancer is None and not rules.refused
    loss_fn = make_loss("retrack", flow(), prediction_type="flow_prediction", num_neighbors=3)
    assert loss_fn.num_neighbors == 3 and ReTrackLoss(ddpm()).num_neighbors == DEFAULT_NEIGHBORS
    draw = loss_fn.sample(torch.randn(4, 3), torch.randn(1, 3))
    assert isinstance(draw, ReTrackDraw) and draw.neighbors.shape == (4, 3, 3)


@pytest.mark.usefixtures("one_thread")
def test_the_recipe_runs_retrack():
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    from siss import Unlearner, UnlearningConfig

    config = UnlearningConfig(method="retrack", max_train_steps=2)
    assert config.num_neighbors == DEFAULT_NEIGHBORS and config.balancer is None
    assert config.keep_target == "noise"
    assert config.loss_kwargs(None, None) == {
        "superfactor": 1.0,
        "snr_gamma": None,
        "num_neighbors": DEFAULT_NEIGHBORS,
    }
    with pytest.raises(ValueError, match=r"UnlearningConfig\.num_neighbors"):
        UnlearningConfig(method="siss", num_neighbors=3)
    with pytest.raises(ValueError, match=r"UnlearningConfig\.num_neighbors"):
        UnlearningConfig(method="retrack", num_neighbors=0)
    g = torch.Generator().manual_seed(0)
    retain = torch.rand(12, 1, 8, 8, generator=g) * 2 - 1
    for scheduler in (DDPMScheduler(), FlowMatchEulerDiscreteScheduler()):
        unet = tiny_unet()
        start = torch.cat([p.detach().flatten() for p in unet.parameters()])
        unlearner = Unlearner(
            unet, scheduler, UnlearningConfig("retrack", num_neighbors=3), retain=retain
        )
        assert unlearner.loss_fn.retain.shape == (12, 1, 8, 8)
        for _ in range(2):
            result = unlearner.step(retain[:4], torch.ones(1, 1, 8, 8))
        assert result.optimizer_step and torch.isfinite(result.terms.loss)
        end = torch.cat([p.detach().flatten() for p in unet.parameters()])
        assert torch.isfinite(end).all() and not torch.equal(end, start)
    with pytest.raises(ValueError, match="`retain` is ReTrack's"):
        Unlearner(tiny_unet(), DDPMScheduler(), UnlearningConfig("naive"), retain=retain)
