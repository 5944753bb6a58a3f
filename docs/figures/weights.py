"""Draw the defensive-mixture sampler's importance weights against the timestep (docs/math.md).

For a keep point ``x`` and a forget point ``a`` at a few distances ``||x - a||`` (pixels in
[-1, 1]), each timestep ``t`` of the linear DDPM schedule (1000 steps, betas 1e-4 .. 0.02) draws
``--rows`` noisy points from ``q_λ(m_t|x, a) = (1-λ) q(m_t|x) + λ q(m_t|a)`` with
``siss.mixture_sample`` and weighs them with ``siss.importance_weights``, the library's own code.
The left panels show the median and the 10–90% band of ``w_x`` and ``w_a`` over the rows drawn
from ``x`` (solid) and over those drawn from ``a`` (dashed): where the noise is small compared
with the gap the weights saturate at ``{0, 1/(1-λ)}`` and ``{0, 1/λ}`` (Eqs. 9–10), and only at the
noisiest timesteps do they approach 1. The right panel shows their means over all rows, which are
1 at every ``t`` (``E_{q_λ}[w] = 1``, the identity behind Lemma 1), within the Monte Carlo error.
The weights depend on ``x`` and ``a`` only through the gap (noise orthogonal to ``x - a`` cancels
in the log-ratio), so ``x = 0`` and ``a`` a constant image of norm ``gap`` stand for any pair. It
also prints, per gap, the largest deviation of the means from 1 in standard errors, and the share
of rows that train both terms (both weights above 0.2) at t = 999 and over uniform t.

    python docs/figures/weights.py                     # writes outputs/figures/weights.png (~10 s)
    python docs/figures/weights.py --docs docs/figures  # and the shipped docs/figures/weights.png
"""

from __future__ import annotations

import argparse
import math
import shutil
from pathlib import Path

import torch

from siss import NoiseSchedule
from siss._files import atomic_path
from siss.functional import importance_weights, mixture_sample

GAPS = (1.0, 10.0, 100.0, 400.0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--out", type=Path, default=Path("outputs/figures/weights.png"), help="the PNG to write"
    )
    parser.add_argument(
        "--docs",
        type=Path,
        default=None,
        metavar="DIR",
        help="also copy the PNG into DIR as weights.png: `--docs docs/figures` regenerates the "
        "shipped figure (default: none)",
    )
    parser.add_argument("--lam", type=float, default=0.5, help="mixture weight λ, in (0, 1)")
    parser.add_argument("--gaps", type=float, nargs="+", default=list(GAPS), help="||x - a||")
    parser.add_argument("--rows", type=int, default=4000, help="noisy points per timestep")
    parser.add_argument("--every", type=int, default=5, help="plot every this many timesteps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 0 < args.lam < 1:
        parser.error(f"--lam must lie in (0, 1), got {args.lam}")
    if args.rows < 10:
        parser.error(f"--rows must be at least 10, got {args.rows}")
    if args.every < 1:
        parser.error(f"--every must be >= 1, got {args.every}")
    if any(not (math.isfinite(gap) and gap > 0) for gap in args.gaps):
        parser.error(f"--gaps must be positive numbers, got {args.gaps}")
    return args


def weight_curves(
    gap: float, lam: float, rows: int, every: int, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Per plotted timestep: quantiles of ``w_x``, ``w_a`` by the row's source, and their means.

    Returns ``{"t": (S,), "x_from_x": (S, 3), "x_from_a": (S, 3), "a_from_x": (S, 3),
    "a_from_a": (S, 3), "mean_x": (S,), "mean_a": (S,), "stderr": (S, 2)}`` with the 10%, 50% and
    90% quantiles in the last dimension of the ``(S, 3)`` tensors.
    """
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    schedule = NoiseSchedule.from_alphas_cumprod(torch.cumprod(1 - betas, 0))
    size = 16  # values per image: a 1x4x4 "image"; only the gap matters
    x0 = torch.zeros(rows, 1, 4, 4)
    a0 = torch.full((rows, 1, 4, 4), gap / math.sqrt(size))
    levels = torch.tensor([0.1, 0.5, 0.9])
    curves: dict[str, list[torch.Tensor]] = {
        key: []
        for key in (
            "t",
            "x_from_x",
            "x_from_a",
            "a_from_x",
            "a_from_a",
            "mean_x",
            "mean_a",
            "stderr",
        )
    }
    for t in range(0, len(schedule), every):
        gamma = schedule.gamma[t].expand(rows)
        sigma = schedule.sigma[t].expand(rows)
        noisy, from_forget = mixture_sample(x0, a0, gamma, sigma, lam, generator)
        w_x, w_a = importance_weights(noisy, x0, a0, gamma, sigma, lam)
        curves["t"].append(torch.tensor(t))
        for name, weights in (("x", w_x), ("a", w_a)):
            for source, rows_from in (("x", ~from_forget), ("a", from_forget)):
                picked = weights[rows_from]
                quantiles = (
                    torch.quantile(picked, levels) if len(picked) else torch.full((3,), math.nan)
                )
                curves[f"{name}_from_{source}"].append(quantiles)
        curves["mean_x"].append(w_x.mean())
        curves["mean_a"].append(w_a.mean())
        curves["stderr"].append(torch.stack([w_x.std(), w_a.std()]) / math.sqrt(rows))
    return {key: torch.stack(values) for key, values in curves.items()}


def mixed_share(
    gap: float, lam: float, rows: int, t: int | None, generator: torch.Generator
) -> float:
    """Share of mixture rows whose two weights both exceed 0.2 (both terms train on the row), at
    timestep ``t`` or, for ``None``, over uniformly drawn timesteps."""
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    schedule = NoiseSchedule.from_alphas_cumprod(torch.cumprod(1 - betas, 0))
    x0 = torch.zeros(rows, 16)
    a0 = torch.full((rows, 16), gap / 4)  # norm `gap`
    indices = schedule.sample_indices(rows, t, generator=generator)
    gamma, sigma = schedule.gamma[indices], schedule.sigma[indices]
    noisy, _ = mixture_sample(x0, a0, gamma, sigma, lam, generator)
    w_x, w_a = importance_weights(noisy, x0, a0, gamma, sigma, lam)
    return ((w_x > 0.2) & (w_a > 0.2)).float().mean().item()


def draw(args: argparse.Namespace) -> dict[float, dict[str, torch.Tensor]]:
    """Compute the curves and write the figure to ``args.out`` (atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    generator = torch.Generator().manual_seed(args.seed)
    results = {
        gap: weight_curves(gap, args.lam, args.rows, args.every, generator) for gap in args.gaps
    }
    figure, axes = plt.subplots(1, 3, figsize=(14, 4.2), constrained_layout=True)
    colors = plt.get_cmap("viridis")(torch.linspace(0, 0.85, len(args.gaps)).tolist())
    for (gap, curves), color in zip(results.items(), colors, strict=True):
        t = curves["t"].numpy()
        for axis, name in ((axes[0], "x"), (axes[1], "a")):
            for source, style in (("x", "-"), ("a", "--")):
                band = curves[f"{name}_from_{source}"].numpy()
                label = f"‖x − a‖ = {gap:g}" if (name, source) == ("x", "x") else None
                axis.plot(t, band[:, 1], style, color=color, label=label)
                axis.fill_between(t, band[:, 0], band[:, 2], color=color, alpha=0.12, lw=0)
        axes[2].plot(t, curves["mean_x"].numpy(), "-", color=color)
        axes[2].plot(t, curves["mean_a"].numpy(), "--", color=color)
    bound_x, bound_a = 1 / (1 - args.lam), 1 / args.lam
    for axis, name, bound in ((axes[0], "w_x", bound_x), (axes[1], "w_a", bound_a)):
        axis.axhline(bound, color="grey", lw=0.8, ls=":")
        axis.text(
            5,
            bound,
            f" bound {bound:g} (Eq. {9 if name == 'w_x' else 10})",
            va="bottom",
            color="grey",
            fontsize=8,
        )
        axis.set_title(f"${name[0]}_{name[2]}$: median and 10–90% of rows")
        axis.set_xlabel("timestep t (0: least noise)")
        axis.set_ylim(-0.05, max(bound_x, bound_a) * 1.12)
    axes[0].set_ylabel(f"importance weight (λ = {args.lam:g})")
    axes[0].plot([], [], "k-", label="rows drawn from x")
    axes[0].plot([], [], "k--", label="rows drawn from a")
    axes[0].legend(fontsize=8, loc="center left")
    axes[2].axhline(1.0, color="grey", lw=0.8, ls=":")
    axes[2].set_title("mean over all rows: $w_x$ (solid), $w_a$ (dashed)")
    axes[2].set_xlabel("timestep t (0: least noise)")
    axes[2].set_ylim(0.8, 1.2)
    figure.suptitle(
        f"Defensive-mixture importance weights, linear DDPM schedule, λ = {args.lam:g}, "
        f"{args.rows} rows per timestep"
    )
    try:
        with atomic_path(args.out) as temporary:
            figure.savefig(temporary, dpi=110)
    finally:
        plt.close(figure)
    return results


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    results = draw(args)
    print(f"wrote {args.out}")
    if args.docs is not None:
        with atomic_path(args.docs / "weights.png") as temporary:
            shutil.copyfile(args.out, temporary)
        print(f"wrote {args.docs / 'weights.png'}")
    # Each mean is a Monte Carlo estimate: |z| > 2 at ~5% of the timesteps is what chance gives.
    print("gap     timesteps   largest |mean w_x - 1| / stderr   share of timesteps with |z| > 2")
    for gap, curves in results.items():
        # The weights of a nearly noiseless gap are all 1: no spread to divide by.
        stderr = curves["stderr"][:, 0].clamp(min=1e-6)
        z = (curves["mean_x"] - 1).abs() / stderr
        print(f"{gap:<7g} {len(z):9d} {z.max():33.2f} {(z > 2).float().mean():33.1%}")
    generator = torch.Generator().manual_seed(args.seed + 1)
    print("gap     rows with both weights > 0.2: at t = 999   over uniform t")
    for gap in args.gaps:
        at_999 = mixed_share(gap, args.lam, 20_000, 999, generator)
        uniform = mixed_share(gap, args.lam, 200_000, None, generator)
        print(f"{gap:<7g} {at_999:38.1%} {uniform:16.1%}")


if __name__ == "__main__":
    main()
