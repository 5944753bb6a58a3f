"""make_loss: every name builds its class, kwargs pass through, unknown names fail clearly."""

import pytest
import torch

from siss import NoiseSchedule, ReTrackLoss, SISSLoss
from siss.baselines import EraseDiffLoss, NaiveDeletionLoss, NegGradLoss, SISSNoISLoss
from siss.losses import UnlearningLoss
from siss.registry import METHODS, make_loss

EXPECTED = {
    "siss": SISSLoss,
    "siss-nois": SISSNoISLoss,
    "naive": NaiveDeletionLoss,
    "neggrad": NegGradLoss,
    "erasediff": EraseDiffLoss,
    "retrack": ReTrackLoss,
}

# SISS and SISS (No IS) take no default superfactor; the baselines' defaults are their methods'.
SUPERFACTOR = {"siss": {"superfactor": 0.1}, "siss-nois": {"superfactor": 0.1}}


def test_methods_are_the_papers_and_retrack():
    assert METHODS == tuple(EXPECTED)


@pytest.mark.parametrize("name", METHODS)
def test_each_name_builds_its_class_and_runs(alphas_cumprod, name):
    loss_fn = make_loss(name, alphas_cumprod, reduction="sum", **SUPERFACTOR.get(name, {}))
    assert type(loss_fn) is EXPECTED[name] and isinstance(loss_fn, UnlearningLoss)
    assert loss_fn.reduction == "sum"
    x0, a0 = torch.randn(4, 3), torch.randn(4, 3)
    draw = loss_fn.sample(x0, a0, generator=torch.Generator().manual_seed(0))
    out = torch.zeros_like(draw.noisy, requires_grad=True)
    loss_fn(out, draw).backward()
    assert torch.isfinite(out.grad).all()


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_lambda_ablations_are_siss_variants(alphas_cumprod, lam):
    loss_fn = make_loss("siss", alphas_cumprod, lam=lam, superfactor=0.2)
    assert isinstance(loss_fn, SISSLoss) and loss_fn.lam == lam and loss_fn.superfactor == 0.2


def test_schedule_and_keywords_pass_through(alphas_cumprod):
    schedule = NoiseSchedule.from_alphas_cumprod(alphas_cumprod)
    loss_fn = make_loss("siss-nois", schedule, superfactor=0.5, n=10, k=2, x_from="all")
    assert loss_fn.schedule is schedule
    assert (loss_fn.superfactor, loss_fn.n, loss_fn.k, loss_fn.x_from) == (0.5, 10, 2, "all")


def test_unknown_name_lists_the_methods(alphas_cumprod):
    with pytest.raises(
        ValueError, match=r"unknown unlearning method 'sis'.*'siss-nois'.*'erasediff'"
    ):
        make_loss("sis", alphas_cumprod)
    with pytest.raises(ValueError, match="unknown unlearning method"):
        make_loss(["siss"], alphas_cumprod)


def test_arguments_a_method_does_not_take_raise(alphas_cumprod):
    with pytest.raises(TypeError, match="lam"):
        make_loss("naive", alphas_cumprod, lam=0.5)
    with pytest.raises(ValueError, match="`lam`"):
        make_loss("siss", alphas_cumprod, lam=2.0, superfactor=0.1)
