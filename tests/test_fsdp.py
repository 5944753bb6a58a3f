"""NormBalancer and the Unlearner under two-process FSDP2 (``fully_shard``) on the CPU (gloo).

Each rank holds half of a batch and a shard of every parameter and gradient (``DTensor``,
``Shard(0)``; the model's widths are odd so that the shards are uneven). FSDP reduce-scatters every
backward, the forget one included, so the balancer computes the norms from the local shards: each
rank's squared partial sums (and the dot product in ``bilevel`` mode) in one all-reduce. The
balanced gradient, gathered here for the comparison only, must equal the single-process result
on the concatenated batch, in float64; a balancer that did not reduce the partial sums
(``sync=False``) sees per-rank norms and fails that comparison.

Collectives are counted by a ``TorchDispatchMode``, which sees every c10d collective at the
dispatcher (FSDP's all-gathers and reduce-scatters included, not only ``dist.all_reduce``): the
balancer's ``step`` makes exactly one all-reduce, on a refresh and on an amortized step alike,
and the refresh's backward makes only FSDP's own collectives (twice the reduce-scatters of an
amortized backward: the forget backward is reduced too).

Scenarios: a plain MLP (``fix`` with one and two micro-batches, ``bilevel`` with two, an
amortized step), a peft LoRA of it (only the adapters train), and the ``Unlearner`` recipe on a
tiny diffusers UNet (teacher keep target, calibrated ``absolute`` balancer, AdamW, gradient
clipping), sharded and under DDP on the same ranks with the same draws, whose trained weights must
agree: with a full model (the teacher built before sharding and sharded too) and with a LoRA
(the teacher is the base with the adapters disabled). accelerate's FSDP cannot run on the CPU
(docs/sharded.md), so the recipe is driven without an ``Accelerator`` here.
"""

import datetime
import os
import socket
import warnings
from collections import Counter

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_ddp import WORLD, make_data, terms  # the DDP test's batch and loss terms
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from siss.balancer import NormBalancer

fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard"):  # pragma: no cover - torch < 2.6
    pytest.skip("torch without FSDP2 (fully_shard)", allow_module_level=True)

SCENARIOS = [("fix", 1), ("fix", 2), ("bilevel", 2)]
ALL_REDUCE = "c10d.allreduce_"
REDUCE_SCATTER = "c10d._reduce_scatter_base_"


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 15), nn.Tanh(), nn.Linear(15, 4)).double()


def make_lora() -> nn.Module:
    from peft import LoraConfig, get_peft_model

    model = make_model()
    torch.manual_seed(1)  # init_lora_weights=False: random A and B, so both get gradient
    config = LoraConfig(r=3, lora_alpha=3, target_modules=["0", "2"], init_lora_weights=False)
    return get_peft_model(model, config)


def shard_mlp(model: nn.Module) -> nn.Module:
    """``fully_shard`` each Linear (a LoRA's wrapped Linear with its adapters), then the root."""
    from torch.distributed.fsdp import fully_shard

    body = model.base_model.model if hasattr(model, "base_model") else model
    fully_shard(body[0])
    fully_shard(body[2])
    fully_shard(model)
    return model


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (gathered: for the test's comparison only)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


class Collectives(TorchDispatchMode):
    """Count the c10d collectives dispatched in the block (FSDP's and the balancer's alike), by
    name: ``{"c10d.allreduce_": 1}``."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("c10d", "_c10d_functional"):
            self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def run_steps(model, x, a, mode, micro_batches, sync=None, every=1, steps=1):
    """``steps`` balanced optimizer steps over ``micro_batches`` micro-batches each; returns the
    last step's whole gradients, its stats, and the collectives of each step's backward passes
    and of its ``balancer.step()``."""
    balancer = NormBalancer(trainable(model), mode=mode, sync=sync, every=every)
    comms = []
    for _ in range(steps):
        with Collectives() as backward_comms:
            chunks = zip(x.chunk(micro_batches), a.chunk(micro_batches), strict=True)
            for xs, as_ in chunks:
                out = model(torch.cat([xs, as_]))
                balancer.backward(*terms(out, xs, as_, 1.0 / micro_batches))
        with Collectives() as step_comms:
            stats = balancer.step()
        comms.append((dict(backward_comms.counts), dict(step_comms.counts)))
        grads = [full(p.grad).detach().clone() for p in trainable(model)]
        model.zero_grad(set_to_none=True)
    return grads, stats, comms


def global_batch(micro_batches: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Micro-batch ``i`` of the global batch: every rank's micro-batch ``i``, concatenated."""
    x, a = make_data()
    xs = [c.chunk(micro_batches) for c in x.chunk(WORLD)]
    as_ = [c.chunk(micro_batches) for c in a.chunk(WORLD)]
    x_global = torch.cat(
        [torch.cat([xs[r][i] for r in range(WORLD)]) for i in range(micro_batches)]
    )
    a_global = torch.cat(
        [torch.cat([as_[r][i] for r in range(WORLD)]) for i in range(micro_batches)]
    )
    return x_global, a_global


def mlp_results(rank: int, build) -> dict:
    x, a = make_data()
    x, a = x.chunk(WORLD)[rank], a.chunk(WORLD)[rank]
    model = shard_mlp(build())
    with pytest.raises(ValueError, match="mixes sharded"):
        NormBalancer([*model.parameters(), nn.Parameter(torch.zeros(1))])
    results = {}
    for mode, micro_batches in SCENARIOS:
        grads, stats, comms = run_steps(model, x, a, mode, micro_batches)
        results[(mode, micro_batches)] = (grads, stats.coefficient, comms)
    results["unsynced"] = run_steps(model, x, a, "fix", 1, sync=False)[1].coefficient
    grads, stats, comms = run_steps(model, x, a, "fix", 1, every=2, steps=2)
    results["amortized"] = (grads, stats.coefficient, stats.refreshed, comms)
    return results


def unlearner_results(rank: int) -> dict:
    """Two training steps (after one calibration batch) of the recipe, sharded and under DDP."""
    from diffusers import DDPMScheduler
    from peft import LoraConfig, get_peft_model
    from torch.nn.parallel import DistributedDataParallel

    from siss.recipe import Unlearner, UnlearningConfig, teacher_for

    calibrated = UnlearningConfig(calibration_batches=1, max_train_steps=3, learning_rate=1e-3)
    # no calibration: the teacher's (no-grad) forward is the sharded model's very first
    teacher_first = UnlearningConfig(
        balance_mode="fix", balance_every=1, max_train_steps=3, learning_rate=1e-3
    )
    cases = {
        "full": (False, calibrated),
        "lora": (True, calibrated),
        "lora-first": (True, teacher_first),
    }
    g = torch.Generator().manual_seed(2)
    keep = torch.randn(WORLD * 2, 1, 8, 8, generator=g, dtype=torch.float64).chunk(WORLD)[rank]
    forget = torch.randn(1, 1, 8, 8, generator=g, dtype=torch.float64)
    results = {}
    for case, (lora, config) in cases.items():
        trained = []
        for sharded in (True, False):
            unet = make_unet()
            if lora:
                torch.manual_seed(3)
                # peft's default init (B = 0): the adapters-disabled model is the model before
                # unlearning, so the teacher is the base (a trained LoRA's would be a copy)
                config_lora = LoraConfig(r=2, target_modules=["conv1", "conv2"])
                unet = get_peft_model(unet, config_lora)
            teacher = None
            if sharded:
                if not lora:  # a full model's teacher: copied before sharding, sharded too
                    teacher = teacher_for(unet)
                    shard_unet(teacher.model)
                shard_unet(unet)
                if not lora:
                    with pytest.raises(ValueError, match="before sharding"):
                        teacher_for(unet)
                model = unet
            else:
                model = DistributedDataParallel(unet)
            unlearner = Unlearner(model, DDPMScheduler(), config, n=101, k=1, teacher=teacher)
            stats = [unlearner.step(keep, forget).stats for _ in range(3)]
            trained_stats = stats[1:] if config.calibrated else stats
            assert all(s is not None and not s.skipped for s in trained_stats)
            trained.append(
                (
                    [full(p).detach().clone() for p in trainable(unet)],
                    [s.coefficient for s in trained_stats],
                    unlearner.scale,
                )
            )
        results[("unlearner", case)] = trained
    return results


def make_unet() -> nn.Module:
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 8),
        norm_num_groups=4,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ).double()


def shard_unet(unet: nn.Module) -> None:
    """FSDP units: each down and up block, then the root (the rest)."""
    from torch.distributed.fsdp import fully_shard

    inner = unet.base_model.model if hasattr(unet, "base_model") else unet  # a peft LoRA's UNet
    for block in [*inner.down_blocks, *inner.up_blocks]:
        fully_shard(block)
    fully_shard(unet)


def worker(rank: int, port: int, path: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module")
    dist.init_process_group(
        "gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120)
    )
    try:
        results = {"mlp": mlp_results(rank, make_model), "lora": mlp_results(rank, make_lora)}
        results.update(unlearner_results(rank))
        torch.save(results, f"{path}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    pytest.importorskip("peft")
    pytest.importorskip("diffusers")
    path = tmp_path_factory.mktemp("fsdp")
    for attempt in range(3):  # a fresh port each time: another process may grab a free port
        try:
            mp.spawn(worker, args=(free_port(), str(path)), nprocs=WORLD, join=True)
            break
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as error:
            if attempt == 2 or "address already in use" not in str(error).lower():
                raise
    return [torch.load(path / f"rank{r}.pt") for r in range(WORLD)]


def single_process(build, mode, micro_batches):
    model = build()
    x, a = global_batch(micro_batches)
    grads, stats, _ = run_steps(model, x, a, mode, micro_batches)
    return grads, stats.coefficient


pytestmark = pytest.mark.skipif(not dist.is_available(), reason="no torch.distributed")


@pytest.mark.parametrize("name", ["mlp", "lora"])
def test_balanced_gradient_matches_single_process(ranks, name):
    build = make_model if name == "mlp" else make_lora
    for mode, micro_batches in SCENARIOS:
        expected, c = single_process(build, mode, micro_batches)
        for results in ranks:
            grads, c_rank, _ = results[name][(mode, micro_batches)]
            torch.testing.assert_close(c_rank, c)
            assert len(grads) == len(expected)
            for g, e in zip(grads, expected, strict=True):
                torch.testing.assert_close(g, e)
    # control: without the partial sums' all-reduce, c is a per-rank (per-shard) number
    _, c = single_process(build, "fix", 1)
    assert not any(torch.allclose(results[name]["unsynced"], c) for results in ranks)


@pytest.mark.parametrize("name", ["mlp", "lora"])
def test_amortized_step_matches_single_process(ranks, name):
    build = make_model if name == "mlp" else make_lora
    _, c = single_process(build, "fix", 1)
    model = build()
    x, a = make_data()
    keep, forget = terms(model(torch.cat([x, a])), x, a, 1.0)
    expected = torch.autograd.grad(keep - c * forget, trainable(model))
    for results in ranks:
        grads, c_rank, refreshed, _ = results[name]["amortized"]
        assert not refreshed
        torch.testing.assert_close(c_rank, c)
        for g, e in zip(grads, expected, strict=True):
            torch.testing.assert_close(g, e)


@pytest.mark.parametrize("name", ["mlp", "lora"])
def test_one_collective_per_balancer_step(ranks, name):
    for results in ranks:
        for mode, micro_batches in SCENARIOS:
            [(backward, step)] = results[name][(mode, micro_batches)][2]
            assert step == {ALL_REDUCE: 1}, (mode, micro_batches, step)
            assert ALL_REDUCE not in backward, backward  # FSDP's own collectives only
        (refresh_backward, refresh_step), (amortized_backward, amortized_step) = results[name][
            "amortized"
        ][3]
        assert refresh_step == {ALL_REDUCE: 1} and amortized_step == {ALL_REDUCE: 1}
        # the forget backward is reduce-scattered by FSDP too: twice an amortized backward's
        assert refresh_backward[REDUCE_SCATTER] == 2 * amortized_backward[REDUCE_SCATTER] > 0


@pytest.mark.parametrize("case", ["full", "lora", "lora-first"])
def test_unlearner_sharded_matches_ddp(ranks, case):
    for results in ranks:
        (sharded, c_sharded, scale_sharded), (ddp, c_ddp, scale_ddp) = results[("unlearner", case)]
        assert (scale_sharded is None) == (scale_ddp is None)  # calibrated or not
        if scale_ddp is not None:
            assert scale_sharded == pytest.approx(scale_ddp, rel=1e-12)
        torch.testing.assert_close(c_sharded, c_ddp)
        assert len(sharded) == len(ddp)
        for s, d in zip(sharded, ddp, strict=True):
            torch.testing.assert_close(s, d)
    # the ranks agree (FSDP gathers the same whole weights on both)
    first, second = (results[("unlearner", case)][0][0] for results in ranks)
    for s, d in zip(first, second, strict=True):
        torch.testing.assert_close(s, d, rtol=0, atol=0)
