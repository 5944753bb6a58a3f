"""``--until nonmember`` of the Stable Diffusion job on the random tiny pipeline (CPU): the
copies' denoising-error percentile among held-out non-copies is measured at every check, the
run stops at the first check that reaches ``--stop_target`` (and not before), ``--stop_rule
level`` sets the forget term's level at every check and never stops, a resumed run measures
what an uninterrupted one does, and the flags are checked before anything loads."""

from __future__ import annotations

import pytest
import torch

from siss.stable_diffusion.nonmember import hold_out_references
from siss.stable_diffusion.split import StopJob
from tests.stable_diffusion import test_sd_tracking as tracking
from tests.stable_diffusion.sd_harness import expect_exit, run
from tests.stable_diffusion.test_sd_tracking import copy_generation, reset_accelerate

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate")

generated = tracking.generated  # its module fixture: the tiny pipeline's 16 images, split

CHECKS = [
    "--until", "nonmember", "--verify_every", "1", "--stop_images", "2",
    "--noise_generations", "0", "--keep_prompts", "--checkpointing_steps", "1",
]  # fmt: skip


def job(generated, folder, *extra):
    argv, source = generated
    copy_generation(source, folder)
    reset_accelerate()
    try:
        return run(*argv, *CHECKS, "--output_dir", folder, *extra)
    finally:
        reset_accelerate()


@pytest.fixture(scope="module")
def never(generated, tmp_path_factory):
    """The metrics of a run whose target no check reaches: all 4 steps, checked at each."""
    folder = tmp_path_factory.mktemp("sd-nonmember") / "never"
    return job(generated, folder, "--stop_target", "0.999")


def measured(metrics):
    return [row["nonmember"] for row in metrics["history"] if "nonmember" in row]


def test_the_run_stops_at_the_first_check_that_reaches_the_target(generated, never, tmp_path):
    checks = measured(never)
    assert [check["step"] for check in checks] == [0, 1, 2, 3]  # the start and every check
    assert never["stop"]["reason"] == "cap" and not any(c["entered"] for c in checks)
    reached = [c["percentile"] for c in checks[1:] if c["percentile"] > 0]
    assert reached, checks  # the random model ranks the copies above some non-copy
    target = reached[0]
    first = next(c["step"] for c in checks[1:] if c["percentile"] >= target)
    stopped = job(generated, tmp_path / "stopped", "--stop_target", str(target))
    assert stopped["stop"]["reason"] == "nonmember"
    assert stopped["stop"]["steps"] == first

    def values(rows):  # what was measured, whatever the target
        return [{k: v for k, v in row.items() if k != "entered"} for row in rows]

    assert values(measured(stopped)) == values(checks[: first + 1])


def test_a_resumed_run_measures_what_an_uninterrupted_one_does(generated, never, tmp_path):
    argv, source = generated
    out = tmp_path / "parts"
    copy_generation(source, out)
    reset_accelerate()
    try:
        flags = [*argv, *CHECKS, "--output_dir", out, "--stop_target", "0.999"]
        assert run(*flags, "--stop_after", "2") == {"stopped": True}
        reset_accelerate()
        resumed = run(*flags, "--resume_from_checkpoint", "latest")
    finally:
        reset_accelerate()
    assert measured(resumed) == measured(never)


def record_calls(monkeypatch, name):
    """``(argument, grid length)`` of every call of ``siss.Unlearner``'s per-timestep setter
    ``name`` (``restrict_forget``, ``set_forget_level``) in the test, in order; the calls still
    go through."""
    import siss

    calls = []
    method = getattr(siss.Unlearner, name)

    def recorded(self, given):
        calls.append((given.clone(), len(self.loss_fn.schedule)))  # (T,): the grid
        return method(self, given)

    monkeypatch.setattr(siss.Unlearner, name, recorded)
    return calls


def test_the_level_rule_holds_the_run_at_the_level_instead_of_stopping(
    generated, tmp_path, monkeypatch
):
    """``--stop_rule level``: every check (the start's included) sets the forget term's level,
    one finite positive value per training timestep, from the checks' ten noise levels; a
    check that reached the target does not stop the run, which takes all its steps."""
    import math

    from siss.stopping import LEVEL_TIMESTEPS

    levels = record_calls(monkeypatch, "set_forget_level")
    metrics = job(generated, tmp_path / "level", "--stop_rule", "level", "--stop_target", "0.01")
    checks = measured(metrics)
    assert [check["step"] for check in checks] == [0, 1, 2, 3] and all(c["entered"] for c in checks)
    assert all(len(check["per_timestep"]) == len(LEVEL_TIMESTEPS) for check in checks)
    assert metrics["stop"]["reason"] == "cap" and metrics["stop"]["steps"] == 4
    assert len(levels) == len(checks)
    for level, timesteps in levels:
        assert level.shape == (timesteps,) and torch.isfinite(level).all() and (level > 0).all()
    assert not torch.equal(levels[0][0], levels[-1][0])  # measured again at every check
    assert all(math.isfinite(loss) for loss in metrics["loss"])


def test_the_anneal_rule_turns_the_forget_term_off_and_runs_to_the_cap(
    generated, tmp_path, monkeypatch
):
    """``--stop_rule anneal``: once a check reaches the target the forget term is off at every
    training timestep (zeros to ``restrict_forget``) and the run takes all its steps."""
    weights = record_calls(monkeypatch, "restrict_forget")
    metrics = job(generated, tmp_path / "anneal", "--stop_rule", "anneal", "--stop_target", "0.01")
    checks = measured(metrics)
    assert checks[0]["step"] == 0 and all(c["entered"] for c in checks)
    assert metrics["stop"]["reason"] == "cap" and metrics["stop"]["steps"] == 4
    assert len(weights) == len(checks)
    assert all(w.shape == (timesteps,) and not w.any() for w, timesteps in weights)


def test_the_track_rule_weighs_the_forget_term_per_level_and_runs_to_the_cap(
    generated, tmp_path, monkeypatch
):
    """``--stop_rule track``: every check (the start's included) gives the forget term signed
    weights in [-1, 1], one per training timestep, from the checks' nine noise levels; with every
    level past a low target they fall below 1; the run takes all its steps."""
    weights = record_calls(monkeypatch, "restrict_forget")
    metrics = job(generated, tmp_path / "track", "--stop_rule", "track", "--stop_target", "0.01")
    checks = measured(metrics)
    assert len(checks[0]["per_timestep"]) == 9
    assert metrics["stop"]["reason"] == "cap" and metrics["stop"]["steps"] == 4
    assert len(weights) == len(checks)
    for given, timesteps in weights:
        assert given.shape == (timesteps,) and bool(((given >= -1) & (given <= 1)).all())
    assert bool((weights[-1][0] < 1).all())


def test_the_references_are_held_out_of_the_keep_set():
    class Args:
        until, stop_references, seed = "nonmember", 32, 0

    keep = torch.arange(40.0).view(40, 1)
    kept, references = hold_out_references(Args, keep)
    assert len(references) == 13 and len(kept) == 27  # a third at most
    assert sorted(torch.cat([kept, references]).flatten().tolist()) == keep.flatten().tolist()
    Args.until = "gone"
    assert hold_out_references(Args, keep) == (keep, None)
    Args.until = "nonmember"
    with pytest.raises(StopJob, match="at least 6 non-copies"):
        hold_out_references(Args, keep[:5])


def test_bad_values_are_named_before_anything_loads(tmp_path, capsys):
    base = ["--pretrained_model_name_or_path", tmp_path / "none", "--prompt", "a photo",
            "--output_dir", tmp_path / "out"]  # fmt: skip
    expect_exit(capsys, [*base, "--until", "nonmember", "--verify_every", "0"], "--verify_every")
    expect_exit(capsys, [*base, "--stop_target", "1"], "--stop_target")
    expect_exit(capsys, [*base, "--stop_references", "1"], "--stop_references")
    expect_exit(capsys, [*base, "--stop_rule", "per_level"], "--until nonmember only")
    expect_exit(
        capsys,
        [*base, "--until", "nonmember", "--stop_rule", "per_level", "--method", "naive"],
        "it needs --method siss",
    )
    assert not (tmp_path / "out").exists()
