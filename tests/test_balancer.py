"""NormBalancer: the combined gradient against a brute-force two-pass reference, in float64.

The reference runs two separate forward/backward passes (``torch.autograd.grad`` of ``keep`` and
of ``forget``) and computes ``c`` with plain Python loops over the parameters; the balancer must
write exactly ``g_keep - c g_forget`` into ``.grad``.
"""

import math

import pytest
import torch
from torch import nn

from siss.balancer import MODES, NormBalancer

RATIO = 0.1


class Net(nn.Module):
    """A small MLP plus parameters that only one term (or neither) reaches."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 4))
        self.keep_only = nn.Parameter(torch.randn(4))
        self.forget_only = nn.Parameter(torch.randn(4))
        self.unused = nn.Parameter(torch.randn(3))
        self.frozen = nn.Parameter(torch.randn(4), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.frozen


def make(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    net = Net().to(dtype)
    g = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(16, 4, generator=g, dtype=dtype)
    a = torch.randn(16, 4, generator=g, dtype=dtype)
    return net, x, a


def terms(net, x, a, forget_scale=1.0):
    out = net(torch.cat([x, a]))
    keep = (out[: len(x)] - x).square().mean() + net.keep_only.square().sum()
    forget = forget_scale * ((out[len(x) :] + a).square().mean() + net.forget_only.sum())
    return keep, forget


def brute_force(net, batches, mode, ratio=RATIO, target_norm=None, superfactor=1.0, eta=0.1):
    """g_keep - c g_forget from separate passes and per-parameter Python loops (float64)."""
    params = [p for p in net.parameters() if p.requires_grad]
    g_keep = [torch.zeros_like(p) for p in params]
    g_forget = [torch.zeros_like(p) for p in params]
    for x, a in batches:
        keep, _ = terms(net, x, a)
        for acc, g in zip(
            g_keep, torch.autograd.grad(keep, params, allow_unused=True), strict=True
        ):
            if g is not None:
                acc += g
        _, forget = terms(net, x, a)
        for acc, g in zip(
            g_forget, torch.autograd.grad(forget, params, allow_unused=True), strict=True
        ):
            if g is not None:
                acc += g
    keep_norm = math.sqrt(sum(float((g * g).sum()) for g in g_keep))
    forget_norm = math.sqrt(sum(float((g * g).sum()) for g in g_forget))
    dot = sum(float((k * f).sum()) for k, f in zip(g_keep, g_forget, strict=True))
    eps = 1e-12
    c = {
        "fix": ratio * keep_norm / (forget_norm + eps),
        "clip": min(superfactor, ratio * keep_norm / (forget_norm + eps)),
        "absolute": (target_norm or 0.0) / (forget_norm + eps),
        "bilevel": max(eta + dot / (forget_norm**2 + eps), 0.0),
    }[mode]
    return [k - c * f for k, f in zip(g_keep, g_forget, strict=True)], c, keep_norm, forget_norm


def balanced(net, batches, **kwargs):
    balancer = NormBalancer(net.parameters(), **kwargs)
    for x, a in batches:
        balancer.backward(*terms(net, x, a))
    return balancer, balancer.step()


def options(mode):
    return {"target_norm": 0.5} if mode == "absolute" else {}


@pytest.mark.parametrize("micro_batches", [1, 3])
@pytest.mark.parametrize("mode", MODES)
def test_equals_two_pass_brute_force(mode, micro_batches):
    net, x, a = make()
    batches = list(zip(x.chunk(micro_batches), a.chunk(micro_batches), strict=True))
    expected, c, keep_norm, forget_norm = brute_force(net, batches, mode, **options(mode))
    _balancer, stats = balanced(net, batches, mode=mode, **options(mode))
    assert not stats.skipped and stats.refreshed
    torch.testing.assert_close(stats.coefficient.double(), torch.tensor(c, dtype=torch.float64))
    torch.testing.assert_close(stats.keep_norm.double(), torch.tensor(keep_norm).double())
    torch.testing.assert_close(stats.forget_norm.double(), torch.tensor(forget_norm).double())
    params = [p for p in net.parameters() if p.requires_grad]
    for p, e in zip(params, expected, strict=True):
        if p is net.unused:
            assert p.grad is None  # neither term reaches it: skipped, never zero-filled
        else:
            torch.testing.assert_close(p.grad, e, rtol=1e-6, atol=1e-9)
    assert net.frozen.grad is None
    # the keep-only parameter gets g_keep, the forget-only one -c g_forget
    torch.testing.assert_close(
        net.forget_only.grad, -micro_batches * stats.coefficient.double().expand(4)
    )


@pytest.mark.parametrize("scale", [1e-6, 1e-2, 1.0, 1e3, 1e8])
def test_fix_hits_the_ratio_and_clip_never_exceeds_it(scale):
    for mode in ("fix", "clip"):
        net, x, a = make(seed=int(math.log10(scale) + 10))
        balancer = NormBalancer(net.parameters(), mode=mode, ratio=0.25)
        balancer.backward(*terms(net, x, a, forget_scale=scale))
        stats = balancer.step()
        achieved = (stats.coefficient * stats.forget_norm / stats.keep_norm).item()
        if mode == "fix":
            assert achieved == pytest.approx(0.25, rel=1e-6)
        else:
            assert achieved <= 0.25 * (1 + 1e-6)
            assert stats.coefficient.item() <= 1.0
            if scale <= 1e-2:  # the forget gradient is small: the ratio does not bind
                assert stats.coefficient.item() == 1.0


def test_absolute_fixes_the_forget_norm():
    net, x, a = make()
    _, stats = balanced(net, [(x, a)], mode="absolute", target_norm=5.0)
    assert (stats.coefficient * stats.forget_norm).item() == pytest.approx(5.0, rel=1e-9)


def test_absolute_holds_no_coefficient_from_a_forget_gradient_below_its_floor():
    """``forget_floor``: with a teacher's ~0 keep gradient, ``floor`` sets none, and a forget
    gradient of 1e-7 of its usual size gave a ``c`` 1e7 times too large, held for ``every - 1``
    steps. At or below the floor: ``c = 0`` on that step, the held ``c`` unchanged, the next step
    refreshes; above it: measured."""
    net, x, a = make()
    _, forget = terms(net, x, a)
    params = [p for p in net.parameters() if p.requires_grad]
    grads = torch.autograd.grad(forget, params, allow_unused=True)
    norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads if g is not None]))
    norm = norm.item()
    balancer = NormBalancer(net.parameters(), mode="absolute", target_norm=5.0, every=4)
    balancer.forget_floor = 0.5 * norm
    balancer.backward(*terms(net, x, a))
    held = balancer.step()
    assert held.measured and balancer.coefficient.item() == pytest.approx(5.0 / norm, rel=1e-9)
    for scale, measured in ((0.4, False), (0.6, True)):  # 0.4 x the forget norm: below
        balancer.forget_floor = 0.5 * norm
        balancer._since_refresh = balancer.every  # the next step refreshes
        balancer.backward(*terms(net, x, a, forget_scale=scale))
        stats = balancer.step()
        assert stats.refreshed and stats.measured is measured
        if not measured:
            assert stats.coefficient.item() == 0.0
            assert balancer.coefficient.item() == pytest.approx(5.0 / norm, rel=1e-9)
            assert balancer.state_dict()["since_refresh"] == balancer.every
    with pytest.raises(ValueError, match="`forget_floor` is used by mode='absolute' only"):
        NormBalancer(net.parameters(), forget_floor=1.0)


def test_bilevel_guarantees_progress_on_the_forget_term():
    """EraseDiff's rule: <g, -g_forget> >= eta ||g_forget||² for the combined g."""
    net, x, a = make(seed=3)
    _, forget = terms(net, x, a)
    params = [p for p in net.parameters() if p.requires_grad]
    g_forget = torch.autograd.grad(forget, params, allow_unused=True)
    _, stats = balanced(net, [(x, a)], mode="bilevel", eta=0.3)
    progress = sum(
        float((-(p.grad * f)).sum()) for p, f in zip(params, g_forget, strict=True) if f is not None
    )
    assert progress >= 0.3 * stats.forget_norm.item() ** 2 * (1 - 1e-9)


def test_zero_forget_gradient_is_safe():
    net, x, a = make()
    balancer = NormBalancer(net.parameters())
    keep, forget = terms(net, x, a)
    balancer.backward(keep, forget * 0)  # a connected zero, as NaiveDeletionLoss returns
    stats = balancer.step()
    assert not stats.skipped and torch.isfinite(stats.coefficient)
    for p in net.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()


@pytest.mark.parametrize("which", ["keep", "forget"])
def test_non_finite_norm_skips_the_update(which):
    net, x, a = make()
    balancer = NormBalancer(net.parameters())
    keep, forget = terms(net, x, a)
    if which == "keep":
        keep = keep * float("nan")
    else:
        forget = forget * float("inf")
    balancer.backward(keep, forget)
    stats = balancer.step()
    assert stats.skipped
    assert all(p.grad is None for p in net.parameters())  # optimizer.step() is a no-op
    # the next step is an ordinary one
    balancer.backward(*terms(net, x, a))
    stats = balancer.step()
    assert not stats.skipped and stats.refreshed
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def test_combination_is_in_place_and_releases_the_buffer():
    """No clones: the final .grad tensors are the ones the keep backward accumulated into."""
    net, x, a = make()
    params = [p for p in net.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    storage = [p.grad.data_ptr() for p in params]
    balancer = NormBalancer(params)
    balancer.backward(*terms(net, x, a))
    assert balancer._forget is not None  # the one extra buffer, during the step only
    balancer.step()
    assert balancer._forget is None
    assert [p.grad.data_ptr() for p in params] == storage


def test_amortized_mode_refreshes_every_k_steps():
    net, x, a = make()
    calls = []

    def backward(tensor, **kwargs):
        calls.append(kwargs)
        tensor.backward(**kwargs)

    balancer = NormBalancer(net.parameters(), every=3, backward=backward)
    params = [p for p in net.parameters() if p.requires_grad]
    refreshed, held = [], None
    for step in range(7):
        for p in params:
            p.grad = None
        calls.clear()
        if step % 3 != 0:
            g_keep = torch.autograd.grad(terms(net, x, a)[0], params, allow_unused=True)
            g_forget = torch.autograd.grad(terms(net, x, a)[1], params, allow_unused=True)
        balancer.backward(*terms(net, x, a))
        stats = balancer.step()
        refreshed.append(stats.refreshed)
        assert len(calls) == (2 if stats.refreshed else 1)
        if stats.refreshed:
            held = stats.coefficient
        else:
            assert stats.coefficient is held and stats.keep_norm is None
            for p, k, f in zip(params, g_keep, g_forget, strict=True):
                if k is None and f is None:
                    continue
                expected = (0 if k is None else k) - held * (0 if f is None else f)
                torch.testing.assert_close(p.grad, expected)
    assert refreshed == [True, False, False, True, False, False, True]


def test_amortized_step_skips_non_finite_gradients():
    net, x, a = make()
    balancer = NormBalancer(net.parameters(), every=5)
    balancer.backward(*terms(net, x, a))
    balancer.step()
    keep, forget = terms(net, x, a)
    balancer.backward(keep * float("nan"), forget)
    stats = balancer.step()
    assert stats.skipped and not stats.refreshed
    assert all(p.grad is None for p in net.parameters())


def test_fixed_superfactor_path_is_a_plain_backward():
    """Without a balancer the loss's own superfactor applies: one backward of keep - s forget."""
    net, x, a = make()
    keep, forget = terms(net, x, a)
    (keep - 0.3 * forget).backward()
    plain = [p.grad.clone() for p in net.parameters() if p.grad is not None]
    net.zero_grad(set_to_none=True)
    balancer = NormBalancer(net.parameters(), mode="clip", ratio=1e9, superfactor=0.3)
    balancer.backward(*terms(net, x, a))
    balancer.step()
    for p, expected in zip([p for p in net.parameters() if p.grad is not None], plain, strict=True):
        torch.testing.assert_close(p.grad, expected)


def test_float32_model():
    net, x, a = make(dtype=torch.float32)
    _, stats = balanced(net, [(x, a)])
    assert stats.coefficient.dtype == torch.float32
    assert (stats.coefficient * stats.forget_norm / stats.keep_norm).item() == pytest.approx(
        RATIO, rel=1e-5
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "norm"}, "`mode`"),
        ({"ratio": -0.1}, "`ratio`"),
        ({"mode": "absolute"}, "`target_norm`"),
        ({"target_norm": 3.0}, "`target_norm` is used by mode='absolute'"),
        ({"every": 0}, "`every`"),
        ({"eps": 0.0}, "`eps`"),
        ({"superfactor": float("inf")}, "`superfactor`"),
    ],
)
def test_bad_configuration_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NormBalancer(nn.Linear(2, 2).parameters(), **kwargs)


def test_bad_use_raises():
    with pytest.raises(ValueError, match="requires_grad=True"):
        NormBalancer([nn.Parameter(torch.ones(2), requires_grad=False)])
    net, x, _a = make()
    balancer = NormBalancer(net.parameters())
    with pytest.raises(RuntimeError, match="without a backward"):
        balancer.step()
    out = net(x)
    with pytest.raises(ValueError, match="`keep` must be a scalar"):
        balancer.backward(out.square().mean(1), out.mean())
    with pytest.raises(ValueError, match="`forget` does not require grad"):
        balancer.backward(out.square().mean(), torch.tensor(1.0))


def test_grad_scaler_recipe_recovers_from_overflow():
    """The documented fp16 recipe: a skipped step lowers the scale until gradients are finite."""
    net, x, a = make(dtype=torch.float32)
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**70, growth_interval=1000)
    balancer = NormBalancer(
        net.parameters(), backward=lambda t, **kw: scaler.scale(t).backward(**kw)
    )
    history = []
    for _ in range(200):
        balancer.backward(*terms(net, x, a))
        stats = balancer.step()
        history.append(stats.skipped)
        if stats.skipped:
            scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
        else:
            scaler.step(optimizer)
            scaler.update()
            break
        optimizer.zero_grad(set_to_none=True)
    assert history[0] and not history[-1]
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def test_bfloat16_gradients_are_normed_in_float32():
    net, x, a = make(dtype=torch.bfloat16)
    _, stats = balanced(net, [(x, a)])
    assert stats.keep_norm.dtype == torch.float32 and not stats.skipped
    assert all(p.grad.dtype == torch.bfloat16 for p in net.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", ["siss", "siss-nois", "erasediff"])
def test_with_the_library_losses(alphas_cumprod, name):
    from siss.registry import make_loss

    torch.manual_seed(0)
    model = nn.Conv2d(2, 2, 3, padding=1)
    loss_fn = make_loss(name, alphas_cumprod, superfactor=0.5)
    x0, a0 = torch.randn(4, 2, 5, 5), torch.randn(1, 2, 5, 5)
    draw = loss_fn.sample(x0, a0, generator=torch.Generator().manual_seed(0))
    terms = loss_fn.terms(model(draw.noisy), draw)
    balancer = NormBalancer(model.parameters(), ratio=0.2)
    balancer.backward(terms.keep, terms.forget)
    stats = balancer.step()
    assert (stats.coefficient * stats.forget_norm / stats.keep_norm).item() == pytest.approx(0.2)


# --- Reliability review: coefficients never held from a step that could not measure them ---


def _zero_forget_terms(net, x, a):
    keep, forget = terms(net, x, a)
    return keep, forget * 0  # connected zero: a batch with no forget rows (w_a = 0 at low t)


@pytest.mark.parametrize("mode", MODES)
def test_unmeasurable_refresh_is_not_held(mode):
    """A refresh whose forget gradient is zero uses c = 0 and refreshes again next step.

    Before the fix, ``fix`` held ``0.1 ||g_keep|| / 1e-12`` for the K-1 amortized steps after it
    and the next step's gradient norm grew from ~1 to ~1e11.
    """
    net, x, a = make()
    balancer = NormBalancer(net.parameters(), mode=mode, every=4, **options(mode))
    balancer.backward(*_zero_forget_terms(net, x, a))
    first = balancer.step()
    assert not first.skipped and first.refreshed and not first.measured
    assert first.coefficient.item() == 0.0
    assert balancer.coefficient is None  # nothing held from a step that could not measure it
    keep_only = [p.grad.clone() for p in net.parameters() if p.grad is not None]
    reached = [p for p in net.parameters() if p.grad is not None]
    g_keep = torch.autograd.grad(terms(net, x, a)[0], reached, allow_unused=True)
    for got, expected in zip(keep_only, g_keep, strict=True):
        torch.testing.assert_close(got, torch.zeros_like(got) if expected is None else expected)
    net.zero_grad(set_to_none=True)
    balancer.backward(*terms(net, x, a))
    second = balancer.step()  # refreshes again: it must not amortize with an unmeasured c
    assert second.refreshed and second.measured
    expected, c, _, _ = brute_force(net, [(x, a)], mode, **options(mode))
    assert second.coefficient.item() == pytest.approx(c, rel=1e-9)


@pytest.mark.parametrize("mode", MODES)
def test_unmeasurable_refresh_keeps_the_last_good_coefficient(mode):
    net, x, a = make()
    balancer = NormBalancer(net.parameters(), mode=mode, every=2, **options(mode))
    balancer.backward(*terms(net, x, a))
    good = balancer.step().coefficient
    net.zero_grad(set_to_none=True)
    balancer.backward(*terms(net, x, a))
    assert not balancer.step().refreshed
    net.zero_grad(set_to_none=True)
    balancer.backward(*_zero_forget_terms(net, x, a))
    stats = balancer.step()
    assert stats.refreshed and not stats.measured and stats.coefficient.item() == 0.0
    assert balancer.coefficient is good
    net.zero_grad(set_to_none=True)
    balancer.backward(*terms(net, x, a))
    assert balancer.step().refreshed  # again, until a step measures one


@pytest.mark.parametrize("mode", ["fix", "clip", "bilevel"])
def test_rounding_noise_forget_gradient_counts_as_zero(mode):
    """||g_forget|| = 1e-12 ||g_keep|| is rounding noise: c = 0, not a 1e11 rescaling of it."""
    net, x, a = make()
    balancer = NormBalancer(net.parameters(), mode=mode, **options(mode))
    keep, forget = terms(net, x, a, forget_scale=1e-12)
    balancer.backward(keep, forget)
    stats = balancer.step()
    assert not stats.measured and stats.coefficient.item() == 0.0
    assert stats.forget_norm.item() < balancer.floor * stats.keep_norm.item()


def test_forget_gradient_above_the_floor_is_measured():
    net, x, a = make()
    balancer = NormBalancer(net.parameters())
    keep, forget = terms(net, x, a, forget_scale=1e-4)
    balancer.backward(keep, forget)
    stats = balancer.step()
    assert stats.measured
    assert (stats.coefficient * stats.forget_norm / stats.keep_norm).item() == pytest.approx(RATIO)


def test_bare_tensor_params_raise():
    """torch.optim raises here; iterating a tensor's rows would silently drop the forget grad."""
    weight = nn.Parameter(torch.randn(3, 2))
    with pytest.raises(TypeError, match="`params`"):
        NormBalancer(weight)
    with pytest.raises(TypeError, match="`params`"):
        NormBalancer([weight, "bias"])


def _checkpointed(use_reentrant):
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    head = nn.Linear(4, 4).double()

    def forward(inputs):
        hidden = checkpoint(body, inputs, use_reentrant=use_reentrant)
        return head(hidden)

    return nn.ModuleList([body, head]), forward


def test_non_reentrant_checkpointing_is_exact():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 4, generator=g, dtype=torch.float64, requires_grad=True)
    modules, forward = _checkpointed(use_reentrant=False)
    params = list(modules.parameters())
    out = forward(x)
    keep, forget = out.square().mean(), out.sin().mean()
    g_keep = torch.autograd.grad(keep, params, retain_graph=True)
    g_forget = torch.autograd.grad(forget, params)
    balancer = NormBalancer(params)
    out = forward(x)
    balancer.backward(out.square().mean(), out.sin().mean())
    stats = balancer.step()
    keep_norm = torch.linalg.vector_norm(torch.cat([t.flatten() for t in g_keep]))
    forget_norm = torch.linalg.vector_norm(torch.cat([t.flatten() for t in g_forget]))
    c = RATIO * keep_norm / forget_norm
    assert stats.coefficient.item() == pytest.approx(c.item(), rel=1e-9)
    for p, k, f in zip(params, g_keep, g_forget, strict=True):
        torch.testing.assert_close(p.grad, k - c * f)


def test_reentrant_checkpointing_raises_with_the_fix():
    """Reentrant checkpointing hides its parameters from ``backward(inputs=...)``: before the
    fix c came out 0.1316 instead of 0.1182 and the gradients were off by 5e-2."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 4, generator=g, dtype=torch.float64, requires_grad=True)
    modules, forward = _checkpointed(use_reentrant=True)
    balancer = NormBalancer(modules.parameters())
    out = forward(x)
    with pytest.raises(ValueError, match="use_reentrant=False"):
        balancer.backward(out.square().mean(), out.sin().mean())


def test_bilevel_dot_product_in_float64_for_a_float64_model():
    """The bilevel rule's <g_keep, g_forget> must be accumulated at the model's precision."""
    params = [nn.Parameter(torch.zeros(4096, dtype=torch.float64))]
    g = torch.Generator().manual_seed(0)
    base = 1.0 + torch.rand(4096, generator=g, dtype=torch.float64)
    keep_grad = base + 1e-9 * torch.randn(4096, generator=g, dtype=torch.float64)
    forget_grad = base.clone()
    balancer = NormBalancer(params, mode="bilevel", eta=0.0)
    balancer.backward((params[0] * keep_grad).sum(), (params[0] * forget_grad).sum())
    stats = balancer.step()
    dot = float((keep_grad * forget_grad).sum())
    expected = max(dot / float((forget_grad * forget_grad).sum()), 0.0)
    assert stats.coefficient.dtype == torch.float64
    assert stats.coefficient.item() == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_median_gradient_norm_is_the_median_of_the_global_norms():
    from siss.functional import median_gradient_norm

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2).double()
    batches = [torch.randn(6, 4, dtype=torch.float64) * scale for scale in (1, 5, 2, 9, 3)]
    expected = []
    for x in batches:
        grads = torch.autograd.grad(model(x).square().mean(), list(model.parameters()))
        expected.append(torch.cat([g.flatten() for g in grads]).norm().item())
    got = median_gradient_norm(model.parameters(), (model(x).square().mean() for x in batches))
    assert got == pytest.approx(sorted(expected)[2], rel=1e-12)
    assert all(p.grad is None for p in model.parameters())  # .grad untouched


def test_median_gradient_norm_errors_name_the_problem():
    from siss.functional import median_gradient_norm

    model = torch.nn.Linear(3, 1)
    with pytest.raises(ValueError, match="at least one loss"):
        median_gradient_norm(model.parameters(), iter([]))
    with pytest.raises(ValueError, match="item 0 is not one"):
        median_gradient_norm(model.parameters(), [model(torch.randn(4, 3))])
    with pytest.raises(ValueError, match="not finite"):
        median_gradient_norm(model.parameters(), [model(torch.full((1, 3), float("nan"))).sum()])
