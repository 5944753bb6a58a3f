"""One matplotlib figure per ``AuditReport``: what was forgotten, what the model generates near it,
and where each statistic sits against the reference (non-member) images.

Panels:

* top row: the forget image(s), a few reference images, and the gallery of the samples nearest
  forget image 0 with their distances (red frame: within the generation threshold);
* "rank among non-members": per check, the fraction of reference images that look *more*
  member-like than the forget image (the percentile, turned so that 0 is "more member-like than
  every non-member" for every check), with its exact interval; the shaded band is the "held"
  zone of the verdict (the 5% level by default);
* the reconstruction sweep: the forget image's similarity at each ``t`` with its interval, and the
  reference images' (1 - p)-quantile the verdict compares against;
* the generation rate with its Clopper-Pearson interval, and every statistic that could not be
  measured, with the reason (never drawn as 0).

* "reference distribution": per check (likelihood, reconstruction, membership), a histogram of
  the reference images' own values (``details["reference_values"]``) with each forget image's
  value as a vertical line and its interval as a band; a check without reference values (an
  older report) says so instead.

Many forget images (e.g. a member set for the membership AUC): the per-image panels show the
first ``MAX_SHOWN`` and say how many of all are held; the histograms draw every forget image's
value as a second histogram instead of lines; the verdict text adds the set-level statistics
(AUC, TPR at low FPR) with their intervals.
"""

from __future__ import annotations

import math
import os
import textwrap
from pathlib import Path
from typing import Any

import torch

from siss._files import atomic_path
from siss._optional import needs
from siss.audit.report import AuditReport, CheckResult

__all__ = ["audit_figure", "save_figure"]

_RANKED = (
    ("generation", "nearest_percentile", "nearest-sample distance"),
    ("likelihood", "percentile", "NLL (bits/dim)"),
    ("reconstruction", "percentile", "reconstruction SSIM, t=250"),
    ("membership", "percentile", "denoising loss (membership)"),
)
# (check, statistic of the forget image, axis label) of the reference histograms
_HISTOGRAMS = (
    ("likelihood", "nll_bpd", "NLL (bits/dim; lower: member-like)"),
    ("reconstruction", "similarity", "similarity (higher: member-like)"),
    ("membership", "error", "denoising loss (lower: member-like)"),
)
_COLORS = ("tab:red", "tab:orange", "tab:purple", "tab:brown")
MAX_SHOWN = 4  # forget images drawn one by one; beyond it, counts and histograms


def _show(ax: Any, image: Any, data_range: tuple[float, float], title: str = "") -> None:
    array = torch.as_tensor(image, dtype=torch.float64)
    lo, hi = data_range
    array = ((array - lo) / (hi - lo)).clamp(0, 1)
    if array.dim() == 3:  # one channel (or not 3, e.g. 4 latent channels): the first, gray
        array = array.permute(1, 2, 0) if array.shape[0] == 3 else array[0]
    ax.imshow(array.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=7)


def _results(report: AuditReport, check: str) -> list[CheckResult]:
    return [r for r in report.results if r.check == check]


_VERDICT_COLORS = {
    "held": "tab:red",
    "not held": "tab:blue",
    "overshot": "tab:green",
    "undecided": "tab:gray",
}


def _verdict(result: CheckResult) -> str:
    return str(result.verdict)


def audit_figure(
    report: AuditReport,
    *,
    forget: torch.Tensor | None = None,
    reference: torch.Tensor | None = None,
    max_reference: int = 4,
) -> Any:
    """The figure of ``report`` (a ``matplotlib.figure.Figure``; see the module docstring).

    Args:
        report: an audit (e.g. from ``siss.audit.audit`` or ``AuditReport.from_dict``).
        forget: ``(M, *S)`` the forget images, to show them (optional).
        reference: ``(R, *S)`` the reference images; the first ``max_reference`` are shown.
    """
    with needs("siss.audit.figure"):
        from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    data_range = tuple(report.config.get("data_range", (-1.0, 1.0)))
    generation = _results(report, "generation")
    gallery = generation[0].details.get("gallery_images") if generation else None
    forget_images = [] if forget is None else list(forget.detach().cpu()[:4])
    reference_images = [] if reference is None else list(reference.detach().cpu()[:max_reference])
    top = len(forget_images) + len(reference_images) + (len(gallery) if gallery else 0)
    columns = max(top, 8)

    fig = Figure(figsize=(max(8.0, 0.9 * columns), 9.6))
    grid = fig.add_gridspec(4, columns, height_ratios=[0.8, 1.6, 1.6, 1.6], hspace=0.6, wspace=0.3)
    column = 0
    for i, image in enumerate(forget_images):
        _show(fig.add_subplot(grid[0, column]), image, data_range, f"forget {i}")
        column += 1
    for i, image in enumerate(reference_images):
        _show(fig.add_subplot(grid[0, column]), image, data_range, f"ref {i}")
        column += 1
    if gallery:
        details = generation[0].details
        threshold = details.get("threshold", math.inf)
        for image, distance in zip(gallery, details.get("gallery_distances", []), strict=False):
            ax = fig.add_subplot(grid[0, column])
            _show(ax, image, data_range, f"d={distance:.2f}")
            if distance < threshold:
                for spine in ax.spines.values():
                    spine.set_edgecolor("red")
                    spine.set_linewidth(2)
            column += 1

    half = columns // 2
    _rank_panel(fig.add_subplot(grid[1, :half]), report)
    _sweep_panel(fig.add_subplot(grid[1, half:]), report)
    _generation_panel(fig.add_subplot(grid[2, :half]), report)
    _missing_panel(fig.add_subplot(grid[2, half:]), report)
    bottom = grid[3, :].subgridspec(1, len(_HISTOGRAMS), wspace=0.3)
    for k, (check, name, label) in enumerate(_HISTOGRAMS):
        _histogram_panel(fig.add_subplot(bottom[0, k]), report, check, name, label)
    seed = report.config.get("seed")
    fig.suptitle(
        f"Audit of {report.model} (seed {seed}); top: forget, reference (non-members), "
        "nearest samples (red: within the generation threshold)",
        fontsize=9,
    )
    return fig


def _held_count(results: list[CheckResult]) -> str:
    text = f"{sum(r.verdict == 'held' for r in results)} of {len(results)} images held"
    overshot = sum(r.verdict == "overshot" for r in results)
    return text + (f", {overshot} overshot" if overshot else "")


def _rank_panel(ax: Any, report: AuditReport) -> None:
    rows, more = [], []
    for check, name, label in _RANKED:
        per_image = [
            r for r in _results(report, check) if r.image is not None and name in r.statistics
        ]
        for result in per_image[:MAX_SHOWN]:
            rows.append((f"{label}, image {result.image}", result, result.statistics[name]))
        if len(per_image) > MAX_SHOWN:
            more.append(f"{check}: first {MAX_SHOWN} shown; {_held_count(per_image)}")
    title = "rank among non-members: share of reference more member-like"
    ax.set_title(title + ("\n" + "; ".join(more) if more else ""), fontsize=8 if not more else 7)
    if not rows:
        ax.text(0.5, 0.5, "no ranked check in this audit", ha="center", va="center", fontsize=8)
        ax.set_axis_off()
        return
    level = _level(report)
    ax.axvspan(0, level, color="tab:red", alpha=0.12, label=f"held zone (< {level:g})")
    ax.axvspan(
        1 - level, 1, color="tab:green", alpha=0.12, label=f"overshot zone (> {1 - level:g})"
    )
    for y, (_, result, estimate) in enumerate(rows):
        if not estimate.measured:
            ax.text(0.02, y, f"{estimate.status}: {estimate.note[:60]}", va="center", fontsize=6)
            continue
        flip = estimate.held_when == "higher"
        value = 1 - estimate.value if flip else estimate.value
        low, high = (1 - estimate.high, 1 - estimate.low) if flip else (estimate.low, estimate.high)
        color = _VERDICT_COLORS[str(result.verdict)]
        ax.errorbar(
            value,
            y,
            xerr=[[value - low], [high - value]],
            fmt="o",
            color=color,
            capsize=3,
        )
        # the label beside the interval, on whichever side has room inside the panel
        right = high <= 0.6
        ax.text(
            high + 0.02 if right else low - 0.02,
            y + 0.25,
            f"{value:.2f} [{low:.2f}, {high:.2f}] n={estimate.n}: {_verdict(result)}",
            fontsize=6,
            ha="left" if right else "right",
        )
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=6)
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.invert_yaxis()
    ax.tick_params(axis="x", labelsize=6)
    ax.legend(fontsize=6, loc="lower right")


def _histogram_panel(ax: Any, report: AuditReport, check: str, name: str, label: str) -> None:
    """The reference values of ``check`` as a histogram, each forget image's ``name`` statistic
    as a vertical line with its interval as a band."""
    rows = [r for r in _results(report, check) if r.image is not None]
    ax.set_title(check, fontsize=8)
    values = rows[0].details.get("reference_values") if rows else None
    if not rows or values is None:
        why = f"no {check} check in this audit" if not rows else "no reference values stored"
        ax.text(0.5, 0.5, why, ha="center", va="center", fontsize=7)
        ax.set_axis_off()
        return
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if finite:
        ax.hist(finite, bins=min(30, max(5, len(finite) // 3)), color="tab:gray", alpha=0.6)
    dropped = len(values) - len(finite)
    title = f"{check}: {len(values)} reference values"
    title += f" ({dropped} non-finite, not drawn)" if dropped else ""
    ax.set_title(title, fontsize=7)
    text = "" if finite else "no finite reference value"
    if len(rows) > MAX_SHOWN:
        own = [
            r.statistics[name].value
            for r in rows
            if name in r.statistics and r.statistics[name].measured
        ]
        if own:
            ax.hist(
                own,
                bins=min(30, max(5, len(own) // 3)),
                color="tab:red",
                alpha=0.5,
                label=f"{len(own)} forget images",
            )
            ax.set_title(f"{title}; {_held_count(rows)}", fontsize=7)
        if len(own) < len(rows):
            text += f"\n{len(rows) - len(own)} forget values not measured (not drawn)"
        rows = []  # drawn as a histogram, not as lines
    for k, result in enumerate(rows[:MAX_SHOWN]):
        estimate = result.statistics.get(name)
        color = _COLORS[k % len(_COLORS)]
        if estimate is None or not estimate.measured:
            status = "missing" if estimate is None else estimate.status
            text += f"\nforget {result.image}: {status} (not drawn)"
            continue
        if math.isfinite(estimate.low) and math.isfinite(estimate.high):
            ax.axvspan(estimate.low, estimate.high, color=color, alpha=0.2)
        ax.axvline(
            estimate.value,
            color=color,
            lw=1.5,
            label=f"forget {result.image}: {estimate.value:.3g} ({_verdict(result)})",
        )
    if text.strip():
        ax.text(0.02, 0.02, text.strip(), transform=ax.transAxes, va="bottom", fontsize=6)
    ax.set_xlabel(label, fontsize=7)
    ax.set_ylabel("reference images", fontsize=7)
    ax.tick_params(labelsize=6)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6, loc="best")


def _level(report: AuditReport) -> float:
    for result in _results(report, "likelihood") + _results(report, "reconstruction"):
        level = result.details.get("quantile_level")
        if isinstance(level, float):
            return min(level, 1 - level)
    return 0.05


def _sweep_panel(ax: Any, report: AuditReport) -> None:
    sweep = [r for r in _results(report, "reconstruction_sweep") if r.image is not None]
    ax.set_title("reconstruction sweep: similarity vs noise level", fontsize=8)
    if not sweep:
        ax.text(0.5, 0.5, "no sweep in this audit", ha="center", va="center", fontsize=8)
        ax.set_axis_off()
        return
    for result in sweep[:4]:
        ts = result.details.get("ts", [])
        points, quantiles = [], []
        for t in ts:
            estimate = result.statistics.get(f"similarity@t={t}")
            per_t = result.details.get("per_t", {}).get(str(t), {})
            quantiles.append(per_t.get("reference_quantile", math.nan))
            if estimate is not None and estimate.measured:
                points.append((t, estimate.value, estimate.low, estimate.high))
        if points:
            t_, v, lo, hi = zip(*points, strict=True)
            err = [
                [max(0.0, a - b) if math.isfinite(b) else 0.0 for a, b in zip(v, lo, strict=True)],
                [max(0.0, b - a) if math.isfinite(b) else 0.0 for a, b in zip(v, hi, strict=True)],
            ]
            ax.errorbar(
                t_, v, yerr=err, fmt="o-", capsize=3, label=f"forget {result.image}", markersize=4
            )
        if any(math.isfinite(q) for q in quantiles):
            ax.plot(ts, quantiles, "k--", lw=1, label="reference quantile (held above)")
    ax.set_xlabel("t", fontsize=7)
    ax.set_ylabel("similarity", fontsize=7)
    ax.tick_params(labelsize=6)
    ax.legend(fontsize=6)


def _generation_panel(ax: Any, report: AuditReport) -> None:
    rows = [r for r in _results(report, "generation") if r.image is not None]
    ax.set_title("generation rate (exact 95% interval)", fontsize=8)
    if not rows:
        ax.text(0.5, 0.5, "no generation check in this audit", ha="center", va="center")
        ax.set_axis_off()
        return
    if len(rows) > MAX_SHOWN:
        ax.set_title(
            f"generation rate (exact 95% interval); first {MAX_SHOWN} shown, {_held_count(rows)}",
            fontsize=7,
        )
        rows = rows[:MAX_SHOWN]
    top = 0.0
    for y, result in enumerate(rows):
        rate = result.statistics["rate"]
        if not rate.measured:
            ax.text(0.0, y, f"{rate.status}: {rate.note[:70]}", va="center", fontsize=6)
            continue
        count = result.details.get("count", 0)
        ax.errorbar(
            rate.value,
            y,
            xerr=[[rate.value - rate.low], [rate.high - rate.value]],
            fmt="o",
            capsize=3,
            color=_VERDICT_COLORS[str(result.verdict)],
        )
        ax.text(
            rate.high,
            y + 0.2,
            f" {count}/{rate.n} = {rate.value:.3%} [{rate.low:.3%}, {rate.high:.3%}]: "
            f"{_verdict(result)}",
            fontsize=6,
        )
        top = max(top, rate.high)
    ax.set_xlim(-0.02 * max(top, 1e-3), max(top, 1e-3) * 2.2)
    ax.set_yticks(range(len(rows)), [f"image {r.image}" for r in rows], fontsize=6)
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.tick_params(axis="x", labelsize=6)
    ax.set_xlabel("share of samples within the threshold", fontsize=7)


def _missing_panel(ax: Any, report: AuditReport) -> None:
    ax.set_axis_off()
    lines, missing = [], 0
    for result in report.results:
        image = "all" if result.image is None else result.image
        for name, estimate in result.statistics.items():
            if not estimate.measured:
                missing += 1
                if missing > 6:  # e.g. one per forget image: the first few say why
                    continue
                lines.append(f"{result.check}[{image}].{name}: {estimate.status}")
                wrapped = textwrap.wrap(estimate.note, 95, max_lines=2, placeholder=" ...")
                lines.extend(f"    {line}" for line in wrapped)
    if missing > 6:
        lines.append(f"... and {missing - 6} more (audit.json)")
    verdicts = []
    for r in report.results:
        if r.image not in (0, None):
            continue
        line = f"  {r.check}{'' if r.image == 0 else ' (set)'}: {_verdict(r)}"
        if r.image is None:
            measured = [f"{n} {e.format()}" for n, e in r.statistics.items() if e.measured]
            line += ("; " + ", ".join(measured)) if measured else ""
        verdicts.append(line)
    text = "verdicts, image 0:\n" + "\n".join(verdicts) + "\n\n"
    text += "not measured:\n" + "\n".join(lines) if lines else "every statistic was measured"
    ax.text(0.0, 1.0, text, va="top", ha="left", fontsize=6, family="monospace", wrap=True)


def save_figure(
    report: AuditReport,
    path: str | os.PathLike,
    *,
    forget: torch.Tensor | None = None,
    reference: torch.Tensor | None = None,
    dpi: int = 110,
) -> Path:
    """Draw ``audit_figure`` and write it to ``path`` (PNG) atomically."""
    path = Path(path)
    fig = audit_figure(report, forget=forget, reference=reference)
    with atomic_path(path) as tmp:  # the format from the suffix, as savefig(path) would
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=path.suffix[1:] or "png")
    return path
