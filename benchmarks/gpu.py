"""Every GPU benchmark and CUDA check of issue 12 in one command, written to one JSON file.

On the digits ``UNet2DModel``, an SD-1.5-size ``UNet2DConditionModel`` (860M parameters) and a
DiT-XL/2-size transformer (675M), all built from config with random weights (``workloads.py``),
in fp32 and under bf16 autocast (fp32 master weights, as ``accelerate``'s
``mixed_precision="bf16"``), this times six training steps side by side — a plain diffusers
fine-tuning step, SISS (fixed s), SISS + ``NormBalancer`` exact and ``every=10``, SISS (No IS) and
the re-implementation of the authors' gradient surgery (``methods.authors_surgery``) — interleaved
round by round with CUDA events, and reports medians and interquartile ranges of per-round ratios
against the issue's targets. Further sections: a batch sweep, peak memory while the final
``.grad`` is computed (``torch.cuda.max_memory_allocated``), ``torch.compile`` (graph breaks of the
loss under ``torch._dynamo.explain``; compiled step times), host syncs counted under
``torch.cuda.set_sync_debug_mode("warn")``, and bf16 numerics (importance weights against fp32;
non-finite ``.grad`` over many steps at λ ∈ {0, 0.5, 1}).

The ``recipe`` section times ``siss.Unlearner`` (the teacher keep target, the calibrated balancer)
against the plain step for the full model and a LoRA, with its memory against the computed formula.

Entries already in ``--out`` are kept (the file is rewritten atomically after each entry), so a
run cut off by a time limit keeps what it finished and resumes at the next entry; give each
invocation a ``timeout`` and re-run. Each entry records its wall time.

    python -m benchmarks.gpu --out benchmarks/results/gpu.json --sections timing sweep memory
    python -m benchmarks.gpu --out benchmarks/results/gpu.json --sections compile syncs bf16
    python -m benchmarks.gpu --smoke --device cpu --out /tmp/smoke.json   # checks the script only
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.methods import authors_surgery, spread
from benchmarks.workloads import WORKLOADS, Workload, build
from siss import NormBalancer, SISSLoss, Unlearner, UnlearningConfig
from siss._files import write_json_atomically
from siss.adapters import adapter_for, loss_from_scheduler
from siss.baselines import SISSNoISLoss

METHODS = ("plain", "siss", "siss-nois", "balanced", "amortized", "authors")
SECTIONS = ("timing", "recipe", "sweep", "memory", "compile", "syncs", "bf16")
RECIPE_METHODS = ("plain", "teacher", "recipe")
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # diffusers' train_text_to_image_lora.py
PRECISIONS = ("fp32", "bf16")
TARGETS = {  # issue 12, on the SD-1.5 UNet
    "siss / plain": 1.03,
    "siss / siss-nois": 0.55,
    "amortized / plain": 1.10,
    "recipe / plain": 1.35,  # issue 21, set on the CPU
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, required=True, help="JSON file (sections merge in)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--sweep-batch-sizes", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per method")
    parser.add_argument(
        "--unit", type=int, default=10, help="steps per method per round; also the amortized K"
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed units per method")
    parser.add_argument("--ratio", type=float, default=0.1, help="balancer ratio")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank of the recipe section")
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=("full", "lora"),
        default=["full", "lora"],
        help="what the recipe section trains: the whole model, a LoRA",
    )
    parser.add_argument("--nan-steps", type=int, default=1000, help="bf16 steps per λ")
    parser.add_argument("--nan-batch-size", type=int, default=4)
    parser.add_argument("--redo", action="store_true", help="recompute sections already in --out")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="toy-size models (compile: eager backend): checks the script",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("batch_size", "rounds", "unit", "nan_steps", "nan_batch_size", "rank"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine")
    return args


# ------------------------------------------------------------------------------------- steps


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def adamw(params: list[torch.nn.Parameter], device: torch.device) -> torch.optim.AdamW:
    """The benchmarks' optimizer: AdamW at lr 1e-5, the fused kernel on CUDA."""
    return torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")


def make_steps(
    work: Workload,
    batch: int,
    precision: str,
    *,
    ratio: float,
    every: int,
    seed: int,
    optimize: bool = True,
    model: torch.nn.Module | None = None,
    methods: tuple[str, ...] = METHODS,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, Callable[[], None]]:
    """One closure per method: a whole training step (``optimize=False``: up to the final
    ``.grad``). ``model`` replaces the workload's (e.g. its ``torch.compile``'d version);
    ``optimizer`` the AdamW the closures step (e.g. one shared with an ``Unlearner``)."""
    device = next(work.model.parameters()).device
    adapter = adapter_for(model if model is not None else work.model)
    params = [p for p in work.model.parameters() if p.requires_grad]
    if optimizer is None:
        optimizer = adamw(params, device)
    siss = loss_from_scheduler(SISSLoss, work.scheduler, lam=0.5, superfactor=ratio).to(device)
    nois = loss_from_scheduler(SISSNoISLoss, work.scheduler, superfactor=ratio).to(device)
    generator = torch.Generator(device).manual_seed(seed)
    x0 = torch.randn(batch, *work.row_shape, device=device, generator=generator)
    a0 = torch.randn(batch, *work.row_shape, device=device, generator=generator)
    cond = work.conditioning(batch)
    # the plain step calls the model itself: one conditioning row per noisy row
    rows = {k: v.expand(batch, *v.shape[1:]) if v.shape[0] == 1 else v for k, v in cond.items()}
    alphas = work.scheduler.alphas_cumprod.to(device)
    exact = NormBalancer(params, ratio=ratio)
    amortized = NormBalancer(params, ratio=ratio, every=every)
    amp = lambda: autocast(device, precision)  # noqa: E731

    def finish() -> None:
        if optimize:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def plain() -> None:
        noise = torch.randn(x0.shape, device=device, generator=generator)
        t = torch.randint(0, len(alphas), (batch,), device=device, generator=generator)
        gamma = alphas[t].sqrt().view(-1, 1, 1, 1)
        noisy = gamma * x0 + (1 - gamma**2).sqrt() * noise
        with amp():
            prediction = adapter.predict(noisy, t, **rows)
        F.mse_loss(prediction.float(), noise).backward()
        finish()

    def with_loss(loss_fn) -> Callable[[], None]:
        def step() -> None:
            with amp():
                terms = adapter.loss(x0, a0, loss_fn, generator=generator, **cond)
            terms.loss.backward()
            finish()

        return step

    def with_terms(combine: Callable[[torch.Tensor, torch.Tensor], None]) -> Callable[[], None]:
        def step() -> None:
            with amp():
                terms = adapter.loss(x0, a0, siss, generator=generator, **cond)
            combine(terms.keep, terms.forget)
            finish()

        return step

    def balanced_with(balancer: NormBalancer) -> Callable[[torch.Tensor, torch.Tensor], None]:
        def combine(keep: torch.Tensor, forget: torch.Tensor) -> None:
            balancer.backward(keep, forget)
            balancer.step()

        return combine

    every_step = {
        "plain": lambda: plain,
        "siss": lambda: with_loss(siss),
        "siss-nois": lambda: with_loss(nois),
        "balanced": lambda: with_terms(balanced_with(exact)),
        "amortized": lambda: with_terms(balanced_with(amortized)),
        "authors": lambda: with_terms(lambda k, f: authors_surgery(params, k, f, ratio)),
    }
    return {name: every_step[name]() for name in methods}


# ------------------------------------------------------------------------------------ timing


class Timer:
    """Elapsed seconds of a block: CUDA events on a GPU (no sync inside the timed steps; read
    after the round), ``perf_counter`` on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def start(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def stop(self, start: Any) -> Callable[[], float]:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            return lambda: start.elapsed_time(end) / 1e3
        elapsed = time.perf_counter() - start
        return lambda: elapsed


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    steps: dict[str, Callable[[], None]], device: torch.device, rounds: int, unit: int, warmup: int
) -> dict[str, list[float]]:
    """Seconds per step of each method, per round; methods in a rotating order each round."""
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            for _ in range(unit):
                steps[name]()
    timer = Timer(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for index in range(rounds):
        shift = index % len(names)
        pending = []
        for name in names[shift:] + names[:shift]:
            start = timer.start()
            for _ in range(unit):
                steps[name]()
            pending.append((name, timer.stop(start)))
        synchronize(device)
        for name, elapsed in pending:
            times[name].append(elapsed() / unit)
    return times


def summary(values: list[float], scale: float = 1.0) -> dict[str, Any]:
    lo, hi = spread(values)
    return {"median": scale * statistics.median(values), "iqr": [scale * lo, scale * hi]}


def ratios(times: dict[str, list[float]], pairs: list[tuple[str, str]]) -> dict[str, Any]:
    out = {}
    for top, bottom in pairs:
        if top in times and bottom in times:
            per_round = [t / b for t, b in zip(times[top], times[bottom], strict=True)]
            key = f"{top} / {bottom}"
            out[key] = {**summary(per_round), "target": TARGETS.get(key)}
    return out


RATIO_PAIRS = [
    ("siss", "plain"),
    ("siss", "siss-nois"),
    ("balanced", "plain"),
    ("amortized", "plain"),
    ("authors", "plain"),
    ("balanced", "authors"),
]


class Entries:
    """One section's entries in ``--out``, each written as soon as it is measured.

    An entry already in the file is kept and not measured again (``--redo`` measures it again),
    so a run cut off by a time limit resumes at the next entry and what it finished is saved."""

    def __init__(self, results: dict[str, Any], section: str, path: Path, redo: bool) -> None:
        if redo or not isinstance(results.get(section), dict):
            results[section] = {}
        self.results, self.section, self.path = results, section, path
        self.entries: dict[str, Any] = results[section]

    def done(self, key: str, group: str | None = None) -> bool:
        entries = self.entries.get(group, {}) if group else self.entries
        if key in entries:
            print(
                f"{self.section} {group + '/' if group else ''}{key}: already in {self.path}, kept"
            )
            return True
        return False

    def put(self, key: str, value: Any, group: str | None = None) -> None:
        entries = self.entries.setdefault(group, {}) if group else self.entries
        entries[key] = value
        write_json_atomically(self.path, self.results)


def timing_section(args: argparse.Namespace, device: torch.device, entries: Entries) -> None:
    for name in args.workloads:
        todo = [p for p in args.precisions if not entries.done(f"{name}/{p}")]
        if not todo:
            continue
        work = build(name, device, smoke=args.smoke, seed=args.seed)
        for precision in todo:
            start = time.perf_counter()
            steps = make_steps(
                work, args.batch_size, precision, ratio=args.ratio, every=args.unit, seed=args.seed
            )
            times = interleaved(steps, device, args.rounds, args.unit, args.warmup)
            entry = {
                "parameters": work.parameters,
                "batch": [args.batch_size, *work.row_shape],
                "step_ms": {m: summary(v, 1e3) for m, v in times.items()},
                "ratios": ratios(times, RATIO_PAIRS),
                "wall_s": time.perf_counter() - start,
            }
            entries.put(f"{name}/{precision}", entry)
            print_timing(f"{name}/{precision}", entry)
            del steps
        del work
        empty_cache(device)


def sweep_section(args: argparse.Namespace, device: torch.device, entries: Entries) -> None:
    """SISS against plain on the SD-1.5 UNet (bf16) over batch sizes."""
    precision = "bf16" if "bf16" in args.precisions else args.precisions[0]
    keys = {batch: f"sd15/{precision}/batch{batch}" for batch in args.sweep_batch_sizes}
    todo = [batch for batch, key in keys.items() if not entries.done(key)]
    if not todo:
        return
    work = build("sd15", device, smoke=args.smoke, seed=args.seed)
    for batch in todo:
        try:
            steps = make_steps(
                work,
                batch,
                precision,
                ratio=args.ratio,
                every=args.unit,
                seed=args.seed,
                methods=("plain", "siss"),
            )
            times = interleaved(steps, device, args.rounds, args.unit, args.warmup)
        except torch.OutOfMemoryError as err:
            entries.put(keys[batch], {"status": "out of memory", "error": str(err)[:200]})
            empty_cache(device)
            continue
        entry = {
            "step_ms": {m: summary(v, 1e3) for m, v in times.items()},
            "ratios": ratios(times, [("siss", "plain")]),
        }
        entries.put(keys[batch], entry)
        print(f"sweep {keys[batch]}: siss / plain {entry['ratios']['siss / plain']['median']:.3f}")
        del steps
        empty_cache(device)


# ------------------------------------------------------------------------------------ recipe


def add_lora(model: torch.nn.Module, rank: int) -> None:
    """A LoRA on the attention projections, base weights frozen, as diffusers'
    ``train_text_to_image_lora.py`` (``init_lora_weights="gaussian"``)."""
    from peft import LoraConfig

    model.requires_grad_(False)
    model.add_adapter(
        LoraConfig(
            r=rank,
            lora_alpha=rank,
            init_lora_weights="gaussian",
            target_modules=list(LORA_TARGETS),
        )
    )


def static_formula(parameters: int, trainable: int, mode: str) -> dict[str, int]:
    """Bytes held between steps, computed (fp32 master weights, AdamW): weights 4P, AdamW 8T;
    the recipe adds the balancer's forget-gradient buffer 4T and, for a full fine-tune, the
    teacher's frozen copy 4P (a LoRA's teacher is its own base model: 0). Gradients (4T) exist
    during the step only (``zero_grad(set_to_none=True)``)."""
    plain = 4 * parameters + 8 * trainable
    teacher = 4 * parameters if mode == "full" else 0
    return {
        "plain": plain,
        "recipe": plain + 4 * trainable + teacher,
        "gradients": 4 * trainable,
        "teacher": teacher,
        "balancer_buffer": 4 * trainable,
    }


def allocated(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    synchronize(device)
    return float(torch.cuda.memory_allocated(device))


def recipe_section(args: argparse.Namespace, device: torch.device, entries: Entries) -> None:
    """The recipe's step on each workload, the full model and a LoRA (rank ``--rank``):

    * ``plain``    the plain diffusers fine-tuning step (``make_steps``' ``plain``);
    * ``teacher``  ``siss.Unlearner`` with the teacher keep target and the calibrated
      ``absolute`` balancer refreshed every step (``balance_every=1``);
    * ``recipe``   ``siss.Unlearner`` with its defaults (refreshed every 10 steps).

    One calibration batch, spent before the timing; no clipping and a constant lr, as the other
    methods; one AdamW shared. Memory (CUDA only, under the first of ``--precisions``): what is
    held between steps and the peak of a plain step and of ``balance_every`` recipe steps (one
    refresh), against ``static_formula``. Then step times per precision, interleaved as in
    ``timing``."""
    for name in args.workloads:
        for mode in args.modes:
            prefix = f"{name}/{mode}"
            todo = [p for p in args.precisions if not entries.done(f"{prefix}/{p}")]
            if todo or not entries.done(f"{prefix}/memory"):
                recipe_entries(args, device, entries, name, mode, todo)
                empty_cache(device)


def recipe_entries(
    args: argparse.Namespace,
    device: torch.device,
    entries: Entries,
    name: str,
    mode: str,
    precisions: list[str],
) -> None:
    """``recipe_section``'s entries for one workload and mode."""
    prefix = f"{name}/{mode}"
    work = build(name, device, smoke=args.smoke, seed=args.seed)
    if mode == "lora":
        if not hasattr(work.model, "add_adapter"):
            reason = f"not measured: {type(work.model).__name__} has no add_adapter (PEFT mixin)"
            for key in ("memory", *precisions):
                if key == "memory" and entries.done(f"{prefix}/memory"):
                    continue
                entries.put(f"{prefix}/{key}", {"status": reason})
            return
        add_lora(work.model, args.rank)
    params = [p for p in work.model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    optimizer = adamw(params, device)
    plain = make_steps(
        work,
        args.batch_size,
        "fp32",  # the autocast is amped's, below
        ratio=args.ratio,
        every=1,
        seed=args.seed,
        methods=("plain",),
        optimizer=optimizer,
    )["plain"]
    generator = torch.Generator(device).manual_seed(args.seed)
    x0 = torch.randn(args.batch_size, *work.row_shape, device=device, generator=generator)
    a0 = torch.randn(args.batch_size, *work.row_shape, device=device, generator=generator)
    cond = work.conditioning(args.batch_size)
    config = UnlearningConfig(
        calibration_batches=1, max_grad_norm=0.0, lr_scheduler="constant", seed=args.seed
    )

    def unlearner(every: int | None) -> Callable[[], None]:
        run = Unlearner(
            work.model,
            work.scheduler,
            dataclasses.replace(config, balance_every=every),
            n=1000,
            k=10,
            optimizer=optimizer,
        )

        def step() -> None:
            run.step(x0, a0, **cond)

        amped(step, device, precision)()  # the calibration batch
        return step

    precision = (precisions or args.precisions)[0]  # of the memory measurement
    measured = amped(plain, device, precision)
    measured()  # AdamW's state exists from here on
    held_plain, peak_plain = allocated(device), peak_bytes(measured, device)
    recipe = unlearner(None)
    measured = amped(recipe, device, precision)
    measured()  # the first refresh allocates the forget-gradient buffer
    held_recipe = allocated(device)
    peak_recipe = peak_bytes(lambda: [measured() for _ in range(config.balance_every)], device)
    if not entries.done(f"{prefix}/memory"):
        formula = static_formula(work.parameters, trainable, mode)
        memory: dict[str, Any] = {
            "parameters": work.parameters,
            "trainable": trainable,
            "batch": [args.batch_size, *work.row_shape],
            "precision": precision,
            "computed_mib": {k: v / 2**20 for k, v in formula.items()},
        }
        if held_plain is None:
            memory["status"] = "not measured: CUDA only"
        else:
            memory["measured_mib"] = {
                "held plain": held_plain / 2**20,
                "held recipe": held_recipe / 2**20,
                "peak plain": peak_plain / 2**20,
                "peak recipe": peak_recipe / 2**20,
            }
        entries.put(f"{prefix}/memory", memory)
        print(f"recipe {prefix} memory: {json.dumps(memory)}")
    teacher = unlearner(1)
    for precision in precisions:
        start = time.perf_counter()
        steps = {
            "plain": amped(plain, device, precision),
            "teacher": amped(teacher, device, precision),
            "recipe": amped(recipe, device, precision),
        }
        times = interleaved(steps, device, args.rounds, args.unit, args.warmup)
        entry = {
            "parameters": work.parameters,
            "trainable": trainable,
            "batch": [args.batch_size, *work.row_shape],
            "step_ms": {m: summary(v, 1e3) for m, v in times.items()},
            "ratios": ratios(times, [("teacher", "plain"), ("recipe", "plain")]),
            "wall_s": time.perf_counter() - start,
        }
        entries.put(f"{prefix}/{precision}", entry)
        print_timing(f"recipe {prefix}/{precision}", entry)


def amped(step: Callable[[], Any], device: torch.device, precision: str) -> Callable[[], None]:
    """``step`` under ``precision``'s autocast (the teacher's forward too)."""

    def run() -> None:
        with autocast(device, precision):
            step()

    return run


# ------------------------------------------------------------------------------------ memory


def empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peak_bytes(step: Callable[[], None], device: torch.device) -> float | None:
    if device.type != "cuda":
        return None  # benchmarks/methods.py measures CPU memory with MemTracker
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    synchronize(device)
    return float(torch.cuda.max_memory_allocated(device))


def memory_section(args: argparse.Namespace, device: torch.device, entries: Entries) -> None:
    """Peak memory while each method computes its final .grad (AdamW state not yet allocated:
    ``optimize=False``), fp32, at batch 1 (gradients dominate) and at the benchmark batch."""
    for name in args.workloads:
        todo = [b for b in sorted({1, args.batch_size}) if not entries.done(f"{name}/batch{b}")]
        if not todo:
            continue
        work = build(name, device, smoke=args.smoke, seed=args.seed)
        gradient = 4 * sum(p.numel() for p in work.model.parameters() if p.requires_grad)
        for batch in todo:
            steps = make_steps(
                work,
                batch,
                "fp32",
                ratio=args.ratio,
                every=args.unit,
                seed=args.seed,
                optimize=False,
                methods=("plain", "siss", "siss-nois", "balanced", "authors"),
            )
            peaks = {}
            for method, step in steps.items():
                step()  # warm-up: workspaces, autotuning
                peaks[method] = peak_bytes(step, device)
            entry: dict[str, Any] = {"fp32_gradient_mib": gradient / 2**20}
            if peaks["plain"] is None:
                entry["status"] = "not measured: CUDA only (see benchmarks/methods.py on CPU)"
            else:
                entry["peak_mib"] = {m: v / 2**20 for m, v in peaks.items()}
                entry["balanced - plain, gradients"] = (peaks["balanced"] - peaks["plain"]) / (
                    gradient
                )
                entry["authors - balanced, gradients"] = (peaks["authors"] - peaks["balanced"]) / (
                    gradient
                )
                entry["targets"] = {
                    "balanced <= plain + 1 gradient": peaks["balanced"]
                    <= peaks["plain"] + gradient,
                    "authors - balanced >= 1 gradient": peaks["authors"] - peaks["balanced"]
                    >= gradient,
                }
            entries.put(f"{name}/batch{batch}", entry)
            print(f"memory {name} batch {batch}: {json.dumps(entry)}")
            del steps
            empty_cache(device)
        del work
        empty_cache(device)


# ----------------------------------------------------------------------------------- compile


def compile_section(args: argparse.Namespace, device: torch.device, entries: Entries) -> None:
    """Graph breaks inside the SISS loss (sample + terms on a fixed model output), and compiled
    step times (``torch.compile`` of the model) for plain and SISS."""
    precision = "bf16" if "bf16" in args.precisions else args.precisions[0]
    if not entries.done("loss_explain"):
        entries.put("loss_explain", explain_loss(args, device))
    torch._dynamo.reset()
    for name in args.workloads:
        if entries.done(f"{name}/{precision}"):
            continue
        work = build(name, device, smoke=args.smoke, seed=args.seed)
        compiled = torch.compile(work.model, backend="eager" if args.smoke else "inductor")
        start = time.perf_counter()
        steps = make_steps(
            work,
            args.batch_size,
            precision,
            ratio=args.ratio,
            every=args.unit,
            seed=args.seed,
            model=compiled,
            methods=("plain", "siss"),
        )
        for step in steps.values():
            step()  # compile here, timed separately
        synchronize(device)
        compile_s = time.perf_counter() - start
        times = interleaved(steps, device, args.rounds, args.unit, args.warmup)
        entry = {
            "compile_s": compile_s,
            "step_ms": {m: summary(v, 1e3) for m, v in times.items()},
            "ratios": ratios(times, [("siss", "plain")]),
        }
        entries.put(f"{name}/{precision}", entry)
        ratio = entry["ratios"]["siss / plain"]["median"]
        print(f"compile {name}/{precision}: compiled siss / plain {ratio:.3f}")
        del steps, compiled, work
        torch._dynamo.reset()
        empty_cache(device)


def explain_loss(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Graphs and graph breaks of the SISS loss (sample + Eq. 15 on a fixed model output)."""
    work = build("sd15" if "sd15" in args.workloads else args.workloads[0], device, smoke=True)
    siss = loss_from_scheduler(SISSLoss, work.scheduler, lam=0.5, superfactor=0.1).to(device)
    batch = args.batch_size
    x0 = torch.randn(batch, *work.row_shape, device=device)
    a0 = torch.randn(batch, *work.row_shape, device=device)
    output = torch.randn(batch, *work.row_shape, device=device, requires_grad=True)

    def loss_only(x0: torch.Tensor, a0: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        draw = siss.sample(x0, a0)
        return siss(output, draw)

    explanation = torch._dynamo.explain(loss_only)(x0, a0, output)
    print(f"compile: SISS loss graph breaks {explanation.graph_break_count}")
    return {
        "graph_count": explanation.graph_count,
        "graph_break_count": explanation.graph_break_count,
        "break_reasons": [str(r.reason)[:300] for r in explanation.break_reasons],
    }


# ------------------------------------------------------------------------------------- syncs


def count_syncs(block: Callable[[], None]) -> int:
    """Synchronizing CUDA calls made by ``block``, counted with the sync debug mode's warnings."""
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            block()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return sum("synchroniz" in str(w.message) for w in caught)


def syncs_section(args: argparse.Namespace, device: torch.device, entries: Entries) -> None:
    """Host syncs of a SISS step's loss (sample, forward, loss, backward), of the exact
    balancer (documented: one per step, reading two flags together) and of the recipe's
    ``Unlearner.step`` on a refresh step and on a held-coefficient step."""
    if device.type != "cuda":
        if not entries.done("status"):
            entries.put("status", "not measured: the sync debug mode is CUDA only")
        return
    if entries.done("siss_step"):
        return
    work = build("sd15" if "sd15" in args.workloads else args.workloads[0], device, smoke=True)
    params = [p for p in work.model.parameters() if p.requires_grad]
    adapter = adapter_for(work.model)
    siss = loss_from_scheduler(SISSLoss, work.scheduler, lam=0.5, superfactor=0.1).to(device)
    generator = torch.Generator(device).manual_seed(args.seed)
    x0 = torch.randn(4, *work.row_shape, device=device, generator=generator)
    a0 = torch.randn(4, *work.row_shape, device=device, generator=generator)
    cond = work.conditioning(4)
    balancer = NormBalancer(params, ratio=args.ratio)
    config = UnlearningConfig(calibration_batches=1, balance_every=2, seed=args.seed)
    recipe = Unlearner(work.model, work.scheduler, config, n=1000, k=10)

    def loss_step() -> None:
        adapter.loss(x0, a0, siss, generator=generator, **cond).loss.backward()

    def balanced_step() -> None:
        terms = adapter.loss(x0, a0, siss, generator=generator, **cond)
        balancer.backward(terms.keep, terms.forget)
        balancer.step()

    def recipe_step() -> None:
        recipe.step(x0, a0, **cond)

    for block in (loss_step, balanced_step):  # warm-up: lazy initialisation may sync once
        block()
    for _ in range(3):  # calibration (reads its norm on the host, by design), refresh, held
        recipe_step()
    out = {
        "siss_step": count_syncs(loss_step),
        "balanced_step": count_syncs(balanced_step),
        "recipe_refresh_step": count_syncs(recipe_step),
        "recipe_held_step": count_syncs(recipe_step),
        "targets": {"siss_step": 0, "balanced_step": 1, "recipe_held_step": 0},
    }
    for key, value in out.items():
        entries.put(key, value)
    print(f"syncs: {json.dumps(out)}")


# -------------------------------------------------------------------------------------- bf16


def bf16_section(args: argparse.Namespace, device: torch.device, entries: Entries) -> None:
    """Importance weights under bf16 autocast against fp32 on the same bf16-rounded inputs, and
    non-finite ``.grad`` counts over ``--nan-steps`` bf16 steps on the SD-1.5 UNet per λ."""
    name = "sd15" if "sd15" in args.workloads else args.workloads[0]
    lams = [lam for lam in (0.0, 0.5, 1.0) if not entries.done(str(lam), "nonfinite_grad_steps")]
    if not lams:
        return
    work = build(name, device, smoke=args.smoke, seed=args.seed)
    params = [p for p in work.model.parameters() if p.requires_grad]
    adapter = adapter_for(work.model)
    entries.put("workload", name)
    batch = args.nan_batch_size
    generator = torch.Generator(device)
    x0 = torch.randn(batch, *work.row_shape, device=device).bfloat16().float()
    a0 = torch.randn(batch, *work.row_shape, device=device).bfloat16().float()
    cond = work.conditioning(batch)
    for lam in lams:
        siss = loss_from_scheduler(SISSLoss, work.scheduler, lam=lam, superfactor=0.1).to(device)
        generator.manual_seed(args.seed)
        reference = siss.sample(x0, a0, generator=generator)
        generator.manual_seed(args.seed)
        with autocast(device, "bf16"):
            mixed = siss.sample(x0, a0, generator=generator)
        error = max(
            float(((m - r).abs() / r.abs().clamp_min(1e-30)).max())
            for m, r in (
                (mixed.weight_x, reference.weight_x),
                (mixed.weight_a, reference.weight_a),
            )
        )
        entries.put(str(lam), {"max_relative_error": error, "target": 1e-6}, "weights")
        optimizer = adamw(params, device)
        bad = torch.zeros((), device=device, dtype=torch.long)
        generator.manual_seed(args.seed)
        start = time.perf_counter()
        for _ in range(args.nan_steps):
            with autocast(device, "bf16"):
                terms = adapter.loss(x0, a0, siss, generator=generator, **cond)
            terms.loss.backward()
            norms = torch._foreach_norm([p.grad for p in params if p.grad is not None])
            bad += (~torch.isfinite(torch.stack(norms))).any().long()  # counted on the device
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        counts = {
            "count": int(bad),
            "steps": args.nan_steps,
            "batch": batch,
            "seconds": time.perf_counter() - start,
        }
        entries.put(str(lam), counts, "nonfinite_grad_steps")
        print(f"bf16 λ={lam}: weights rel. error {error:.2e}, non-finite .grad {int(bad)}")
        del optimizer


# -------------------------------------------------------------------------------------- main


def print_timing(label: str, entry: dict[str, Any]) -> None:
    print(f"{label}: {entry['parameters']:,} params, batch {tuple(entry['batch'])}")
    for method, stats in entry["step_ms"].items():
        lo, hi = stats["iqr"]
        print(f"  {method:<10} {stats['median']:9.2f} ms  ({lo:.2f}–{hi:.2f})")
    for key, stats in entry["ratios"].items():
        lo, hi = stats["iqr"]
        target = f"  target <= {stats['target']}" if stats["target"] else ""
        print(f"  {key:<19} {stats['median']:6.3f}  ({lo:.3f}–{hi:.3f}){target}")


def environment(device: torch.device) -> dict[str, Any]:
    import diffusers

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "platform": platform.platform(),
        "device": str(device),
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info["gpu"] = properties.name
        info["gpu_memory_gib"] = properties.total_memory / 2**30
        info["cuda"] = torch.version.cuda
    else:
        info["cpu_threads"] = torch.get_num_threads()
    return info


RUNNERS = {
    "timing": timing_section,
    "recipe": recipe_section,
    "sweep": sweep_section,
    "memory": memory_section,
    "compile": compile_section,
    "syncs": syncs_section,
    "bf16": bf16_section,
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 in the fp32 rows
        torch.backends.cudnn.allow_tf32 = False
    results: dict[str, Any] = {}
    if args.out.exists():
        results = json.loads(args.out.read_text())
        if results.get("smoke", False) != args.smoke:
            raise SystemExit(f"--out {args.out} holds a {'smoke' if args.smoke else 'full'} run")
    results["smoke"] = args.smoke
    results.setdefault("runs", []).append({**environment(device), "sections": args.sections})
    write_json_atomically(args.out, results)
    for section in args.sections:
        start = time.perf_counter()
        RUNNERS[section](args, device, Entries(results, section, args.out, args.redo))
        results["runs"][-1].setdefault("wall_s", {})[section] = time.perf_counter() - start
        write_json_atomically(args.out, results)
    return results


if __name__ == "__main__":
    main()
