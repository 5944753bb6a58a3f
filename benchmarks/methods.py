"""Cost of the unlearning methods and of the superfactor rule, measured side by side in one run.

Times six training steps of one small diffusers ``UNet2DModel`` (``DDPMScheduler``, AdamW) on the
same batch size ``B``, interleaved step by step in an order that rotates every round, so that
machine noise hits all alike; every round runs ``--unit`` steps of each (so the amortized balancer
with ``K = --unit`` does exactly one refresh per round) and records each one's mean step time:

* ``plain``     plain diffusers fine-tuning step (MSE on B noisy rows, one backward)
* ``siss``      SISS (λ = 0.5), fixed superfactor: one forward on B rows, one ``loss.backward()``
* ``siss-nois`` SISS (No IS): one forward on 2B rows (x_t and a_t), one ``loss.backward()``
* ``balanced``  SISS + ``NormBalancer`` (fix mode, ratio 0.1), exact every step: two backwards
* ``amortized`` SISS + ``NormBalancer(every=K)``: two backwards once per K steps, one otherwise
* ``teacher``   SISS with the teacher keep target: one forward of the recipe's frozen copy of the
  model (``teacher_for``) without gradient, then as ``balanced`` (``NormBalancer`` in absolute
  mode, exact every step)
* ``recipe``    ``siss.Unlearner`` with its defaults (teacher keep target under
  ``inference_mode``, the calibrated absolute balancer refreshed every
  ``DEFAULT_BALANCE_EVERY`` steps): the default a user gets, through the library's own step
* ``authors``   SISS + a re-implementation of the authors' gradient surgery: keep backward with
  ``retain_graph``, clone every ``.grad``, forget backward, subtract the clones, Python loops
  over the parameters for the norms and the combination (``.item()`` per parameter)

It prints medians and interquartile ranges of the per-round ratios, with the targets
SISS / SISS (No IS) <= 0.60, amortized / plain <= 1.10 and recipe / plain <= 1.35, and the peak
memory of each method
while it computes its final ``.grad`` (forward, backward passes, combination; the optimizer step,
identical for all and dominated by AdamW's own temporaries, is left out). Peak memory on CUDA is
``torch.cuda.max_memory_allocated`` (parameters and AdamW state included); on the CPU it is the
peak of live tensor storage bytes (parameters, gradients, activations, temporaries) recorded by
``torch.distributed._tools.mem_tracker.MemTracker``, a ``TorchDispatchMode`` that sees every
allocation and free of forward and backward; it runs in separate, untimed steps because the
tracker slows execution. At a small batch gradients rather than activations dominate, which is
where gradient copies show.

    python -m benchmarks.methods                    # CPU, 32x32x3, batch 16
    python -m benchmarks.methods --device cuda --batch-size 64 --resolution 64 --rounds 15
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from benchmarks.step_time import make_model  # the same small UNet2DModel as the step-time benchmark
from siss import SISSLoss, Unlearner, UnlearningConfig
from siss.balancer import NormBalancer
from siss.baselines import SISSNoISLoss
from siss.recipe import teacher_for

METHODS = ("plain", "siss", "siss-nois", "balanced", "amortized", "authors", "teacher", "recipe")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.methods",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--channels", type=int, nargs="+", default=[32, 64, 64])
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (one unit each)")
    parser.add_argument(
        "--unit", type=int, default=10, help="steps per method per round; also the amortized K"
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per method")
    parser.add_argument("--ratio", type=float, default=0.1, help="balancer ratio")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: steadier on a shared CPU)"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory steps")
    parser.add_argument(
        "--memory-batch-sizes",
        type=int,
        nargs="+",
        default=[8, 1],
        help="batch sizes of the peak-memory steps; at batch 1 gradients, not activations, "
        "dominate memory, which is where gradient copies show",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    return parser.parse_args(argv)


def authors_surgery(params: list[torch.nn.Parameter], keep, forget, ratio: float) -> None:
    """The authors' per-micro-batch gradient surgery, re-implemented (REFERENCE-NOTES):
    backward of keep (retain_graph), clone every .grad, backward of forget, subtract the clones,
    global norms and the combination by Python loops; here with c = ratio ||g_x|| / ||g_a||."""
    keep.backward(retain_graph=True)
    g_x = [p.grad.clone() for p in params]
    forget.backward()
    g_a = [p.grad.clone() - g for p, g in zip(params, g_x, strict=True)]
    norm_x = sum(g.norm().item() ** 2 for g in g_x) ** 0.5
    norm_a = sum(g.norm().item() ** 2 for g in g_a) ** 0.5
    # the authors divide unguarded; a batch with no forget row (w_a = 0) would raise here, so
    # the timing re-implementation takes c = 0 for it, as NormBalancer does
    scale = ratio * norm_x / norm_a if norm_a > 0 else 0.0
    for p, gx, ga in zip(params, g_x, g_a, strict=True):
        p.grad = gx - scale * ga


def build_steps(
    args: argparse.Namespace, batch_size: int, optimize: bool = True
) -> tuple[dict[str, Callable[[], None]], torch.nn.Module]:
    """One closure per method; ``optimize=False`` stops each after its gradients are final."""
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = make_model(args.channels, args.resolution, device)
    params = [p for p in model.parameters() if p.requires_grad]
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    # n, k: the teacher keep target needs the true k/(n-k); the timings do not depend on them
    siss = SISSLoss(scheduler.alphas_cumprod, lam=0.5, superfactor=0.1, n=1000, k=10).to(device)
    nois = SISSNoISLoss(scheduler.alphas_cumprod, superfactor=0.1).to(device)
    shape = (batch_size, 3, args.resolution, args.resolution)
    x0 = torch.rand(shape, device=device) * 2 - 1
    a0 = torch.rand(shape, device=device) * 2 - 1
    generator = torch.Generator(device).manual_seed(args.seed)
    exact = NormBalancer(params, ratio=args.ratio)
    amortized = NormBalancer(params, ratio=args.ratio, every=args.unit)
    absolute = NormBalancer(params, mode="absolute", target_norm=1e-2)
    teacher = teacher_for(model, channels_last=device.type == "cpu")  # as the recipe's own
    # The library's default recipe on the same model and optimizer; one calibration batch, which
    # the warm-up steps spend. No clipping and a constant lr, as the other methods.
    recipe = Unlearner(
        model,
        scheduler,
        UnlearningConfig(
            calibration_batches=1, max_grad_norm=0.0, lr_scheduler="constant", seed=args.seed
        ),
        n=1000,
        k=10,
        optimizer=optimizer,
    )

    def finish() -> None:
        if optimize:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def plain() -> None:
        noise = torch.randn(shape, device=device, generator=generator)
        timesteps = torch.randint(0, 1000, (shape[0],), device=device, generator=generator)
        noisy = scheduler.add_noise(x0, noise, timesteps)
        F.mse_loss(model(noisy, timesteps).sample.float(), noise.float()).backward()
        finish()

    def with_loss(loss_fn) -> Callable[[], None]:
        def step() -> None:
            draw = loss_fn.sample(x0, a0, generator=generator)
            loss_fn(model(draw.noisy, draw.timesteps).sample, draw).backward()
            finish()

        return step

    def with_terms(combine, teacher: Any = None) -> Callable[[], None]:
        def step() -> None:
            draw = siss.sample(x0, a0, generator=generator)
            extra = {}
            if teacher is not None:
                with torch.inference_mode():
                    extra["teacher_output"] = teacher.predict(draw.noisy, draw.timesteps)
            terms = siss.terms(model(draw.noisy, draw.timesteps).sample, draw, **extra)
            combine(terms.keep, terms.forget)
            finish()

        return step

    def balanced_with(balancer: NormBalancer) -> Callable[[object, object], None]:
        def combine(keep, forget) -> None:
            balancer.backward(keep, forget)
            balancer.step()

        return combine

    steps = {
        "plain": plain,
        "siss": with_loss(siss),
        "siss-nois": with_loss(nois),
        "balanced": with_terms(balanced_with(exact)),
        "amortized": with_terms(balanced_with(amortized)),
        "authors": with_terms(lambda k, f: authors_surgery(params, k, f, args.ratio)),
        "teacher": with_terms(balanced_with(absolute), teacher),
        "recipe": lambda: recipe.step(x0, a0),
    }
    return steps, model


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(
    step: Callable[[], None], device: torch.device, model: torch.nn.Module
) -> float | None:
    """Peak bytes while one step computes its final gradients (see the module docstring)."""
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        step()
        synchronize(device)
        return float(torch.cuda.max_memory_allocated(device))
    try:
        from torch.distributed._tools.mem_tracker import MemTracker
    except ImportError:  # pragma: no cover - torch without the tracker
        return None
    tracker = MemTracker()
    tracker.track_external(model)  # count the parameters, as max_memory_allocated does
    with tracker:
        step()
    snapshot = tracker.get_tracker_snapshot("peak")
    return float(sum(per_device.get("Total", 0) for per_device in snapshot.values()))


def spread(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    steps, model = build_steps(args, args.batch_size)
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in METHODS}
    for round_index in range(args.rounds):
        shift = round_index % len(METHODS)
        order = METHODS[shift:] + METHODS[:shift]
        spent = dict.fromkeys(METHODS, 0.0)
        for _ in range(args.unit):  # step by step: a shared host's drift hits every method alike
            for name in order:
                synchronize(device)
                start = time.perf_counter()
                steps[name]()
                synchronize(device)
                spent[name] += time.perf_counter() - start
        for name in METHODS:
            times[name].append(spent[name] / args.unit)

    def ratio(top: str, bottom: str) -> dict:
        per_round = [t / b for t, b in zip(times[top], times[bottom], strict=True)]
        return {"median": statistics.median(per_round), "iqr": spread(per_round)}

    memory: dict[int, dict[str, float | None]] = {}
    for batch_size in [] if args.no_memory else args.memory_batch_sizes:
        memory_steps, memory_model = build_steps(args, batch_size, optimize=False)
        memory[batch_size] = {}
        for name in METHODS:
            if name in ("amortized", "recipe"):
                continue  # refresh steps are "balanced"/"teacher" steps, the others one backward
            memory_steps[name]()  # warm-up outside the measured step
            memory[batch_size][name] = peak_memory(memory_steps[name], device, memory_model)
        del memory_steps
    result = {
        "device": str(device),
        "batch": [args.batch_size, 3, args.resolution, args.resolution],
        "parameters": sum(p.numel() for p in model.parameters()),
        "rounds": args.rounds,
        "unit": args.unit,
        "step_ms": {
            name: {"median": 1e3 * statistics.median(v), "iqr": [1e3 * q for q in spread(v)]}
            for name, v in times.items()
        },
        "ratios": {
            "siss / siss-nois": ratio("siss", "siss-nois"),
            "siss / plain": ratio("siss", "plain"),
            "balanced / plain": ratio("balanced", "plain"),
            "amortized / plain": ratio("amortized", "plain"),
            "authors / plain": ratio("authors", "plain"),
            "balanced / authors": ratio("balanced", "authors"),
            "teacher / balanced": ratio("teacher", "balanced"),
            "teacher / plain": ratio("teacher", "plain"),
            "recipe / plain": ratio("recipe", "plain"),
        },
        "peak_memory_mib": {
            batch: {k: None if v is None else v / 2**20 for k, v in per.items()}
            for batch, per in memory.items()
        },
        "memory_method": "torch.cuda.max_memory_allocated"
        if device.type == "cuda"
        else "MemTracker (TorchDispatchMode) peak of live tensor bytes",
    }
    if args.json:
        print(json.dumps(result))
        return result
    print(
        f"device {device}, batch {tuple(result['batch'])}, UNet2DModel {result['parameters']:,} "
        f"params, {args.rounds} interleaved rounds of {args.unit} steps per method"
    )
    print("step time (ms per step, median over rounds, IQR)")
    for name, stats in result["step_ms"].items():
        lo, hi = stats["iqr"]
        print(f"  {name:<10} {stats['median']:8.1f}   ({lo:.1f}–{hi:.1f})")
    targets = {
        "siss / siss-nois": "target <= 0.60",
        "amortized / plain": "target <= 1.10",
        "recipe / plain": "target <= 1.35 (teacher, amortized)",
    }
    print("ratios (median of per-round ratios, IQR)")
    for name, stats in result["ratios"].items():
        lo, hi = stats["iqr"]
        note = targets.get(name, "")
        print(f"  {name:<19} {stats['median']:6.3f}   ({lo:.3f}–{hi:.3f})  {note}")
    gradient = 4 * result["parameters"] / 2**20
    for batch, per in memory.items():
        print(
            f"peak memory while computing .grad at batch {batch}, MiB ({result['memory_method']}; "
            f"one fp32 gradient = {gradient:.1f} MiB)"
        )
        base = per.get("plain")
        for name, value in per.items():
            if value is None:
                print(f"  {name:<10} n/a")
                continue
            rel = f"   x{value / base:.2f} of plain" if base else ""
            extra = f", {(value - per['siss']) / 2**20:+.1f} over siss" if per.get("siss") else ""
            print(f"  {name:<10} {value / 2**20:8.1f}{rel}{extra}")
        if per.get("balanced") and per.get("authors"):
            print(f"  balanced / authors: {per['balanced'] / per['authors']:.3f}")
    return result


if __name__ == "__main__":
    main()
