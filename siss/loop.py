"""Training-loop helpers: pairing keep and forget batches, per-process random streams, and a
batch plan that does not depend on the number of processes.

Pairing.
``zip(keep_loader, forget_loader)`` stops when the shorter loader does; with one image to forget
(the usual case: its loader holds one batch) that is after ONE step. ``paired_batches`` runs
through the keep loader once and starts the forget loader again whenever it runs out, so each pass
over the forget set is a fresh iteration (re-shuffled by its sampler, not a replay of cached
batches as ``itertools.cycle`` would give).

Batch plan.
``BatchPlan`` seeds every global micro-batch of a step from ``(seed, step, index)`` (through
``derived_seed``) and hands process ``r`` of ``R`` the micro-batches ``r, r + R, r + 2R, ...``: the
global batch of a step, its noise included, is the same whether one process runs it or four, so a
run's weights do not depend on how many GPUs trained it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from siss._checks import check_index

__all__ = ["BatchPlan", "derived_seed", "paired_batches", "rank_generator"]

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

    Examples:
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
    if isinstance(forget, Iterator):  # not iter(forget), which draws a DataLoader sampler seed
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

    Examples:
        >>> rank_generator(0).initial_seed()  # rank 0 of a single-process run
        0
    """
    seed = check_index(seed, "seed")
    rank = process_index()
    if not 0 <= seed + rank < 2**64:  # manual_seed takes an unsigned 64-bit seed
        raise ValueError(f"`seed` must be >= 0 and `seed` + rank ({rank}) < 2**64, got {seed}")
    return torch.Generator(device if device is not None else "cpu").manual_seed(seed + rank)


def derived_seed(*parts: Any) -> int:
    """A seed for ``torch.Generator.manual_seed`` from a tuple: blake2b of its ``repr``.

    Derived streams (``derived_seed(seed, "draw", step, j)``) are independent of each other and of
    the order they are created in, unlike ``seed + offset`` schemes whose streams collide (seed 1's
    step 0 is seed 0's step 1). ``parts`` should have a stable ``repr``: ints, strings, tuples.
    The result is in ``[0, 2**63)``.

    Examples:
        >>> derived_seed(0, "draw", 3, 1) == derived_seed(0, "draw", 3, 1)
        True
        >>> derived_seed(0, "draw", 3, 1) == derived_seed(0, "draw", 1, 3)
        False
    """
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _check_count(value: object, name: str) -> int:
    value = check_index(value, name)
    if value < 1:
        raise ValueError(f"`{name}` must be >= 1, got {value}")
    return value


class BatchPlan:
    """Which rows each micro-batch of each step holds, and the generator of its draws.

    Step ``s`` is ``J = batch / micro`` global micro-batches. Global micro-batch ``j`` holds the
    keep rows at positions ``s * batch + j * micro + [0, micro)`` of an endless sequence of seeded
    permutations of ``X \\ A`` (one per epoch, so every keep row is used once per epoch),
    ``micro`` forget rows drawn with replacement from ``A``, and draws its timesteps, mixture coins
    and noise from its own generator, seeded by ``derived_seed(seed, "draw", s, j)``. Process
    ``r`` of ``world`` runs micro-batches ``r, r + world, r + 2 world, ...``: the data is sharded,
    every process draws its own noise, and the global batch, hence the averaged gradient of each
    step, is the same for any number of processes (``accumulation = batch / (micro * world)``
    micro-batches per process per step).

    Args:
        seed: the run's seed, a non-negative int.
        keep: the number of keep rows ``|X \\ A|`` (``>= 1``).
        forget: the number of forget rows ``|A|`` (``>= 1``).
        batch: the global batch size of one optimizer step.
        micro: the rows of one forward/backward pass (one micro-batch).
        world: the number of processes; ``batch`` must be a multiple of ``micro * world``.

    Examples:
        >>> plan = BatchPlan(0, keep=10, forget=2, batch=4, micro=2, world=2)
        >>> plan.accumulation
        1
        >>> sizes = [(len(keep_rows), len(forget_rows)) for keep_rows, forget_rows, _
        ...          in plan.micro_batches(step=0, rank=1)]
        >>> sizes == [(2, 2)]
        True
    """

    def __init__(self, seed: int, keep: int, forget: int, batch: int, micro: int, world: int = 1):
        seed = check_index(seed, "seed")
        if seed < 0:
            raise ValueError(f"`seed` must be >= 0, got {seed}")
        keep, forget = _check_count(keep, "keep"), _check_count(forget, "forget")
        batch, micro = _check_count(batch, "batch"), _check_count(micro, "micro")
        world = _check_count(world, "world")
        if batch % (micro * world):
            raise ValueError(
                f"`batch` ({batch}) must be a multiple of `micro` ({micro}) x `world` ({world} "
                "processes): choose them so that it is"
            )
        self.seed, self.keep, self.forget = seed, keep, forget
        self.batch, self.micro, self.world = batch, micro, world
        self.accumulation = batch // (micro * world)
        self._permutations: dict[int, torch.Tensor] = {}

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._permutations:
            generator = torch.Generator().manual_seed(derived_seed(self.seed, "keep", epoch))
            # One epoch cached: the steps run in order, so the next one is all that is needed.
            self._permutations = {epoch: torch.randperm(self.keep, generator=generator)}
        return self._permutations[epoch]

    def micro_batches(
        self, step: int, rank: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Generator]]:
        """This process's micro-batches of ``step``, in order.

        Args:
            step: the optimizer step, ``>= 0``.
            rank: this process's index, ``0 <= rank < world`` (``accelerator.process_index``).

        Yields:
            ``(keep_rows, forget_rows, generator)``: int64 CPU indices ``(micro,)`` into the keep
            and the forget rows, and the CPU generator the micro-batch's draws come from.
        """
        step, rank = check_index(step, "step"), check_index(rank, "rank")
        if step < 0:
            raise ValueError(f"`step` must be >= 0, got {step}")
        if not 0 <= rank < self.world:
            raise ValueError(f"`rank` must be in [0, {self.world}) (`world`), got {rank}")
        for local in range(self.accumulation):
            index = rank + local * self.world
            positions = step * self.batch + index * self.micro + torch.arange(self.micro)
            epochs = positions // self.keep
            keep_rows = torch.empty(self.micro, dtype=torch.long)
            for epoch in epochs.unique().tolist():  # CPU indices: no device sync
                at = epochs == epoch
                keep_rows[at] = self._permutation(epoch)[positions[at] % self.keep]
            generator = torch.Generator().manual_seed(derived_seed(self.seed, "draw", step, index))
            forget_rows = torch.randint(self.forget, (self.micro,), generator=generator)
            yield keep_rows, forget_rows, generator
