"""The digits study's tables and plots (``python -m examples.study``): the results table with
95% intervals over seeds, the pretrained model's own spread, the precision check, the audit
against the retrained model, and the two figures (outlier rate against the step; quality
against unlearning, cf. the paper's Fig. 4b)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from siss._digits import PROCESS_NAMES
from siss._files import atomic_path
from siss.audit._stats import t_interval
from siss.metrics import proportion_ci

if TYPE_CHECKING:
    from siss.audit import Comparison

LABELS = {
    "pretrained": "Pretrained",
    "retrain": "Retrain",
    "naive": "Naive deletion",
    "naive-teacher": "Naive deletion, teacher keep target (SISS, s=0)",
    "siss-0": "SISS (λ=0)",
    "siss-0.5": "SISS (λ=0.5), teacher keep target",
    "siss-0.5-noise": "SISS (λ=0.5), noise keep target (the paper's)",
    "siss-0.5-nonmember": "SISS (λ=0.5), teacher keep target, stopped at the non-member level",
    "siss-0.5-track": "SISS (λ=0.5), teacher keep target, each noise level steered to the "
    "non-member level",
    "retrack": "ReTrack (to the nearest keep images)",
    "siss-nois": "SISS (No IS)",
    "erasediff": "EraseDiff",
    "siss-1": "SISS (λ=1)",
    "neggrad": "NegGrad",
}
PAPER = {  # Table 2 of the paper: steps, IS, NLL (bits/dim), p; a method not in it has no row
    "pretrained": ("117500", 9.6, 1.00, "0.74%"),
    "retrain": ("117500", 9.6, 6.17, "0%"),
    "naive": ("300", 9.5, 1.19, "0.04%"),
    "naive-teacher": ("300", 9.5, 1.19, "0.04%"),
    "siss-0": ("300", 9.4, 1.04, "0.003%"),
    "siss-0.5": ("300", 9.2, 8.09, "0%"),
    "siss-0.5-noise": ("300", 9.2, 8.09, "0%"),
    "siss-nois": ("300", 9.2, 8.68, "0%"),
    "erasediff": ("100", 5.1, 12.04, "N/A"),
    "siss-1": ("100", 1.2, 9.30, "N/A"),
    "neggrad": ("100", 1.3, 15.79, "N/A"),
}


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t interval (0 for a single value)."""
    mean, low, high = t_interval(torch.tensor(values, dtype=torch.float64), 0.95)
    return mean, 0.0 if len(values) < 2 else (high - low) / 2


def summarize(results: dict[str, list[dict]]) -> list[dict]:
    """A row per label: means with 95% t-intervals over the seeds, and the outlier count pooled
    over them with its exact interval. IS, FID and the rate come from each run's ``final``
    evaluation when every seed has one, from its in-run ``after`` one otherwise."""
    rows = []
    for label, runs in results.items():
        after = [r["after"] for r in runs]
        final = [r["final"] for r in runs] if all("final" in r for r in runs) else after
        row = {"label": label, "name": LABELS[label], "seeds": len(runs), "steps": runs[0]["steps"]}
        row["final_samples"] = final[0]["samples"] if final is not after else None
        for key, source in (
            ("inception_score", final),
            ("fid", final),
            ("outlier_nll_bpd", after),
            ("outlier_rate", final),
        ):
            values = [a[key] for a in source]
            # A run whose model diverged has no value here (None, or a NaN rate): the mean over
            # the seeds is then not measured either, never the mean of the others.
            if any(v is None or math.isnan(v) for v in values):
                row[key] = (math.nan, math.nan)
            else:
                row[key] = mean_ci(values)
        row["outlier_count"] = sum(a["outlier_count"] for a in final)
        row["samples"] = sum(a["samples"] for a in final)
        row["nonfinite_samples"] = sum(a.get("nonfinite_samples", 0) for a in final)
        finite = row["samples"] - row["nonfinite_samples"]
        row["outlier_rate_ci95"] = (math.nan, math.nan)  # not measured: see nonfinite_samples
        if finite > 0 and row["nonfinite_samples"] == 0:
            row["outlier_rate_ci95"] = proportion_ci(row["outlier_count"], finite)
        row["train_wall_s"] = mean_ci([r["train_wall_s"] for r in runs])
        rows.append(row)
    return rows


def table_markdown(rows: list[dict], process: str = "ddpm") -> str:
    """The results table; its header names the process (``"ddpm"`` or ``"flow"``)."""

    def fmt(pair: tuple[float, float], digits: int = 2) -> str:
        mean, half = pair
        if math.isnan(mean):
            return "not measured"
        return f"{mean:.{digits}f} ± {half:.{digits}f}"

    def fmt_rate(row: dict) -> str:
        low, high = row["outlier_rate_ci95"]
        if math.isnan(low):
            return f"not measured ({row['nonfinite_samples']} non-finite samples)"
        pct = 100 * row["outlier_count"] / row["samples"]
        return (
            f"{pct:.3f}% [{100 * low:.3f}, {100 * high:.3f}] "
            f"({row['outlier_count']}/{row['samples']})"
        )

    sizes = sorted({row["final_samples"] for row in rows if row["final_samples"]})
    source = (
        f"the final evaluation ({', '.join(f'{n:,}' for n in sizes)} samples a seed)"
        if sizes
        else "the in-run evaluation"
    )
    lines = [
        f"Process: {PROCESS_NAMES[process]}. IS, FID and the rate: {source}.",
        "",
        f"| method ({process}) | steps | IS ↑ | FID ↓ | outlier NLL (bpd) ↑ "
        "| outlier rate ↓ [95% CI] (pooled count) | train s | paper (DDPM): steps / IS / NLL / p |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        paper = PAPER.get(row["label"])
        paper_row = "not in the paper" if paper is None else " / ".join(map(str, paper))
        lines.append(
            f"| {row['name']} | {row['steps']} | {fmt(row['inception_score'])} | "
            f"{fmt(row['fid'])} | {fmt(row['outlier_nll_bpd'])} | {fmt_rate(row)} | "
            f"{row['train_wall_s'][0]:.0f} | {paper_row} |"
        )
    return "\n".join(lines) + "\n"


def spread_markdown(spread: list[dict]) -> str:
    """One sentence per draw size: the pretrained model's scores over disjoint draws."""

    def describe(values: list[float], digits: int) -> str:
        if any(v is None for v in values):
            return "not measured"
        sd = statistics.stdev(values) if len(values) > 1 else math.nan
        return (
            f"{statistics.fmean(values):.{digits}f} (sd {sd:.{digits}f}, range "
            f"{min(values):.{digits}f}–{max(values):.{digits}f})"
        )

    parts = [
        f"over {len(d['fid'])} disjoint draws of {d['samples_per_draw']:,} samples, FID "
        f"{describe(d['fid'], 2)} and IS {describe(d['inception_score'], 3)}"
        for d in spread
    ]
    return "The pretrained model's own spread from evaluation noise: " + "; ".join(parts) + ".\n"


def precision_markdown(check: dict) -> str:
    """One sentence: the final evaluation's precision against fp32 on the same noise."""
    low = check["precision"]
    parts = [
        f"{LABELS[label]}: {m['count_fp32']} (fp32) vs {m[f'count_{low}']} ({low}) T-shirts in "
        f"{m['samples']:,}, {m['verdicts_differing']} verdicts differing, median pixel change "
        f"{m['median_pixel_change']:.1e}"
        for label, m in check["models"].items()
    ]
    return (
        f"The final evaluation samples in {low}; against fp32 on the same noise "
        f"({check['sampler']}, seed {check['seed']}): " + "; ".join(parts) + ".\n"
    )


def plot(results: dict[str, list[dict]], rows: list[dict], folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, runs in results.items():
        if label in ("pretrained", "retrain"):
            continue
        steps = [h["step"] for h in runs[0]["history"]]
        # pooled over the seeds, with the exact 95% interval of the pooled count
        counts = [sum(r["history"][i]["outlier_count"] for r in runs) for i in range(len(steps))]
        totals = [sum(r["history"][i]["samples"] for r in runs) for i in range(len(steps))]
        rates = [c / n for c, n in zip(counts, totals, strict=True)]
        bounds = [proportion_ci(c, n) for c, n in zip(counts, totals, strict=True)]
        errors = [
            [100 * (r - lo) for r, (lo, _) in zip(rates, bounds, strict=True)],
            [100 * (hi - r) for r, (_, hi) in zip(rates, bounds, strict=True)],
        ]
        ax.errorbar(
            steps, [100 * r for r in rates], yerr=errors, marker="o", capsize=3, label=LABELS[label]
        )
    ax.set_xlabel("unlearning step")
    ax.set_ylabel("outlier rate (%)")
    ax.set_title(
        f"T-shirt generation rate (pooled over {len(next(iter(results.values())))} seeds, 95% CI)"
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(folder / "outlier_rate_vs_step.png") as tmp:
        fig.savefig(tmp, dpi=130)
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
    with atomic_path(folder / "quality_vs_unlearning.png") as tmp:
        fig.savefig(tmp, dpi=130)
    plt.close(fig)


KEY_STATISTICS = ("percentile", "rate")
"""The statistic of a check that the audit table shows, the first of these it has (else its
first): the forget image's rank among the non-member references, or the generation rate. A
check with a percentile per noise level (``reconstruction_sweep``'s ``percentile@t=50``, ...)
gets a column per level instead."""


def key_statistics(names: list[str]) -> list[str]:
    """The statistics of a check that get a column of ``audit_markdown``: its per-level
    percentiles (``percentile@...``) if it has them, else the first of ``KEY_STATISTICS`` it
    has, else its first statistic (none for a check without statistics)."""
    per_level = [name for name in names if name.startswith("percentile@")]
    if per_level:
        return per_level
    key = next((s for s in KEY_STATISTICS if s in names), names[0] if names else None)
    return [] if key is None else [key]


def audit_markdown(comparisons: dict[str, list[Comparison]]) -> str:
    """The audit against the retrained model: per method (a row) and check (a column; one per
    noise level for a check that ranks the image per level), the verdicts over the seeds, the
    key statistic's mean beside the retrained model's (same seeds) and on how many seeds it
    lies within the retrained model's interval. ``comparisons``: per method label, one
    ``siss.audit.compare(None, method_audit, retrain_audit)`` per seed."""
    first = next(iter(comparisons.values()))[0]
    columns = []
    for check, image in dict.fromkeys((row.check, row.image) for row in first.rows):
        names = [r.statistic for r in first.rows if (r.check, r.image) == (check, image)]
        name = check if image == 0 else f"{check} ({'all' if image is None else f'image {image}'})"
        keys = key_statistics(names) or [None]
        for key in keys:
            suffix = f" {key.removeprefix('percentile')}" if key and len(keys) > 1 else ""
            columns.append((check, image, key, name + suffix))
    lines = [
        "Audit against the retrained model, per check: the verdicts over the seeds; the key "
        "statistic's mean (the model's → the retrained model's, same seeds); on how many "
        "seeds it lies within the retrained model's interval.",
        "",
        "| method | " + " | ".join(column[3] for column in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for label, per_seed in comparisons.items():
        cells = [_audit_cell(per_seed, check, image, key) for check, image, key, _ in columns]
        lines.append(f"| {LABELS.get(label, label)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _audit_cell(per_seed: list[Comparison], check: str, image: int | None, key: str | None) -> str:
    """One method's cell of ``audit_markdown`` for statistic ``key`` of ``check`` on ``image``."""
    verdicts = [
        after or "absent"
        for comparison in per_seed
        for name, index, _, after, _ in comparison.verdicts
        if (name, index) == (check, image)
    ]
    counts = ", ".join(f"{v} {verdicts.count(v)}" for v in dict.fromkeys(verdicts))
    rows = [
        [r for r in comparison.rows if (r.check, r.image) == (check, image)]
        for comparison in per_seed
    ]
    chosen = [next((r for r in seed_rows if r.statistic == key), None) for seed_rows in rows]
    if key is None or any(r is None or r.reference is None for r in chosen):
        return f"{counts}; {key or 'no statistic'} not compared"
    missing = [[e for e in (r.second, r.reference) if not e.measured] for r in chosen]
    if any(missing):
        seeds = "any seed" if all(missing) else "every seed"
        why = "; ".join(dict.fromkeys(e.note or e.status for seed in missing for e in seed))
        return f"{counts}; {key} not measured on {seeds} ({why})"
    values = [(r.second.value, r.reference.value) for r in chosen]
    mine, retrain = (statistics.fmean(v) for v in zip(*values, strict=True))
    within = [r.within for r in chosen]  # None: the retrained model's has no interval
    inside = "no interval" if None in within else f"{sum(within)}/{len(within)}"
    return f"{counts}; {key} {mine:.3g} → {retrain:.3g}; within {inside}"
