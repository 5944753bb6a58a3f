"""``--until nonmember`` of the Stable Diffusion job on the random tiny pipeline (CPU): the
copies' denoising-error percentile among held-out non-copies is measured at every check, the
run stops at the first check that reaches ``--stop_target`` (and not before), a resumed run
measures what an uninterrupted one does, and the flags are checked before anything loads."""

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
