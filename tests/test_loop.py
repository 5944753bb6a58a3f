"""Training-loop helpers: paired_batches runs a full epoch; rank_generator differs per rank;
BatchPlan gives the same global batch for any number of processes."""

import pytest
import torch
from conftest import fuzz_settings
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

from siss.loop import BatchPlan, derived_seed, paired_batches, rank_generator


def test_one_forget_image_pairs_with_every_keep_batch():
    """``zip(keep_loader, forget_loader)`` ran 1 of 21 steps with one image to forget."""
    keep = DataLoader(TensorDataset(torch.arange(84.0)[:, None]), batch_size=4)
    forget = DataLoader(TensorDataset(torch.full((1, 1), -1.0)), batch_size=1)
    assert len(list(zip(keep, forget, strict=False))) == 1  # the trap
    pairs = list(paired_batches(keep, forget))
    assert len(pairs) == 21
    assert all(torch.equal(a0, torch.full((1, 1), -1.0)) for (_, (a0,)) in pairs)


def test_forget_loader_is_iterated_afresh():
    generator = torch.Generator().manual_seed(0)
    forget = DataLoader(torch.arange(6.0), batch_size=2, shuffle=True, generator=generator)
    seen = [a0 for _, a0 in paired_batches(range(12), forget)]
    passes = [torch.cat(seen[i : i + 3]).sort().values for i in range(0, 12, 3)]
    assert all(torch.equal(p, torch.arange(6.0)) for p in passes)  # each pass: the whole set
    orders = {tuple(torch.cat(seen[i : i + 3]).tolist()) for i in range(0, 12, 3)}
    assert len(orders) > 1  # re-shuffled, not a replay


def test_bad_forget_loaders_raise():
    with pytest.raises(TypeError, match="`forget`"):
        list(paired_batches([1, 2], iter([0])))
    with pytest.raises(ValueError, match="`forget`"):
        list(paired_batches([1, 2], []))


def test_rank_generator_differs_per_rank(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    first = torch.randint(0, 1000, (3,), generator=rank_generator(0))
    monkeypatch.setenv("RANK", "0")
    zeroth = torch.randint(0, 1000, (3,), generator=rank_generator(0))
    assert not torch.equal(first, zeroth)
    assert torch.equal(
        zeroth, torch.randint(0, 1000, (3,), generator=torch.Generator().manual_seed(0))
    )
    with pytest.raises(ValueError, match="`seed`"):
        rank_generator(-1)
    with pytest.raises(TypeError, match="`seed`"):
        rank_generator(1.5)
    assert rank_generator(2**64 - 1).initial_seed() == 2**64 - 1  # rank 0: manual_seed's largest
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ValueError, match=r"`seed` \+ rank \(1\) < 2\*\*64"):
        rank_generator(2**64 - 1)


def test_an_accelerate_prepared_forget_loader_raises():
    """Found by the README test: a prepared one-image loader turned accumulation off."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    try:
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
        forget = accelerator.prepare(DataLoader(TensorDataset(torch.zeros(1, 1)), batch_size=1))
        with pytest.raises(ValueError, match=r"accelerator\.prepare"):
            list(paired_batches(range(4), forget))
    finally:  # accelerate's state is process-wide: leave none behind for other tests
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def plan_rows(plan: BatchPlan, step: int, rank: int) -> list[tuple[list[int], list[int], int]]:
    return [
        (keep_rows.tolist(), forget_rows.tolist(), generator.initial_seed())
        for keep_rows, forget_rows, generator in plan.micro_batches(step, rank)
    ]


@fuzz_settings(100)
@given(
    seed=st.integers(0, 2**32),
    keep=st.integers(1, 12),
    forget=st.integers(1, 4),
    micro=st.integers(1, 3),
    micro_batches=st.integers(1, 3),
    world=st.integers(1, 4),
)
def test_batch_plan_union_over_ranks_is_the_one_process_plan(
    seed, keep, forget, micro, micro_batches, world
):
    """For world sizes 1..4 the ranks together run exactly the 1-process step: same rows, same
    draw seeds, each micro-batch on one rank only."""
    batch = micro * micro_batches * world
    one = BatchPlan(seed, keep=keep, forget=forget, batch=batch, micro=micro, world=1)
    shared = [
        BatchPlan(seed, keep=keep, forget=forget, batch=batch, micro=micro, world=world)
        for _ in range(world)
    ]
    assert shared[0].accumulation == micro_batches
    for step in range(3):
        single = plan_rows(one, step, 0)
        per_rank = [plan_rows(shared[rank], step, rank) for rank in range(world)]
        union = [entry for rows in per_rank for entry in rows]
        assert sorted(union) == sorted(single)
        assert all(len(rows) == micro_batches for rows in per_rank)
        # process r takes global micro-batches r, r + R, ...
        assert per_rank[0] == single[::world]
        assert len({draw_seed for *_, draw_seed in single}) == len(single)  # own stream each
        assert all(0 <= row < keep for rows, _, _ in single for row in rows)
        assert all(0 <= row < forget for _, rows, _ in single for row in rows)


def test_batch_plan_uses_every_keep_row_once_per_epoch():
    plan = BatchPlan(0, keep=10, forget=3, batch=8, micro=2, world=1)
    rows = torch.cat([k for s in range(5) for k, _, _ in plan.micro_batches(s, 0)])
    epochs = [sorted(rows[i : i + 10].tolist()) for i in range(0, 40, 10)]
    assert all(epoch == list(range(10)) for epoch in epochs)
    assert len({tuple(rows[i : i + 10].tolist()) for i in range(0, 40, 10)}) > 1  # re-shuffled


def test_batch_plan_draws_are_reproducible_and_seeded():
    first = BatchPlan(3, keep=7, forget=2, batch=4, micro=2)
    again = BatchPlan(3, keep=7, forget=2, batch=4, micro=2)
    other = BatchPlan(4, keep=7, forget=2, batch=4, micro=2)
    assert plan_rows(first, 2, 0) == plan_rows(again, 2, 0)
    assert plan_rows(first, 2, 0) != plan_rows(other, 2, 0)
    (_, _, generator), _ = first.micro_batches(0, 0)
    assert generator.initial_seed() == derived_seed(3, "draw", 0, 0)


def test_batch_plan_bad_arguments_raise():
    with pytest.raises(ValueError, match=r"`batch`.*`micro`.*`world`"):
        BatchPlan(0, keep=4, forget=1, batch=6, micro=2, world=2)
    with pytest.raises(ValueError, match="`keep`"):
        BatchPlan(0, keep=0, forget=1, batch=2, micro=1)
    with pytest.raises(ValueError, match="`forget`"):
        BatchPlan(0, keep=1, forget=0, batch=2, micro=1)
    with pytest.raises(ValueError, match="`seed`"):
        BatchPlan(-1, keep=1, forget=1, batch=2, micro=1)
    with pytest.raises(TypeError, match="`micro`"):
        BatchPlan(0, keep=1, forget=1, batch=2, micro=1.5)
    plan = BatchPlan(0, keep=4, forget=1, batch=4, micro=2, world=2)
    with pytest.raises(ValueError, match="`rank`"):
        next(plan.micro_batches(0, 2))
    with pytest.raises(ValueError, match="`step`"):
        next(plan.micro_batches(-1, 0))


def test_derived_seed_fits_manual_seed_and_separates_parts():
    seeds = {derived_seed(0, "draw", step, index) for step in range(20) for index in range(5)}
    assert len(seeds) == 100
    assert all(0 <= seed < 2**63 for seed in seeds)
    torch.Generator().manual_seed(max(seeds))


def test_paired_batches_draws_what_a_hand_written_loop_draws():
    """Its re-iterability check built and dropped an iterator of ``forget``: a shuffling
    DataLoader's one draw of the global RNG, so a seeded run's batches differed."""
    from torch.utils.data import DataLoader

    def batches(paired: bool) -> list:
        torch.manual_seed(0)
        keep = DataLoader(torch.arange(8.0), batch_size=2, shuffle=True)
        forget = DataLoader(torch.arange(3.0), batch_size=1, shuffle=True)
        if paired:
            return [(k.tolist(), f.tolist()) for k, f in paired_batches(keep, forget)]
        out, forget_batches = [], iter(forget)
        for keep_batch in keep:
            try:
                forget_batch = next(forget_batches)
            except StopIteration:
                forget_batches = iter(forget)
                forget_batch = next(forget_batches)
            out.append((keep_batch.tolist(), forget_batch.tolist()))
        return out

    assert batches(paired=True) == batches(paired=False)
