"""examples/study.py --audit end to end on tiny UNets: the before/after audit of each run.

The study runs from ``examples/assets``; here ``ASSETS`` points to a temporary folder holding a
tiny ``pretrained`` and ``retrain`` (``UNet2DModel`` built from config, saved, loaded by path),
the method runs 2 steps instead of the paper's 300, and the evaluation settings study.py does
not expose take unlearn.py's cheapest values. This checks the plumbing, not the science.
"""

import json
import math
import sys
from pathlib import Path

import pytest
from conftest import tiny_unet
from diffusers import DDPMScheduler

from siss.audit import AuditReport

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))

import study  # noqa: E402
import unlearn  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

REFERENCES = 20  # >= 19: the membership p-value can reach 5%


@pytest.fixture
def tiny_study(tmp_path, monkeypatch):
    assets = tmp_path / "assets"
    assets.mkdir()
    # unlearn.py's evaluation reads the digit classifier from ASSETS
    (assets / "digit_classifier.safetensors").symlink_to(
        study.ASSETS / "digit_classifier.safetensors"
    )
    for seed, name in enumerate(("pretrained", "retrain")):
        tiny_unet(seed, sample_size=16).save_pretrained(assets / name, safe_serialization=True)
        DDPMScheduler(num_train_timesteps=1000).save_pretrained(assets / name)
    monkeypatch.setattr(study, "ASSETS", assets)
    monkeypatch.setattr(unlearn, "ASSETS", assets)  # unlearn.py's --checkpoint default
    monkeypatch.setitem(study.METHODS, "naive", (["--method", "naive"], 2))
    real = study.unlearn_args
    cheap = [
        "--eval-steps", "2", "--nll-probes", "2", "--nll-tolerance", "1e-2",
        "--batch-size", "8", "--checkpoint-every", "2",
    ]  # fmt: skip
    monkeypatch.setattr(study, "unlearn_args", lambda argv: real([*argv, *cheap]))
    return tmp_path / "study"


def study_argv(out, *audit):
    return [
        "--seeds", "0", "--methods", "naive", "--output-dir", str(out), "--eval-samples", "8",
        "--eval-every", "2", "--track-samples", "4", "--no-progress", "--audit",
        "--audit-samples", "8", "--audit-steps", "2", "--audit-references", str(REFERENCES),
        "--audit-option", "membership.noise_draws=2",
        "--audit-option", "reconstruction.noise_draws=2", *audit,
    ]  # fmt: skip


def test_audit_before_and_after_is_written_with_measured_statistics(tiny_study, capsys):
    out = tiny_study
    study.main(study_argv(out, "--audit-checks", "membership", "reconstruction"))
    run = out / "naive-seed0"
    before = AuditReport.from_dict(json.loads((run / "audit_before.json").read_text()))
    after = AuditReport.from_dict(json.loads((run / "audit_after.json").read_text()))
    assert before.model == "before: pretrained" and after.model == "after: naive-seed0"
    # the pretrained audit is the seed's shared one
    shared = json.loads((out / "pretrained-seed0" / "audit.json").read_text())
    assert shared == json.loads((run / "audit_before.json").read_text())
    for report in (before, after):
        assert report.config["checks"] == ["membership", "reconstruction"]
        assert report.config["reference_n"] == REFERENCES
        for check, names in (
            ("membership", ("error", "percentile")),
            ("reconstruction", ("similarity", "percentile")),
        ):
            result = report.result(check, 0)
            for name in names:
                estimate = result.statistics[name]
                assert estimate.measured and math.isfinite(estimate.value), (check, name)
            assert result.statistics["percentile"].n == REFERENCES
            assert 0 <= result.statistics["percentile"].value <= 1
        # one forget image: the set-level AUC is not measured, and says why
        auc = report.result("membership", None).statistics["auc"]
        assert auc.status == "not measured" and "members" in auc.note
    table = (run / "audit_compare.md").read_text()
    assert table.startswith("`before: pretrained` → `after: naive-seed0`")
    rows = [line for line in table.splitlines() if line.startswith("| membership | 0 |")]
    assert len(rows) == 2 and all("toward" in r or "no change" in r for r in rows)
    assert "| membership | all | auc | not measured" in table
    assert (run / "audit_before.png").stat().st_size > 0
    assert (run / "audit_after.png").stat().st_size > 0
    assert "Naive deletion, seed 0:" in capsys.readouterr().out
    assert json.loads((run / "audit_flags.json").read_text())[:2] == ["--audit", "--audit-checks"]

    # a rerun with the same flags reuses the audit; other flags redo it
    written = (run / "audit_compare.md").stat().st_mtime_ns
    study.main(study_argv(out, "--audit-checks", "membership", "reconstruction"))
    assert (run / "audit_compare.md").stat().st_mtime_ns == written
    assert "auditing" not in capsys.readouterr().err
    study.main(study_argv(out, "--audit-checks", "membership"))
    again = AuditReport.from_dict(json.loads((run / "audit_after.json").read_text()))
    assert again.config["checks"] == ["membership"]
    assert "reconstruction" not in (run / "audit_compare.md").read_text()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--audit-checks", "likelihod"], "--audit-checks"),
        (["--audit-option", "membership.noise_draw=2"], "noise_draw"),
        (["--audit-option", "membership"], "CHECK.KEY=VALUE"),
    ],
)
def test_bad_audit_flags_fail_before_any_training(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        study.parse_args(["--output-dir", str(tmp_path / "study"), "--audit", *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "study").exists()
