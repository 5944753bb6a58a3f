"""``torch.compile`` sees the SISS loss as one graph: no graph break in sampling or the loss."""

import pytest
import torch

from siss import NoiseSchedule, SISSLoss
from siss.baselines import SISSNoISLoss

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("loss_class", [SISSLoss, SISSNoISLoss])
def test_sample_and_loss_trace_without_graph_breaks(loss_class, alphas_cumprod):
    kwargs = {"lam": 0.5} if loss_class is SISSLoss else {}
    loss_fn = loss_class(alphas_cumprod, superfactor=0.1, **kwargs)
    x0, a0 = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)

    def step(x0, a0):
        draw = loss_fn.sample(x0, a0)
        return loss_fn(draw.noisy.mul(0.5), draw)  # a stand-in for the model's output

    explanation = torch._dynamo.explain(step)(x0, a0)
    reasons = [str(reason.reason) for reason in explanation.break_reasons]
    assert explanation.graph_break_count == 0, reasons
    assert explanation.graph_count == 1


def test_compiled_loss_equals_eager(alphas_cumprod):
    """A whole-graph compile (``fullgraph=True``) gives the eager loss on the same random stream.
    (Dynamo cannot trace a ``torch.Generator`` argument: a compiled step draws from the global
    stream, seeded with ``torch.manual_seed``.)"""
    loss_fn = SISSLoss(NoiseSchedule.from_alphas_cumprod(alphas_cumprod), lam=0.5, superfactor=0.1)
    x0, a0 = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)

    def step(x0, a0):
        draw = loss_fn.sample(x0, a0)
        return loss_fn(draw.noisy.mul(0.5), draw)

    torch.manual_seed(3)
    eager = step(x0, a0)
    compiled = torch.compile(step, backend="eager", fullgraph=True)
    torch.manual_seed(3)
    assert torch.allclose(compiled(x0, a0), eager)
