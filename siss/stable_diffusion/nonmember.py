"""``--until nonmember``: stop once the copies' latents are denoised like images the model never
trained on (``siss.stopping.NonmemberStop``), instead of waiting for the copies to vanish from
fresh generations.

The references are the training prompt's own non-copies, held out of the keep set: an image the
keep term fits is no longer a non-member of the model being unlearned, so ranking the copies
among the keep set's images would measure how well the keep term fits them, not where a model
that never saw the memorized image would put it. ``--stop_references`` non-copies (at most a
third of them, chosen by ``--seed``) are held out; the rest train as the keep set.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from siss.loop import derived_seed
from siss.stable_diffusion.split import StopJob
from siss.stopping import NonmemberStop

MIN_KEEP = 2  # non-copies the keep set keeps whatever --stop_references asks for


def hold_out_references(
    args: argparse.Namespace, keep: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(keep, references)``: with ``--until nonmember``, ``min(--stop_references, N // 3)``
    of the ``N`` non-copy latents ``keep`` held out as the rule's references (a permutation
    seeded by ``--seed``, the same on every process); otherwise ``(keep, None)``."""
    if args.until != "nonmember":
        return keep, None
    count = min(args.stop_references, len(keep) // 3)
    if count < 2 or len(keep) - count < MIN_KEEP:
        raise StopJob(
            f"--until nonmember needs at least 6 non-copies among the training images to hold "
            f"out 2 as references (a third at most), got {len(keep)}: raise --num_images"
        )
    generator = torch.Generator().manual_seed(derived_seed(args.seed, "stop-references"))
    order = torch.randperm(len(keep), generator=generator).to(keep.device)
    return keep[order[count:]], keep[order[:count]]


def nonmember_rule(
    args: argparse.Namespace,
    model: torch.nn.Module,
    scheduler: Any,
    forget: torch.Tensor,
    references: torch.Tensor | None,
    conditioning: dict[str, Any],
    accelerator: Any,
) -> NonmemberStop | None:
    """The run's ``NonmemberStop`` on the copies' latents ``forget`` (``None`` without
    ``--until nonmember``), checked at every ``--verify_every`` check with the training prompt's
    conditioning, under the run's autocast; its ``rule`` is ``--stop_rule``, which
    ``NonmemberStop.steer`` applies after each check."""
    if references is None:
        return None
    return NonmemberStop(
        model,
        scheduler,
        forget,
        references,
        target=args.stop_target,
        every=args.verify_every,
        seed=args.seed,
        noise_draws=4,
        conditioning=conditioning,
        batch_size=args.train_batch_size,
        autocast=accelerator.autocast,
        rule=args.stop_rule,
    )
