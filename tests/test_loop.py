"""Training-loop helpers: paired_batches runs a full epoch; rank_generator differs per rank."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from siss import paired_batches, rank_generator


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
