"""NormBalancer under two-process DistributedDataParallel on the CPU (gloo backend).

Each rank holds half of a batch; the balanced gradient on every rank must equal the single-process
result on the concatenated batch, i.e. the norms and ``c`` must be those of the globally reduced
gradients. The forget backward happens after DDP's reduction, so the balancer all-reduces it
itself; a balancer that did not would see per-rank norms and fail here. Scenarios: one micro-batch,
and two micro-batches with ``no_sync`` on the first (gradient accumulation), in ``fix`` and
``bilevel`` modes, plus an amortized step.
"""

import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from siss.balancer import NormBalancer

WORLD = 2
ROWS = 8  # per rank
SCENARIOS = [("fix", 1), ("fix", 2), ("bilevel", 2)]


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 4)).double()


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(WORLD * ROWS, 4, generator=g, dtype=torch.float64)
    a = torch.randn(WORLD * ROWS, 4, generator=g, dtype=torch.float64)
    return x, a


def terms(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, scale: float):
    """Mean-reduced keep and forget terms of one forward pass over ``torch.cat([x, a])``."""
    keep = (out[: len(x)] - x).square().mean()
    forget = (out[len(x) :] + a).square().mean()
    return scale * keep, scale * forget


def run_steps(model, forward, x, a, mode, micro_batches, no_sync, sync=None):
    """One balanced optimizer step over ``micro_batches`` micro-batches; returns the grads."""
    balancer = NormBalancer(model.parameters(), mode=mode, sync=sync)
    for i, (xs, as_) in enumerate(zip(x.chunk(micro_batches), a.chunk(micro_batches), strict=True)):
        last = i == micro_batches - 1
        with no_sync() if not last else _nullcontext():
            out = forward(torch.cat([xs, as_]))
            balancer.backward(*terms(out, xs, as_, 1.0 / micro_batches))
    stats = balancer.step()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads, stats


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *args):
        return False


def single_process_reference(mode, micro_batches):
    model = make_model()
    x, a = make_data()
    # the global batch of micro-batch i is the concatenation of every rank's micro-batch i
    xs = [c.chunk(micro_batches) for c in x.chunk(WORLD)]
    as_ = [c.chunk(micro_batches) for c in a.chunk(WORLD)]
    x_global = torch.cat(
        [torch.cat([xs[r][i] for r in range(WORLD)]) for i in range(micro_batches)]
    )
    a_global = torch.cat(
        [torch.cat([as_[r][i] for r in range(WORLD)]) for i in range(micro_batches)]
    )
    grads, stats = run_steps(model, model, x_global, a_global, mode, micro_batches, _nullcontext)
    return grads, stats.coefficient


def worker(rank: int, port: int, path: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120)
    )
    try:
        model = make_model()
        ddp = DistributedDataParallel(model)
        x, a = make_data()
        x, a = x.chunk(WORLD)[rank], a.chunk(WORLD)[rank]
        results = {}
        for mode, micro_batches in SCENARIOS:
            grads, stats = run_steps(model, ddp, x, a, mode, micro_batches, ddp.no_sync)
            results[(mode, micro_batches)] = (grads, stats.coefficient)
        # control: without reducing the forget gradient, c is a per-rank number
        unsynced = run_steps(model, ddp, x, a, "fix", 1, ddp.no_sync, sync=False)
        results["unsynced"] = unsynced[1].coefficient
        # amortized: refresh, then one single-backward step with the held c, all through DDP
        balancer = NormBalancer(model.parameters(), every=2)
        for _ in range(2):
            out = ddp(torch.cat([x, a]))
            balancer.backward(*terms(out, x, a, 1.0))
            stats = balancer.step()
            grads = [p.grad.detach().clone() for p in model.parameters()]
            model.zero_grad(set_to_none=True)
        results["amortized"] = (grads, stats.coefficient, stats.refreshed)
        torch.save(results, f"{path}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_balanced_gradient_matches_single_process(tmp_path):
    for attempt in range(3):  # a fresh port each time: another process may grab a free port
        try:
            mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
            break
        except (mp.ProcessRaisedException, mp.ProcessExitedException):
            if attempt == 2:
                raise
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for mode, micro_batches in SCENARIOS:
        expected, c = single_process_reference(mode, micro_batches)
        for results in ranks:
            grads, c_rank = results[(mode, micro_batches)]
            torch.testing.assert_close(c_rank, c)
            for g, e in zip(grads, expected, strict=True):
                torch.testing.assert_close(g, e)
    _, c = single_process_reference("fix", 1)
    assert not any(torch.allclose(results["unsynced"], c) for results in ranks)
    # amortized step: keep - c forget through DDP's own reduction, with the c of the refresh
    model = make_model()
    x, a = make_data()
    out = model(torch.cat([x, a]))
    keep, forget = terms(out, x, a, 1.0)
    expected = torch.autograd.grad(keep - c * forget, list(model.parameters()))
    for results in ranks:
        grads, c_rank, refreshed = results["amortized"]
        assert not refreshed
        torch.testing.assert_close(c_rank, c)
        for g, e in zip(grads, expected, strict=True):
            torch.testing.assert_close(g, e)
