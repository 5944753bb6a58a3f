"""The Stable Diffusion job's watch (``siss.stable_diffusion.watch``): the keep prompts' drift
against their band, the seed ranges, and the stop rule of ``--until gone``."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from siss.stable_diffusion.unlearn import stop_reason
from siss.stable_diffusion.watch import drift, restore, rms_distance, seed_layout, snapshot


def images(count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, 8, 8), generator=generator, dtype=torch.uint8)


def test_drift_is_zero_for_unchanged_images_and_one_for_other_samples():
    before = images(6, 0)
    same = drift(before, before.clone(), band=0.5)
    assert same["drift"] == 0 and same["relative"] == 0 and same["in_band"]
    # other draws of the same distribution: moved about as far as two of its images are apart
    other = drift(before, images(6, 1), band=0.5)
    assert 0.8 < other["relative"] < 1.25 and not other["in_band"]
    # the spread is the median pairwise distance, in [-1, 1] units
    pairs = [rms_distance(before[i : i + 1], before[j : j + 1]).item()
             for i in range(6) for j in range(i + 1, 6)]  # fmt: skip
    assert same["spread"] == pytest.approx(torch.tensor(pairs).median().item())


def test_seeds_that_swap_their_images_have_not_drifted():
    """An after-image is measured from the nearest of the prompt's before-images: seeds that swap
    their images are no drift; one image unlike all of them is."""
    before = images(5, 0)
    assert drift(before, before.flip(0), band=0.5)["drift"] == 0
    changed = before.clone()
    changed[2] = images(1, 9)[0]
    row = drift(before, changed, band=0.5)
    assert 0 < row["drift"] and row["relative"] == pytest.approx(
        rms_distance(changed[2:3], before).min().item() / 5 / row["spread"]
    )


def test_drift_halfway_is_in_a_band_of_one_half_only_below_it():
    before = images(4, 0).float()
    target = images(4, 1).float()
    for fraction, inside in ((0.3, True), (0.7, False)):
        after = (before + fraction * (target - before)).round().to(torch.uint8)
        row = drift(before.to(torch.uint8), after, band=0.5)
        assert row["in_band"] is inside, row


def test_identical_before_images_have_no_spread_but_the_floor():
    """A prompt whose generations all look alike: without a floor any change is infinitely far;
    with the watched prompts' median spread as the floor, it is measured on that scale."""
    flat = torch.full((3, 3, 4, 4), 7, dtype=torch.uint8)
    assert drift(flat, flat, band=0.5)["relative"] == 0
    assert drift(flat, flat + 1, band=0.5)["relative"] == math.inf
    floored = drift(flat, flat + 1, band=0.5, floor=0.5)
    assert floored["spread"] == 0.5 and floored["relative"] == pytest.approx(2 / 255 / 0.5)


def test_the_seed_ranges_do_not_overlap():
    args = argparse.Namespace(seed=5, num_images=32, verify_images=16, keep_images=4)
    layout = seed_layout(args)
    assert layout == {"verify": 37, "keep": 53, "checks": 57}


def check(step, copies, outside=()):
    return {"step": step, "copies": copies, "generated": 8 if copies else 32,
            "keep_outside": list(outside)}  # fmt: skip


def test_gone_after_the_asked_number_of_clean_checks_in_a_row():
    args = argparse.Namespace(until="gone", stop_checks=2)
    assert stop_reason(args, [check(10, 3)]) is None
    assert stop_reason(args, [check(10, 3), check(20, 0)]) is None
    gone = stop_reason(args, [check(10, 3), check(20, 0), check(30, 0)])
    assert gone["reason"] == "gone" and "64 fresh generations" in gone["text"]
    assert stop_reason(args, [check(10, 0), check(20, 1)]) is None  # not in a row
    steps = argparse.Namespace(until="steps", stop_checks=2)
    assert stop_reason(steps, [check(10, 0), check(20, 0)]) is None  # all --steps


def test_a_keep_prompt_outside_its_band_stops_and_puts_back_the_last_check():
    args = argparse.Namespace(until="steps", stop_checks=2)
    stop = stop_reason(args, [check(10, 3), check(20, 1, ["a red car"])])
    assert stop["reason"] == "keep" and stop["restored_step"] == 10
    assert "'a red car'" in stop["text"]
    first = stop_reason(args, [check(10, 3, ["a dog"])])
    assert first["restored_step"] == 0  # the starting weights


def test_a_backed_off_check_goes_on_and_breaks_a_clean_streak():
    """A check outside the band after which the forget weight was halved does not stop the run,
    is not clean, and a later one outside the band puts back the last check in band."""
    args = argparse.Namespace(until="gone", stop_checks=2)
    backed = {**check(20, 0, ["a dog"]), "backed_off": 0.5}
    assert stop_reason(args, [check(10, 0), backed]) is None
    assert stop_reason(args, [check(10, 0), backed, check(30, 0)]) is None
    assert stop_reason(args, [check(10, 0), backed, check(30, 0), check(40, 0)])["reason"] == "gone"
    stop = stop_reason(args, [check(10, 2), backed, check(30, 1), check(40, 1, ["a dog"])])
    assert stop["reason"] == "keep" and stop["restored_step"] == 30


def test_snapshot_and_restore_put_the_weights_back():
    layer = torch.nn.Linear(3, 2)
    saved = snapshot(list(layer.parameters()))
    start = [p.detach().clone() for p in layer.parameters()]
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.add_(1.0)
    restore(list(layer.parameters()), saved)
    assert all(torch.equal(p, q) for p, q in zip(layer.parameters(), start, strict=True))


class _Main:
    is_main_process = True
    num_processes = 1


def test_a_keep_prompts_own_copies_are_not_watched():
    """A keep prompt that generates the memorized image too is meant to lose those copies: only
    its other seeds are measured; one with fewer than two others is not watched, with why."""
    from siss.stable_diffusion.watch import Watch

    watch = Watch.__new__(Watch)
    watch.accelerator, watch.args = _Main(), argparse.Namespace(keep_band=0.75)
    watch.detector = lambda batch: batch.flatten(1).float().mean(1) > 250  # white: a copy
    watch.prompts, watch.train_seeds, watch.keep_seeds = ["near", "mostly copies"], [], [0, 1, 2]
    watch.rows, watch.not_watched, watch.spread_floor = {}, {}, 0.0
    white = torch.full((1, 3, 8, 8), 255, dtype=torch.uint8)
    watch.before = {
        "near": torch.cat([white, images(2, 0)]),
        "mostly copies": torch.cat([white, white, images(1, 1)]),
    }
    watch._find_copies()
    assert watch.rows["near"].tolist() == [1, 2]
    assert watch.not_watched == {
        "mostly copies": "2 of its 3 images before unlearning were copies of the memorized image"
    }
    # after unlearning the copy became something else; the other seeds kept their images
    after = {"near": torch.cat([images(1, 5), watch.before["near"][1:]])}
    watch._generate = lambda prompt, seeds, desc: after.get(prompt, watch.before[prompt])
    result = watch.keep_drift("after")
    assert list(result) == ["near"] and result["near"]["drift"] == 0
