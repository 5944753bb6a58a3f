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

One CPU thread; about a minute per model on 2 CPU cores.
"""

from __future__ import annotations

import argparse

import torch
from diffusers import UNet2DModel

from siss._digits.data import make_tshirt, make_tshirt_variants
from siss._digits.models import load_scheduler
from siss.adapters import schedule_from_scheduler
from siss.audit.membership import denoising_errors


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", help="digits model folders (save_pretrained)")
    p.add_argument(
        "--scheduler",
        default="examples/assets/pretrained",
        help="folder whose scheduler_config.json all the models share",
    )
    p.add_argument("--ranks", type=int, nargs="+", default=[50, 100, 250, 500])
    p.add_argument("--draws", type=int, default=16, help="noise draws per image and level")
    p.add_argument("--references", type=int, default=128, help="T-shirt variants (seed 1)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    args = parse_args(argv)
    torch.set_num_threads(1)
    references, _ = make_tshirt_variants(args.references, torch.Generator().manual_seed(1))
    tshirt = make_tshirt(references.shape[-1]).unsqueeze(0)
    scheduler = load_scheduler(args.scheduler)
    order = schedule_from_scheduler(scheduler).sigma.argsort()
    table = {}
    print("model | " + " | ".join(f"rank {rank}" for rank in args.ranks))
    for path in args.models:
        model = UNet2DModel.from_pretrained(path).eval()
        row = []
        for rank in args.ranks:
            level = [int(order[rank])]

            def errors(images: torch.Tensor, model=model, level=level) -> torch.Tensor:
                generator = torch.Generator().manual_seed(0)
                return denoising_errors(
                    model, scheduler, images, timesteps=level, noise_draws=args.draws,
                    generator=generator, batch_size=512,
                )  # fmt: skip

            row.append((errors(references) < errors(tshirt)).double().mean().item())
        table[path] = row
        print(f"{path} | " + " | ".join(f"{value:.3f}" for value in row), flush=True)
    return table


if __name__ == "__main__":
    main()
