"""The MNIST-T-shirt study of the paper (Table 2, Fig. 4b) at laptop scale, over several seeds.

Runs every method of the library from the shipped pretrained digits DDPM with ``unlearn.py``'s
``run`` — naive deletion, SISS (λ = 0, 0.5, 1), SISS (No IS), EraseDiff and NegGrad, with the
paper's step counts (300 for the quality-preserving methods, 100 for the others) — plus the
pretrained and the retrained-without-the-outlier checkpoints, and writes a results table with 95%
confidence intervals over seeds (Markdown and JSON), a plot of the outlier rate against the step
per method, and the quality-vs-unlearning scatter of Fig. 4b. Runs already finished under the
output folder are reused, so the study can be stopped and restarted.

``--pretrained`` and ``--retrain`` run the same study on another checkpoint pair, e.g. the
rectified-flow pair of ``pretrain.py --process flow`` (the process is read from the checkpoints'
scheduler configs; both must share it); its output goes to ``outputs/study-<pretrained folder>``
unless ``--output-dir`` says otherwise, and the table's header names the process.

    python examples/study.py --seeds 0 1 2                  # ~1 h on 2 CPU cores
    python examples/study.py --seeds 0 --methods siss-0.5 naive --docs docs/results
    python examples/study.py --seeds 0 --audit   # + siss.audit of each run (audit_compare.md)
    python examples/study.py --pretrained examples/assets/flow-pretrained \
        --retrain examples/assets/flow-retrain    # -> outputs/study-flow-pretrained
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch
from diffusers import UNet2DModel

from siss.audit import ALL_CHECKS

sys.path.insert(0, str(Path(__file__).resolve().parent))

from digits import load_training_set
from pretrain import check_sampler, checkpoint_process, load_scheduler
from training_state import write_json_atomically
from unlearn import ASSETS, METHOD_REFUSALS, PROCESS_NAMES, Evaluator, audit_run, run
from unlearn import parse_args as unlearn_args

# label: (unlearn.py flags, steps); steps as in the paper's Table 2
METHODS: dict[str, tuple[list[str], int]] = {
    "naive": (["--method", "naive"], 300),
    "siss-0": (["--method", "siss", "--lam", "0"], 300),
    "siss-0.5": (["--method", "siss", "--lam", "0.5"], 300),
    "siss-nois": (["--method", "siss-nois"], 300),
    "erasediff": (["--method", "erasediff"], 100),
    "siss-1": (["--method", "siss", "--lam", "1"], 100),
    "neggrad": (["--method", "neggrad"], 100),
}
LABELS = {
    "pretrained": "Pretrained",
    "retrain": "Retrain",
    "naive": "Naive deletion",
    "siss-0": "SISS (λ=0)",
    "siss-0.5": "SISS (λ=0.5)",
    "siss-nois": "SISS (No IS)",
    "erasediff": "EraseDiff",
    "siss-1": "SISS (λ=1)",
    "neggrad": "NegGrad",
}
PAPER = {  # Table 2 of the paper: steps, IS, NLL (bits/dim), p
    "pretrained": ("117500", 9.6, 1.00, "0.74%"),
    "retrain": ("117500", 9.6, 6.17, "0%"),
    "naive": ("300", 9.5, 1.19, "0.04%"),
    "siss-0": ("300", 9.4, 1.04, "0.003%"),
    "siss-0.5": ("300", 9.2, 8.09, "0%"),
    "siss-nois": ("300", 9.2, 8.68, "0%"),
    "erasediff": ("100", 5.1, 12.04, "N/A"),
    "siss-1": ("100", 1.2, 9.30, "N/A"),
    "neggrad": ("100", 1.3, 15.79, "N/A"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        choices=list(METHODS),
        help="default: every method that applies to the pair's process (flow: all but erasediff)",
    )
    p.add_argument(
        "--pretrained",
        type=Path,
        default=None,
        help="the checkpoint every method starts from (None: examples/assets/pretrained)",
    )
    p.add_argument(
        "--retrain",
        type=Path,
        default=None,
        help="its retrained-without-the-outlier control (None: examples/assets/retrain)",
    )
    p.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="None: outputs/study for the default pair, outputs/study-<pretrained folder "
        "name> for another",
    )
    p.add_argument("--docs", type=Path, default=None, help="also copy table and plots here")
    p.add_argument(
        "--eval-samples",
        type=int,
        default=2000,
        help="DDPM samples per evaluation; at 2,000 the FID-style score's spread over "
        "evaluation draws (sd 2.2 around 12.9 for the pretrained model) cannot hide a doubling",
    )
    p.add_argument(
        "--eval-sampler",
        choices=("ddpm", "ddim", "dpm", "euler"),
        default=None,
        help="unlearn.py --eval-sampler (None: ddpm, the paper's, for DDPM; euler for flow. dpm "
        "is 2.5x faster at 20 steps but not interchangeable with ddpm, docs/results.md)",
    )
    p.add_argument(
        "--eval-steps",
        type=int,
        default=None,
        help="sampling steps of the evaluations (None: unlearn.py's default for the process)",
    )
    p.add_argument("--eval-every", type=int, default=100, help="outlier-rate tracking period")
    p.add_argument("--track-samples", type=int, default=500)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--audit",
        action="store_true",
        help="also audit every method's model against the pretrained one (unlearn.py --audit; "
        "the pretrained model once per seed): ~1.5 min per run with the default checks",
    )
    p.add_argument(
        "--audit-checks",
        nargs="+",
        default=None,
        choices=[c for c in ALL_CHECKS if c != "memorization"],
        metavar="CHECK",
        help="checks of the audit, from %(choices)s (%(default)s: unlearn.py's default)",
    )
    # The audit's other settings, passed on to unlearn.py (None: unlearn.py's default).
    for flag, help_text in (
        ("--audit-samples", "samples of the generation check"),
        ("--audit-steps", "DDIM steps of the audit's sampling"),
        ("--audit-references", "T-shirt variants (non-members)"),
    ):
        p.add_argument(
            flag, type=int, default=None, help=f"{help_text} (%(default)s: unlearn.py's)"
        )
    p.add_argument(
        "--audit-option",
        action="append",
        default=[],
        metavar="CHECK.KEY=VALUE",
        help="a per-check option of siss.audit.audit, VALUE as JSON (unlearn.py --audit-option)",
    )
    args = p.parse_args(argv)
    default_pair = args.pretrained is None and args.retrain is None
    args.pretrained = args.pretrained or ASSETS / "pretrained"
    args.retrain = args.retrain or ASSETS / "retrain"
    # the pair and the sampler checked now, not after hours of training
    try:
        processes = [checkpoint_process(folder) for folder in (args.pretrained, args.retrain)]
    except ValueError as error:
        p.error(f"--pretrained/--retrain: {error}")
    if processes[0] != processes[1]:
        p.error(
            f"--pretrained ({processes[0]}) and --retrain ({processes[1]}) must be trained with "
            "the same process"
        )
    args.process = processes[0]
    refused = [m for m in args.methods or [] if args.process in refusals(m)]
    if refused:
        label = refused[0]
        p.error(f"--methods {label}: {refusals(label)[args.process]}")
    if args.methods is None:
        args.methods = [m for m in METHODS if args.process not in refusals(m)]
    if args.output_dir is None:
        name = "study" if default_pair else f"study-{args.pretrained.name}"
        args.output_dir = Path("outputs") / name
    try:
        check_sampler(args.process, args.eval_sampler, "--eval-sampler")
    except ValueError as error:
        p.error(str(error))
    if args.audit:
        unlearn_args(["--checkpoint", str(args.pretrained), *audit_flags(args)])
    return args


def refusals(label: str) -> dict[str, str]:
    """``{process: why}`` for the processes a study method's unlearn.py method refuses."""
    flags = METHODS[label][0]
    return METHOD_REFUSALS.get(flags[flags.index("--method") + 1], {})


def eval_flags(args: argparse.Namespace) -> list[str]:
    """The study's evaluation sampler and steps as unlearn.py flags (none: its defaults)."""
    flags = []
    if args.eval_sampler is not None:
        flags += ["--eval-sampler", args.eval_sampler]
    if args.eval_steps is not None:
        flags += ["--eval-steps", str(args.eval_steps)]
    return flags


def check_pair(args: argparse.Namespace) -> None:
    """Refuses an output folder whose finished runs started from another checkpoint pair: they
    would be reused as if they were this pair's. Records the pair in a new folder."""
    record = args.output_dir / "pair.json"
    pair = {
        "pretrained": str(Path(args.pretrained).resolve()),
        "retrain": str(Path(args.retrain).resolve()),
        "process": args.process,
    }
    if record.exists():
        saved = json.loads(record.read_text())
        if saved != pair:
            raise SystemExit(
                f"{args.output_dir} holds the study of {saved['pretrained']} and "
                f"{saved['retrain']}, not of {pair['pretrained']} and {pair['retrain']}: "
                "choose another --output-dir"
            )
    else:
        write_json_atomically(record, pair)


def audit_flags(args: argparse.Namespace) -> list[str]:
    """The study's audit settings as unlearn.py flags."""
    flags = ["--audit"]
    if args.audit_checks:
        flags += ["--audit-checks", *args.audit_checks]
    for name in ("samples", "steps", "references"):
        value = getattr(args, f"audit_{name}")
        if value is not None:
            flags += [f"--audit-{name}", str(value)]
    for option in args.audit_option:
        flags += ["--audit-option", option]
    return flags


def run_method(label: str, seed: int, args: argparse.Namespace, before: dict) -> dict:
    out = args.output_dir / f"{label}-seed{seed}"
    if (out / "metrics.json").exists():
        return json.loads((out / "metrics.json").read_text())
    flags, steps = METHODS[label]
    argv = [
        *flags,
        "--steps",
        str(steps),
        "--seed",
        str(seed),
        "--output-dir",
        str(out),
        "--checkpoint",
        str(args.pretrained),
        "--eval-samples",
        str(args.eval_samples),
        *eval_flags(args),
        "--eval-every",
        str(args.eval_every),
        "--track-samples",
        str(args.track_samples),
        "--resume",
    ]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    if args.no_progress:
        argv.append("--no-progress")
    return run(unlearn_args(argv), before=before)


def audit_method(label: str, seed: int, args: argparse.Namespace) -> None:
    """``unlearn.py --audit`` of a finished run; the pretrained audit shared by the seed's runs.

    A run's audit is reused only if it was made with the same audit flags (``audit_flags.json``
    next to ``audit_compare.md``); otherwise it is redone.
    """
    out = args.output_dir / f"{label}-seed{seed}"
    flags = audit_flags(args)
    record = out / "audit_flags.json"
    if (
        (out / "audit_compare.md").exists()
        and record.exists()
        and json.loads(record.read_text()) == flags
    ):
        return
    argv = [*METHODS[label][0], "--seed", str(seed), "--output-dir", str(out), *flags]
    argv += ["--checkpoint", str(args.pretrained)]
    if args.no_progress:
        argv.append("--no-progress")
    before = args.output_dir / f"pretrained-seed{seed}" / "audit.json"
    table = audit_run(unlearn_args(argv), before_path=before)
    write_json_atomically(record, flags)
    print(f"{LABELS[label]}, seed {seed}:\n{table}\n")


def evaluate_checkpoint(label: str, seed: int, args: argparse.Namespace) -> dict:
    out = args.output_dir / f"{label}-seed{seed}" / "metrics.json"
    if out.exists():
        return json.loads(out.read_text())
    checkpoint = args.pretrained if label == "pretrained" else args.retrain
    eval_args = unlearn_args(
        [
            "--seed",
            str(seed),
            "--eval-samples",
            str(args.eval_samples),
            *eval_flags(args),
            "--checkpoint",
            str(checkpoint),
        ]
    )
    data = load_training_set(seed=0)
    evaluator = Evaluator(eval_args, data.outlier, data.images[~data.is_outlier])
    unet = UNet2DModel.from_pretrained(checkpoint)
    metrics, _ = evaluator(unet, load_scheduler(checkpoint))
    result = {
        "method": label,
        "seed": seed,
        "steps": 0,
        "train_wall_s": 0.0,
        "after": {"step": 0, **metrics},
        "history": [{"step": 0, **metrics}],
    }
    write_json_atomically(out, result)
    return result


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval (0 for a single value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    from scipy.stats import t as student

    quantile = float(student.ppf(0.975, len(values) - 1))
    return mean, quantile * statistics.stdev(values) / math.sqrt(len(values))


def summarize(results: dict[str, list[dict]]) -> list[dict]:
    rows = []
    for label, runs in results.items():
        after = [r["after"] for r in runs]
        row = {"label": label, "name": LABELS[label], "seeds": len(runs), "steps": runs[0]["steps"]}
        for key in ("inception_score", "fid", "outlier_nll_bpd", "outlier_rate"):
            values = [a[key] for a in after]
            # A run whose model diverged has no value here (None, or a NaN rate): the mean over
            # the seeds is then not measured either, never the mean of the others.
            if any(v is None or math.isnan(v) for v in values):
                row[key] = (math.nan, math.nan)
            else:
                row[key] = mean_ci(values)
        row["outlier_count"] = sum(a["outlier_count"] for a in after)
        row["samples"] = sum(a["samples"] for a in after)
        row["train_wall_s"] = mean_ci([r["train_wall_s"] for r in runs])
        rows.append(row)
    return rows


def table_markdown(rows: list[dict], process: str = "ddpm") -> str:
    """The results table; its header names the process (``"ddpm"`` or ``"flow"``)."""

    def fmt(pair: tuple[float, float], digits: int = 2, percent: bool = False) -> str:
        mean, half = pair
        if math.isnan(mean):
            return "not measured"
        if percent:
            return f"{100 * mean:.2f}% ± {100 * half:.2f}"
        return f"{mean:.{digits}f} ± {half:.{digits}f}"

    lines = [
        f"Process: {PROCESS_NAMES[process]}.",
        "",
        f"| method ({process}) | steps | IS ↑ | FID ↓ | outlier NLL (bpd) ↑ "
        "| outlier rate ↓ (pooled count) | train s | paper (DDPM): steps / IS / NLL / p |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        paper = PAPER[row["label"]]
        lines.append(
            f"| {row['name']} | {row['steps']} | {fmt(row['inception_score'])} | "
            f"{fmt(row['fid'])} | {fmt(row['outlier_nll_bpd'])} | "
            f"{fmt(row['outlier_rate'], percent=True)} ({row['outlier_count']}/{row['samples']}) | "
            f"{row['train_wall_s'][0]:.0f} | {paper[0]} / {paper[1]} / {paper[2]} / {paper[3]} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: dict[str, list[dict]], rows: list[dict], folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, runs in results.items():
        if label in ("pretrained", "retrain"):
            continue
        steps = [h["step"] for h in runs[0]["history"]]
        rates = [
            statistics.fmean(r["history"][i]["outlier_rate"] for r in runs)
            for i in range(len(steps))
        ]
        ax.plot(steps, [100 * r for r in rates], marker="o", label=LABELS[label])
    ax.set_xlabel("unlearning step")
    ax.set_ylabel("outlier rate (%)")
    ax.set_title(f"T-shirt generation rate (mean over {len(next(iter(results.values())))} seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "outlier_rate_vs_step.png", dpi=130)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 4))
    for row in rows:
        (nll, nll_h), (score, score_h) = row["outlier_nll_bpd"], row["inception_score"]
        ax.errorbar(nll, score, xerr=nll_h, yerr=score_h, fmt="o", capsize=3, label=row["name"])
    ax.set_xlabel("outlier NLL (bits/dim) → more unlearned")
    ax.set_ylabel("Inception-style score → better quality")
    ax.set_title("Quality vs. unlearning (cf. paper Fig. 4b)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "quality_vs_unlearning.png", dpi=130)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    check_pair(args)
    results: dict[str, list[dict]] = {}
    for label in ("pretrained", "retrain"):
        results[label] = [evaluate_checkpoint(label, seed, args) for seed in args.seeds]
    for label in args.methods:
        results[label] = [
            run_method(label, seed, args, before=pretrained["after"])
            for seed, pretrained in zip(args.seeds, results["pretrained"], strict=True)
        ]
        if args.audit:
            for seed in args.seeds:
                audit_method(label, seed, args)
    rows = summarize(results)
    table = table_markdown(rows, args.process)
    folders = [args.output_dir] + ([args.docs] if args.docs else [])
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "table.md").write_text(table)
        write_json_atomically(
            folder / "results.json", {"seeds": args.seeds, "process": args.process, "rows": rows}
        )
        plot(results, rows, folder)
    print(table)


if __name__ == "__main__":
    main()
