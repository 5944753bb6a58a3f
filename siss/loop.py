"""Training-loop helpers: pairing keep and forget batches, and per-process random streams.

Pairing.
``zip(keep_loader, forget_loader)`` stops when the shorter loader does; with one image to forget
(the usual case: its loader holds one batch) that is after ONE step. ``paired_batches`` runs
through the keep loader once and starts the forget loader again whenever it runs out, so each pass
over the forget set is a fresh iteration (re-shuffled by its sampler, not a replay of cached
batches as ``itertools.cycle`` would give).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

import torch
import torch.distributed as dist

from siss._checks import check_index

KeepBatch = TypeVar("KeepBatch")
ForgetBatch = TypeVar("ForgetBatch")


def paired_batches(
    keep: Iterable[KeepBatch], forget: Iterable[ForgetBatch]
) -> Iterator[tuple[KeepBatch, ForgetBatch]]:
    """``(keep_batch, forget_batch)`` for every batch of ``keep``, re-iterating ``forget``.

    Args:
        keep: the loader of ``X \\ A`` (or of ``X`` for ``x_from="all"``); one epoch of it is one
            epoch of the pairs.
        forget: the loader of ``A``; iterated again (``iter(forget)``) each time it is exhausted.
            It must not be a one-shot iterator, must yield at least one batch, and must not be
            prepared by accelerate (see the error it raises).

    Example:
        >>> pairs = list(paired_batches([1, 2, 3, 4, 5], ["a"]))
        >>> pairs
        [(1, 'a'), (2, 'a'), (3, 'a'), (4, 'a'), (5, 'a')]
    """
    if hasattr(forget, "gradient_state"):
        raise ValueError(
            "`forget` was passed to `accelerator.prepare`: accelerate ends gradient accumulation "
            "whenever a prepared loader runs out, which a small forget loader does at every step "
            "(`sync_gradients` would be True on every micro-batch), and it would shard the forget "
            "set across processes; keep the forget loader unprepared and move its batches with "
            "`.to(accelerator.device)`"
        )
    if iter(forget) is forget:
        raise TypeError(
            "`forget` must be re-iterable (a DataLoader, a list), not a one-shot iterator: it is "
            "started again each time it runs out"
        )
    forget_batches = iter(forget)
    for keep_batch in keep:
        try:
            forget_batch = next(forget_batches)
        except StopIteration:
            forget_batches = iter(forget)
            try:
                forget_batch = next(forget_batches)
            except StopIteration:
                raise ValueError("`forget` yielded no batch: the forget set is empty") from None
        yield keep_batch, forget_batch


def process_index() -> int:
    """This process's rank: ``torch.distributed``'s when initialised, else ``$RANK``, else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def rank_generator(seed: int, device: torch.device | str | None = None) -> torch.Generator:
    """A ``torch.Generator`` seeded ``seed + rank``: one seed, a different stream per process.

    ``torch.Generator(device).manual_seed(seed)`` on every rank of a DDP or ``accelerate`` run draws
    the same timesteps, mixture coins and noise on every rank (seen: both ranks drew t = [44, 239,
    933]), so the ranks' gradients are correlated copies and the effective batch is one rank's.
    With accelerate, ``rank_generator(seed, accelerator.device)`` equals
    ``torch.Generator(accelerator.device).manual_seed(seed + accelerator.process_index)``.

    Args:
        seed: the run's seed, a non-negative int.
        device: where the generator draws (``None``: the CPU). A CPU generator also serves CUDA
            data (``siss`` draws on the generator's device and moves the result, as diffusers does).

    Example:
        >>> rank_generator(0).initial_seed()  # rank 0 of a single-process run
        0
    """
    seed = check_index(seed, "seed")
    if seed < 0:
        raise ValueError(f"`seed` must be >= 0, got {seed}")
    return torch.Generator(device if device is not None else "cpu").manual_seed(
        seed + process_index()
    )
