"""An auditor's loss statistic at single noise levels: where does a digits model rank the T-shirt?

For each model, the T-shirt's noise-prediction error at one noise level (``--ranks``: ranks on a
1000-step grid by σ, the least noisy first, so the same ranks mean the same noise on the DDPM's
ascending and the flow model's descending grid), averaged over ``--draws`` noise draws, is ranked
among the audit's ``--references`` T-shirt variants (``make_tshirt_variants``, seed 1), scored by
the same model with the same draws (``siss.audit.membership.denoising_errors``, generator seed 0
for each level). A retrained model puts the T-shirt near 0.5 at every level; docs/results.md,
"Stopping at the non-member level", compares the models with it::

    python -m benchmarks.nonmember_levels examples/assets/pretrained examples/assets/retrain \\
        outputs/unlearn/nonmember/model
    python -m benchmarks.nonmember_levels --scheduler examples/assets/flow-pretrained \\
        examples/assets/flow-pretrained examples/assets/flow-retrain outputs/unlearn/flow/model

How far apart two models' percentiles may lie by chance: ``--repeats R`` scores each model again
with noise draws seeded 1 .. R-1, each time ranking the T-shirt among a bootstrap resample of the
references' scores (seeded too), and prints each level's mean and standard deviation over the R
repeats. Two models that treat the T-shirt alike differ in one auditor's run (one draw seed, one
reference set) by less than about twice the root of the sum of their variances.

One CPU thread; about a minute per model and repeat on 2 CPU cores.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import UNet2DModel

from siss._cli import CommandParser, flag
from siss._digits.data import make_tshirt, make_tshirt_variants
from siss._digits.models import load_scheduler
from siss.adapters import schedule_from_scheduler
from siss.audit.membership import denoising_errors


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, each checked before any model loads (a bad one: its name, exit 2)."""
    p = CommandParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", help="digits model folders (save_pretrained)")
    flag(
        p,
        "--scheduler",
        default="examples/assets/pretrained",
        help="folder whose scheduler_config.json all the models share",
    )
    flag(p, "--ranks", type=int, nargs="+", default=[50, 100, 250, 500], at_least=0, at_most=999,
         help="noise ranks on a 1000-step grid by σ, the least noisy first")  # fmt: skip
    flag(p, "--draws", type=int, default=16, at_least=1, help="noise draws per image and level")
    flag(p, "--references", type=int, default=128, at_least=1, help="T-shirt variants (seed 1)")
    flag(
        p,
        "--repeats",
        type=int,
        default=1,
        at_least=1,
        help="repeats with other noise draws and bootstrap-resampled references (module docstring)",
    )
    p.add_check(_saved_folders)
    return p.parse_args(argv)


def _saved_folders(args: argparse.Namespace) -> None:
    """Each model folder holds a config.json and the scheduler folder a scheduler_config.json."""
    for folder in args.models:
        if not (Path(folder) / "config.json").is_file():
            raise ValueError(f"{folder}: no config.json there (a save_pretrained model folder)")
    if not (Path(args.scheduler) / "scheduler_config.json").is_file():
        raise ValueError(f"--scheduler {args.scheduler}: no scheduler_config.json there")


def percentile(reference_errors: torch.Tensor, forget_error: torch.Tensor) -> float:
    """The share of references denoised better than the forget image (``(R,)`` and ``(1,)``)."""
    return (reference_errors < forget_error).double().mean().item()


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    args = parse_args(argv)
    torch.set_num_threads(1)
    references, _ = make_tshirt_variants(args.references, torch.Generator().manual_seed(1))
    tshirt = make_tshirt(references.shape[-1]).unsqueeze(0)
    scheduler = load_scheduler(args.scheduler)
    order = schedule_from_scheduler(scheduler).sigma.argsort()
    table, spread = {}, {}
    print("model | " + " | ".join(f"rank {rank}" for rank in args.ranks))
    for path in args.models:
        model = UNet2DModel.from_pretrained(path).eval()
        repeats = torch.empty(args.repeats, len(args.ranks), dtype=torch.float64)
        for repeat in range(args.repeats):
            # repeat 0: every reference, draws seeded 0 (the table); then a bootstrap resample
            resample = torch.Generator().manual_seed(1000 + repeat)
            chosen = (
                torch.arange(len(references))
                if repeat == 0
                else torch.randint(len(references), (len(references),), generator=resample)
            )
            for column, rank in enumerate(args.ranks):
                level = [int(order[rank])]

                def errors(images, model=model, level=level, seed=repeat) -> torch.Tensor:
                    generator = torch.Generator().manual_seed(seed)
                    return denoising_errors(
                        model, scheduler, images, timesteps=level, noise_draws=args.draws,
                        generator=generator, batch_size=512,
                    )  # fmt: skip

                repeats[repeat, column] = percentile(errors(references)[chosen], errors(tshirt))
        table[path] = repeats[0].tolist()
        print(f"{path} | " + " | ".join(f"{value:.3f}" for value in table[path]), flush=True)
        if args.repeats > 1:
            spread[path] = (repeats.mean(0).tolist(), repeats.std(0).tolist())
    if spread:
        print(f"mean ± standard deviation over {args.repeats} repeats (module docstring)")
        for path, (means, deviations) in spread.items():
            cells = (f"{m:.3f} ± {d:.3f}" for m, d in zip(means, deviations, strict=True))
            print(f"{path} | " + " | ".join(cells))
    return table


if __name__ == "__main__":
    main()
