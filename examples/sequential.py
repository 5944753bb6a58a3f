"""Unlearn a queue of deletion requests one after another, tracking every request after each.

Real deletions arrive one at a time. This script plants five distinct shapes (T-shirt, trousers,
bag, ankle boot, sneaker; ``siss._digits.data.SHAPES``) at 1% each in the digits training set,
starts from a model pretrained on that set (``pretrain.py --outlier_shapes 5``), and unlearns the
shapes as separate requests in order, each from the previous request's result, with ``unlearn.py``'s
loss, balancer and evaluation (SISS λ=0.5 and 60 steps a request by default, like the paper's
sequential CelebA-HQ run). After each request it measures sample quality (IS- and FID-style scores
under the shipped digit classifier, on the samples that no shape's rate counts) and EVERY shape's
generation rate (95% interval) and NLL (bits/dim): the processed ones are flagged if they come back
(rate interval excluding 0, or NLL below its value right after its own request by more than 1.96
standard errors), the waiting ones should stay put. Stop rule: the pretrained model is evaluated on
``--band_seeds`` noise seeds and the queue stops, naming the requests left, when FID rises above (or
IS falls below) the one-sided ``--band_level`` prediction bound of those evaluations
(``siss.sequential.QualityBand``: mean ± t_{level,S-1}·sd·sqrt(1+1/S)). State is saved atomically
after every request (the model, then the queue file); ``--resume_from_checkpoint latest`` continues
at the first unfinished request and refuses a folder made with other flags, naming them. Writes
``table.md``, ``sequential.png`` and ``queue.json``; ``--docs DIR`` copies the table and plot there.

    python -m examples.sequential                        # 5 requests x 60 steps
    python -m examples.sequential --resume_from_checkpoint latest \
        --output_dir outputs/sequential/siss-lam0.5-seed0
    python -m examples.sequential --docs docs/results    # + docs/results/sequential.{md,png}
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DModel
from tqdm.auto import tqdm

from examples.unlearn import CLASSIFIER, resolve_keep_target, resolve_process
from siss import Unlearner
from siss._cli import (
    CommandParser,
    add_checkpoint_flags,
    add_evaluation_flags,
    add_model_flag,
    add_output_flag,
    add_recipe_flags,
    add_runtime_flags,
    check_timesteps,
    flag,
)
from siss._digits.data import SHAPES, load_shapes_training_set
from siss._digits.evaluate import Evaluator
from siss._digits.models import load_scheduler, save_model
from siss._digits.state import DRAWS, calibrate, plan_step
from siss._files import atomic_path, write_atomically, write_json_atomically
from siss.loop import BatchPlan, derived_seed
from siss.sequential import QualityBand, RequestQueue, forgetting_flags

ASSETS = Path(__file__).resolve().parent / "assets"
# Flags that do not change any result: left out of the settings a resumed queue must match.
NOT_SETTINGS = {
    "output_dir",
    "resume_from_checkpoint",
    "stop_after_requests",
    "docs",
    "threads",
    "no_progress",
}


def build_parser() -> CommandParser:
    """This script's flags (diffusers' names where diffusers has the flag) and their checks."""
    p = CommandParser(prog="python -m examples.sequential", description=__doc__.split("\n\n")[0])
    add_model_flag(
        p,
        default=ASSETS / "shapes-pretrained",
        old=("--checkpoint",),
        help="the model to unlearn the queue from: pretrained on the digits with the shapes "
        "planted (pretrain.py --outlier_shapes 5)",
        missing_hint=": train it with `python -m examples.pretrain --outlier_shapes 5 "
        "--output_dir examples/assets/shapes-pretrained`",
    )
    flag(
        p.add_argument_group("queue"),
        "--shapes",
        type=int,
        default=len(SHAPES),
        at_least=1,
        at_most=len(SHAPES),
        help="requests: the first K of siss._digits.data.SHAPES",
    )
    add_recipe_flags(
        p,
        max_train_steps=60,
        ema=False,
        helps={
            "max_train_steps": "optimizer steps of each request (the paper's sequential "
            "CelebA-HQ run: 60)",
            "lr_scheduler": "learning-rate schedule of each request, annealed to 0 by its last "
            "step with cosine (as unlearn.py)",
        },
        old={"max_train_steps": ("--steps-per-request",)},
    )
    evaluation = add_evaluation_flags(p, eval_samples=1000)
    flag(
        evaluation,
        "--band_seeds",
        type=int,
        default=5,
        at_least=2,
        help="evaluation noise seeds of the pretrained model that define the quality band (a "
        "spread needs two)",
    )
    flag(
        evaluation,
        "--band_level",
        type=float,
        default=0.99,
        above=0.5,
        below=1,
        help="one-sided coverage of the band's prediction bound: an unchanged model leaves it "
        "with probability 1 - level per evaluation (about 5%% over a 5-request queue for 0.99)",
    )
    checkpoints = add_checkpoint_flags(
        p, resume_paths=False, what="the first unfinished request of the queue in --output_dir"
    )
    flag(
        checkpoints,
        "--stop_after_requests",
        type=int,
        default=None,
        at_least=0,
        help="process at most this many requests in this run (as if interrupted). Default: all",
    )
    add_output_flag(
        p,
        default=None,
        help="where queue.json, the request models, table.md and sequential.png go. Default: "
        "outputs/sequential/<method>[-lam<λ>]-seed<seed>",
    )
    flag(
        p,
        "--docs",
        type=Path,
        default=None,
        help="copy table.md and sequential.png into this folder. Default: none",
    )
    add_runtime_flags(p)

    def check(args: argparse.Namespace) -> None:
        check_timesteps(args)
        model = Path(args.pretrained_model_name_or_path)
        if not (model / "config.json").is_file():
            raise ValueError(
                f"--pretrained_model_name_or_path {model}: holds no model (config.json): train "
                "it with `python -m examples.pretrain --outlier_shapes 5 --output_dir "
                "examples/assets/shapes-pretrained`"
            )
        resolve_process(args)
        resolve_keep_target(args)
        if args.output_dir is None:
            label = f"{args.method}-lam{args.lam:g}" if args.method == "siss" else args.method
            args.output_dir = Path("outputs/sequential") / f"{label}-seed{args.seed}"

    p.add_check(check)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The checked flags of one queue (``error``, exit code 2, on a bad one)."""
    return build_parser().parse_args(argv)


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The flags the results depend on, by flag name (what a refused resume names), and how
    the training rows are drawn (``draws``: a queue begun with rows drawn with replacement is
    refused)."""
    flags = {
        "--" + key: str(value) if isinstance(value, Path) else value
        for key, value in sorted(vars(args).items())
        if key not in NOT_SETTINGS
    }
    return {**flags, "draws": DRAWS}


def unlearn_request(
    unet: UNet2DModel, scheduler: Any, data, index: int, args: argparse.Namespace, desc: str
) -> float:
    """``--max_train_steps`` steps unlearning shape ``index`` from ``unet`` in place, with the
    still-waiting shapes in the keep set (they are still training data). Returns seconds."""
    device = torch.device(args.device)
    keep = data.images[(data.shape_index == -1) | (data.shape_index > index)].to(device)
    forget = data.images[data.shape_index == index].to(device)
    # The teacher is a frozen copy of the previous request's result.
    config = resolve_keep_target(args)
    unlearner = Unlearner(unet, scheduler, config, n=len(keep) + len(forget), k=len(forget))
    # One plan per request, from the seed and the request's index: a resumed queue draws what
    # an uninterrupted one draws.
    plan = BatchPlan(
        derived_seed(args.seed, "request", index),
        len(keep),
        len(forget),
        args.train_batch_size,
        args.train_batch_size,
    )
    unet.train()
    start = time.perf_counter()
    calibrate(unlearner, keep, forget, plan)
    for step in tqdm(range(args.max_train_steps), desc=desc, disable=args.no_progress):
        plan_step(unlearner, keep, forget, plan, step)
    unet.eval()
    return time.perf_counter() - start


def _cell(shape: dict[str, Any], flags: list[str], state: str) -> str:
    low, high = shape["rate_ci95"]
    nll = "n/a" if shape["nll_bpd"] is None else f"{shape['nll_bpd']:.2f}"
    # A shape unlearned in this very row that is still generated has not come back: it never left.
    rate_mark = " **⚠ still generated**" if state == "now" else " **⚠ rate back**"
    marks = "".join({"rate": rate_mark, "nll": " **⚠ NLL fell back**"}[flag] for flag in flags)
    prefix = {"done": "✓ ", "now": "→ ", "waiting": ""}[state]
    return f"{prefix}{shape['rate']:.2%} [{low:.2%}, {high:.2%}]; {nll}{marks}"


def table(queue: RequestQueue, baseline: dict[str, Any], bands: list[QualityBand]) -> str:
    """Markdown: one row per state (pretrained, after each request)."""
    names = queue.requests
    rows = [baseline["evaluation"], *[record["evaluation"] for record in queue.records]]
    history = [record["evaluation"]["shapes"] for record in queue.records]
    flags = forgetting_flags(history, names)
    head = "| after | IS ↑ | FID ↓ | " + " | ".join(names) + " |"
    lines = [head, "|" + "---|" * (3 + len(names))]
    for j, row in enumerate(rows):
        label = "pretrained" if j == 0 else f"{j}: {names[j - 1]}"
        quality = [
            "n/a" if row[key] is None else f"{row[key]:.2f}" for key in ("inception_score", "fid")
        ]
        cells = []
        for k, name in enumerate(names):
            state = "waiting" if k >= j else ("now" if k == j - 1 else "done")
            cells.append(_cell(row["shapes"][name], flags[j - 1].get(name, []) if j else [], state))
        lines.append(f"| {label} | " + " | ".join(quality + cells) + " |")
    notes = [
        "",
        "Cells: generation rate [95% Clopper-Pearson interval]; NLL in bits/dim. ✓ unlearned "
        "earlier, → unlearned in this row, no mark: still waiting (still training data). "
        "⚠ rate back: a shape unlearned earlier has a rate interval that excludes 0 (⚠ still "
        "generated: the same for the shape of this row); ⚠ NLL fell back: its NLL is more than "
        "1.96 standard errors below its value right after its own request.",
        "Quality band (stop rule): " + "; ".join(band.describe() for band in bands) + ".",
    ]
    if queue.stopped:
        notes.append(f"Stopped: {queue.stopped}")
    return "\n".join(lines + notes) + "\n"


def plot(
    queue: RequestQueue, baseline: dict[str, Any], bands: list[QualityBand], path: Path
) -> None:
    """Rate and NLL of every shape and quality against the request index, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [baseline["evaluation"], *[record["evaluation"] for record in queue.records]]
    index = list(range(len(rows)))
    fig, (ax_rate, ax_nll, ax_fid) = plt.subplots(1, 3, figsize=(13, 3.8))
    for k, name in enumerate(queue.requests):
        shapes = [row["shapes"][name] for row in rows]
        rate = [100 * s["rate"] for s in shapes]
        low = [100 * s["rate_ci95"][0] for s in shapes]
        high = [100 * s["rate_ci95"][1] for s in shapes]
        (line,) = ax_rate.plot(index, rate, marker="o", label=name)
        ax_rate.fill_between(index, low, high, color=line.get_color(), alpha=0.12)
        nll = [math.nan if s["nll_bpd"] is None else s["nll_bpd"] for s in shapes]
        ax_nll.plot(index, nll, marker="o", color=line.get_color(), label=name)
        for ax in (ax_rate, ax_nll):
            ax.axvline(k + 1, color=line.get_color(), alpha=0.25, lw=0.8, ls=":")
    ax_rate.set(xlabel="requests processed", ylabel="generation rate (%), 95% CI")
    ax_nll.set(xlabel="requests processed", ylabel="NLL (bits/dim)")
    ax_rate.legend(fontsize=7)
    fid = [math.nan if row["fid"] is None else row["fid"] for row in rows]
    ax_fid.plot(index, fid, marker="o", color="k", label="FID-style")
    ax_fid.axhline(bands[0].bound, color="k", ls="--", lw=0.8, label="FID band bound")
    ax_fid.set(xlabel="requests processed", ylabel="FID-style ↓")
    ax_is = ax_fid.twinx()
    score = [math.nan if row["inception_score"] is None else row["inception_score"] for row in rows]
    ax_is.plot(index, score, marker="s", color="tab:red", label="IS-style")
    ax_is.axhline(bands[1].bound, color="tab:red", ls="--", lw=0.8)
    ax_is.set_ylabel("IS-style ↑", color="tab:red")
    ax_fid.legend(fontsize=7, loc="upper left")
    for ax in (ax_rate, ax_nll, ax_fid):
        ax.set_xticks(index)
    fig.suptitle("Sequential deletion requests (dotted: the request that unlearns each shape)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Runs or resumes the queue; returns ``{"queue": RequestQueue, "table": str}``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    data = load_shapes_training_set(args.shapes, seed=0)
    resume = args.resume_from_checkpoint is not None
    queue = RequestQueue.open(out / "queue.json", data.names, settings(args), resume=resume)
    scheduler = load_scheduler(args.pretrained_model_name_or_path)
    keep = data.images[data.shape_index == -1]
    evaluator = Evaluator.from_flags(args, data.outlier, keep, ASSETS / CLASSIFIER)
    if evaluator.classifier is None:
        raise ValueError("the quality band needs the digit classifier: 16x16 grayscale models")
    done = len(queue.records)
    start = args.pretrained_model_name_or_path
    source = start if done == 0 else out / "requests" / f"{done:02d}-{queue.done[-1]}"
    unet = UNet2DModel.from_pretrained(source).to(args.device)

    baseline_path = out / "baseline.json"
    if resume and baseline_path.exists():  # queue.json matched: same settings
        baseline = json.loads(baseline_path.read_text())
    else:
        pretrained = unet if done == 0 else UNet2DModel.from_pretrained(start)
        pretrained = pretrained.to(args.device)
        seeds = range(args.seed + 1, args.seed + 1 + args.band_seeds)
        quality = []
        for noise in tqdm(seeds, desc="quality band", disable=args.no_progress):
            with_nll = noise == args.seed + 1  # the noise of every later evaluation
            row = evaluator.shapes(pretrained, scheduler, data, args.eval_samples, noise, with_nll)
            quality.append(row)
        if any(row["fid"] is None for row in quality):
            raise ValueError(
                f"--pretrained_model_name_or_path: its quality could not be measured: {quality}"
            )
        baseline = {
            "evaluation": quality[0],
            "band_fid": [row["fid"] for row in quality],
            "band_is": [row["inception_score"] for row in quality],
        }
        write_json_atomically(baseline_path, baseline)
    bands = [
        QualityBand.from_evaluations("FID", baseline["band_fid"], level=args.band_level),
        QualityBand.from_evaluations(
            "IS", baseline["band_is"], level=args.band_level, higher_is_better=True
        ),
    ]

    limit = math.inf if args.stop_after_requests is None else args.stop_after_requests
    processed = 0
    while not queue.finished and processed < limit:
        index = len(queue.records)
        name = queue.next_request
        seconds = unlearn_request(
            unet, scheduler, data, index, args, f"request {index + 1}/{len(data.names)}: {name}"
        )
        row = evaluator.shapes(unet, scheduler, data, args.eval_samples)
        save_model(out / "requests" / f"{index + 1:02d}-{name}", unet)
        scores = {"FID": row["fid"], "IS": row["inception_score"]}
        outside = [band for band in bands if not band.contains(scores[band.metric])]
        stop = None
        if outside:
            reasons = "; ".join(
                f"{band.metric} {scores[band.metric]:.4g} outside {band.describe()}"
                for band in outside
            )
            left = ", ".join(queue.pending[1:]) or "none"
            stop = (
                f"quality left its band after request {index + 1} ({name}): {reasons}. "
                f"Requests not processed: {left}"
            )
        # the record and the stop in one write: a kill between them resumed past the band
        queue.complete({"train_wall_s": round(seconds, 1), "evaluation": row}, stop=stop)
        processed += 1
    text = table(queue, baseline, bands)
    write_atomically(out / "table.md", text)
    plot(queue, baseline, bands, out / "sequential.png")
    if args.docs is not None:
        args.docs.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "table.md", args.docs / "sequential.md")
        shutil.copyfile(out / "sequential.png", args.docs / "sequential.png")
    return {"queue": queue, "table": text}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        result = run(args)
    except ValueError as error:  # a resume with other flags, a model without quality
        raise SystemExit(f"error: {error}") from None
    queue = result["queue"]
    print(result["table"])
    if queue.stopped:
        print(f"STOPPED: {queue.stopped}")
    elif queue.pending:
        print(
            f"paused after {len(queue.done)} requests; continue with "
            "--resume_from_checkpoint latest"
        )
    print(f"table.md, sequential.png and queue.json in {args.output_dir}")


if __name__ == "__main__":
    main()
