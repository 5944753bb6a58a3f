"""examples/study.py --audit end to end on tiny UNets: the before/after audit of each run.

The study runs from ``examples/assets``; here ``ASSETS`` points to a temporary folder holding a
tiny ``pretrained`` and ``retrain`` (``UNet2DModel`` built from config, saved, loaded by path),
the method runs 2 steps instead of the paper's 300, and the evaluation settings study.py does
not expose take unlearn.py's cheapest values. This checks the plumbing, not the science.
"""

import json
import math

import pytest
import torch
from conftest import tiny_unet
from diffusers import DDPMScheduler

from examples import study, unlearn
from siss.audit import AuditReport

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
    monkeypatch.setitem(study.METHODS, "naive", ({"method": "naive"}, 2))
    real = study.unlearn_job
    cheap = {
        "eval_steps": 2, "nll_probes": 2, "nll_tolerance": 1e-2, "train_batch_size": 8,
        "checkpointing_steps": 2,
    }  # fmt: skip
    # the study's own settings win over these (as its flags would)
    monkeypatch.setattr(
        study, "unlearn_job", lambda config, **settings: real(config, **{**cheap, **settings})
    )
    return tmp_path / "study"


def study_argv(out, *audit):
    return [
        "--seeds", "0", "--methods", "naive", "--output_dir", str(out), "--eval_samples", "8",
        "--eval_every", "2", "--track_samples", "4", "--no_progress", "--audit",
        "--audit_samples", "8", "--audit_steps", "2", "--audit_references", str(REFERENCES),
        "--audit_option", "membership.noise_draws=2",
        "--audit_option", "reconstruction.noise_draws=2", "--final_samples", "0", *audit,
    ]  # fmt: skip


def test_audit_before_and_after_is_written_with_measured_statistics(tiny_study, capsys):
    out = tiny_study
    study.main(study_argv(out, "--audit_checks", "membership", "reconstruction"))
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
    changes = ("toward", "intervals overlap", "no change")
    assert len(rows) == 2 and all(any(c in r for c in changes) for r in rows)
    assert "| membership | all | auc | not measured" in table
    assert (run / "audit_before.png").stat().st_size > 0
    assert (run / "audit_after.png").stat().st_size > 0
    assert "Naive deletion, seed 0:" in capsys.readouterr().out
    recorded = json.loads((run / "audit_flags.json").read_text())
    assert recorded["audit"] and recorded["audit_checks"] == ["membership", "reconstruction"]
    # the retrained model is audited as a run's model is, and each model is tabled against it
    retrain = out / "retrain-seed0"
    assert (retrain / "model").resolve() == (study.ASSETS / "retrain").resolve()
    retrained = AuditReport.from_dict(json.loads((retrain / "audit_after.json").read_text()))
    assert retrained.model == "after: retrain-seed0"
    section = (out / "table.md").read_text().split("Audit against the retrained model")[1]
    header, rows = section.splitlines()[2], section.splitlines()[4:7:2]  # Retrain between
    assert header == "| method | reconstruction | membership | membership (all) |"
    assert [r.split(" | ")[0] for r in rows] == ["| Pretrained", "| Naive deletion"]
    for check, column in (("reconstruction", 1), ("membership", 2)):
        reference = retrained.result(check, 0).statistics["percentile"]
        for row, report in zip(rows, (before, after), strict=True):
            mine = report.result(check, 0)
            value = mine.statistics["percentile"].value
            within = int(reference.low <= value <= reference.high)
            assert row.split(" | ")[column] == (
                f"{mine.verdict} 1; percentile {value:.3g} → {reference.value:.3g}; "
                f"within {within}/1"
            )

    # a rerun with the same flags reuses the audit; other flags redo it
    written = (run / "audit_compare.md").stat().st_mtime_ns
    study.main(study_argv(out, "--audit_checks", "membership", "reconstruction"))
    assert (run / "audit_compare.md").stat().st_mtime_ns == written
    assert "auditing" not in capsys.readouterr().err
    study.main(study_argv(out, "--audit_checks", "membership"))
    again = AuditReport.from_dict(json.loads((run / "audit_after.json").read_text()))
    assert again.config["checks"] == ["membership"]
    assert "reconstruction" not in (run / "audit_compare.md").read_text()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--audit_checks", "likelihod"], "--audit_checks"),
        (["--audit_option", "membership.noise_draw=2"], "noise_draw"),
        (["--audit_option", "membership"], "CHECK.KEY=VALUE"),
    ],
)
def test_bad_audit_flags_fail_before_any_training(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        study.parse_args(["--output_dir", str(tmp_path / "study"), "--audit", *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "study").exists()


def final_argv(out, samples):
    return [
        "--seeds", "0", "1", "--methods", "naive", "--output_dir", str(out), "--eval_samples",
        "8", "--eval_steps", "2", "--eval_every", "2", "--track_samples", "4", "--no_progress",
        "--final_samples", str(samples),
    ]  # fmt: skip


def test_the_final_evaluation_pools_the_rate_with_its_interval_and_checks_bf16(
    tiny_study, monkeypatch
):
    out = tiny_study
    monkeypatch.setattr(study, "FINAL_BATCH", 4)
    study.main([*final_argv(out, 10), "--final_precision", "bf16"])
    for run in ("pretrained-seed0", "retrain-seed1", "naive-seed1"):
        folder = out / run / "final-10-ddpm2-bf16"
        assert sorted(f.name for f in folder.glob("batch-*")) == [
            "batch-0000.safetensors", "batch-0001.safetensors", "batch-0002.safetensors",
        ]  # fmt: skip
        assert json.loads((folder / "metrics.json").read_text())["samples"] == 10
    results = json.loads((out / "results.json").read_text())
    for row in results["rows"]:
        assert row["final_samples"] == 10 and row["samples"] == 20  # 2 seeds x 10, pooled
        low, high = row["outlier_rate_ci95"]
        assert low <= row["outlier_count"] / 20 <= high
    check = results["precision_check"]
    assert sorted(check["models"]) == ["naive", "pretrained"]
    for model in check["models"].values():
        assert model["samples"] == 4 and 0 <= model["verdicts_differing"] <= 4
        assert model["median_pixel_change"] > 0  # bf16 is not fp32, and says by how much
    table = (out / "table.md").read_text()
    assert "the final evaluation (10 samples a seed)" in table and "/20) |" in table
    assert "The final evaluation samples in bf16" in table
    # the pretrained model's spread: disjoint draws of 2 batches (8 samples), and of a seed's 10
    draws = {d["samples_per_draw"]: d for d in results["pretrained_spread"]}
    assert sorted(draws) == [8, 10] and len(draws[10]["fid"]) == 2
    assert "over 2 disjoint draws of 10 samples" in table
    # the spread is kept beside the batches: the table is made again without them
    for batch in out.glob("*/final-10-ddpm2-bf16/batch-*.safetensors"):
        batch.unlink()
    study.main([*final_argv(out, 10), "--final_precision", "bf16"])
    assert json.loads((out / "results.json").read_text()) == results


def test_the_final_evaluation_resumes_at_the_first_missing_batch(tiny_study, monkeypatch):
    out = tiny_study
    monkeypatch.setattr(study, "FINAL_BATCH", 4)
    args = study.parse_args(final_argv(out, 10))
    calls = []

    def samples(label, seed, args, batch, precision, count):
        calls.append(batch)
        if batch == 1 and len(calls) == 2:
            raise KeyboardInterrupt  # stopped while drawing the second batch
        drawn = torch.rand(count, 1, 16, 16, generator=torch.Generator().manual_seed(batch))
        drawn[0] = float("nan") if batch == 2 else drawn[0]  # one diverged sample
        return drawn * 2 - 1

    monkeypatch.setattr(study, "final_samples", samples)
    with pytest.raises(KeyboardInterrupt):
        study.final_evaluation("pretrained", 0, args)
    assert calls == [0, 1]
    metrics = study.final_evaluation("pretrained", 0, args)
    assert calls == [0, 1, 1, 2]  # batch 0 was kept, not redrawn
    assert (metrics["samples"], metrics["nonfinite_samples"]) == (10, 1)
    # a non-finite sample makes the rate and the quality "not measured", never numbers
    assert math.isnan(metrics["outlier_rate"]) and metrics["fid"] is None
    assert "fid" in metrics["not_measured"]
    runs = [{"after": {**AFTER}, "final": metrics, "steps": 0, "train_wall_s": 0.0}]
    row = study.summarize({"pretrained": runs})[0]
    assert math.isnan(row["outlier_rate_ci95"][0]) and math.isnan(row["fid"][0])
    assert "not measured (1 non-finite samples)" in study.table_markdown([row])
    again = study.final_evaluation("pretrained", 0, args)  # reused, not redrawn (NaN != NaN)
    assert json.dumps(again) == json.dumps(metrics)
    assert calls == [0, 1, 1, 2]


AFTER = {
    "inception_score": 9.0, "fid": 10.0, "outlier_nll_bpd": 3.0, "outlier_rate": 0.0,
    "outlier_count": 0, "samples": 8,
}  # fmt: skip


def test_final_noise_differs_by_batch_and_seed_and_from_the_in_run_evaluation():
    draws = {
        (seed, batch): torch.randn(4, generator=study.final_noise(seed, batch))
        for seed in (0, 1)
        for batch in (0, 1)
    }
    draws["in-run"] = torch.randn(4, generator=torch.Generator().manual_seed(1))
    values = list(draws.values())
    assert all(not torch.equal(a, b) for i, a in enumerate(values) for b in values[i + 1 :])
    assert torch.equal(draws[0, 1], torch.randn(4, generator=study.final_noise(0, 1)))


def test_a_negative_final_sample_count_is_refused_by_name(tmp_path, capsys):
    with pytest.raises(SystemExit):
        study.parse_args(["--output_dir", str(tmp_path / "s"), "--final_samples", "-1"])
    assert "--final_samples" in capsys.readouterr().err


def test_timesteps_reach_every_method_and_the_folder_refuses_other_ones(tiny_study, capsys):
    out = tiny_study
    argv = [*final_argv(out, 0)[:-2], "--final_samples", "0", "--seeds", "0"]
    study.main([*argv, "--timesteps", "0", "1"])
    run = json.loads((out / "naive-seed0" / "metrics.json").read_text())
    assert run["config"]["timesteps"] == "[0, 1]"
    assert json.loads((out / "pair.json").read_text())["timesteps"] == [0, 1]
    with pytest.raises(SystemExit, match=r"\['timesteps'\] differ"):
        study.main(argv)  # unlearn.py's default window is not [0, 1]


def test_a_folder_of_runs_drawn_with_replacement_is_refused(tiny_study):
    """Runs of the unlearn.py that drew keep rows with replacement are not reused as this one's."""
    refused_with(tiny_study, {}, "drawn with replacement")  # what 0.2.0 wrote: no "draws"


def refused_with(out, extra, match):
    """A folder whose pair.json is the default pair plus ``extra`` is refused, untouched."""
    out.mkdir()
    pair = {
        "pretrained": str((study.ASSETS / "pretrained").resolve()),
        "retrain": str((study.ASSETS / "retrain").resolve()),
        "process": "ddpm",
        **extra,
    }
    (out / "pair.json").write_text(json.dumps(pair))
    argv = [*final_argv(out, 0)[:-2], "--final_samples", "0", "--seeds", "0"]
    with pytest.raises(SystemExit, match=match):
        study.main(argv)
    assert sorted(path.name for path in out.iterdir()) == ["pair.json"]


def test_a_folder_of_runs_with_the_noise_keep_target_is_refused(tiny_study):
    """SISS runs made before the teacher keep target became its default are not reused."""
    # no "siss_keep_target": written before the teacher keep target
    refused_with(tiny_study, {"draws": study.DRAWS}, "siss_keep_target default there, teacher;")


def test_a_folder_of_teacher_runs_at_the_lambda_extremes_is_refused(tiny_study):
    """siss-0 and siss-1 trained with the teacher (before it was refused there) are not reused."""
    old = {"draws": study.DRAWS, "siss_keep_target": "teacher"}
    refused_with(tiny_study, old, "siss_keep_target teacher there, teacher; noise at lam 0 and 1")


def test_batch_size_reaches_every_method_and_the_folder_refuses_another(tiny_study, monkeypatch):
    out = tiny_study
    argv = [*final_argv(out, 0)[:-2], "--final_samples", "0", "--seeds", "0"]
    built = []
    cheap = study.unlearn_job  # the fixture's, whose own batch size is 8

    def job(config, **settings):
        built.append(cheap(config, **settings))
        return built[-1]

    monkeypatch.setattr(study, "unlearn_job", job)
    study.main([*argv, "--train_batch_size", "4"])
    runs = [args for args in built if args.output_dir.name == "naive-seed0"]  # the method run
    assert runs and all(args.train_batch_size == 4 for args in runs)
    assert json.loads((out / "pair.json").read_text())["batch_size"] == 4
    with pytest.raises(SystemExit, match=r"\['batch_size'\] differ \(batch_size 4 there"):
        study.main([*argv, "--train_batch_size", "8"])


# study.py's method table as unlearn.py flags, before it built siss.UnlearningConfig itself
OLD_ARGV = {
    "naive": (["--method", "naive"], 300),
    "naive-teacher": (["--method", "siss", "--lam", "0.5", "--superfactor", "0"], 300),
    "siss-0": (["--method", "siss", "--lam", "0"], 300),
    "siss-0.5": (["--method", "siss", "--lam", "0.5"], 300),
    "siss-0.5-noise": (["--method", "siss", "--lam", "0.5", "--keep_target", "noise"], 300),
    "siss-nois": (["--method", "siss-nois"], 300),
    "erasediff": (["--method", "erasediff"], 100),
    "siss-1": (["--method", "siss", "--lam", "1"], 100),
    "neggrad": (["--method", "neggrad"], 100),
    # added with the flags they take (issue 23's study)
    "siss-0.5-nonmember": (["--method", "siss", "--lam", "0.5", "--until", "nonmember"], 300),
    "retrack": (["--method", "retrack"], 300),
    "siss-0.5-track": (
        ["--method", "siss", "--lam", "0.5", "--until", "nonmember", "--stop_rule", "track"],
        300,
    ),
}


@pytest.mark.filterwarnings("ignore:UnlearningConfig. keep_target='teacher' with timesteps")
@pytest.mark.parametrize("label", list(study.METHODS))
def test_each_method_trains_the_config_its_flags_made(label, tmp_path):
    """study.py runs unlearn.run with a recipe config (no argv lists): the config, and the run's
    settings, are those the unlearn.py flags it used to pass made."""
    args = study.parse_args(["--seeds", "3", "--timesteps", "0", "500"])
    flags, steps = OLD_ARGV[label]
    argv = [*flags, "--max_train_steps", str(steps), "--seed", "3", "--timesteps", "0", "500"]
    config = unlearn.resolve_keep_target(unlearn.parse_args([*argv, "--output_dir", "x"]))
    assert study.recipe(label, 3, args) == config
    settings = study.RUN_SETTINGS.get(label, {})
    job = study.unlearn_job(study.recipe(label, 3, args), output_dir=tmp_path / label, **settings)
    assert (job.method, job.max_train_steps, job.seed, job.timesteps, job.until) == (
        config.method,
        steps,
        3,
        [0, 500],
        "nonmember" if "nonmember" in flags else "steps",
    )
    assert job.stop_rule == ("track" if "track" in flags else "mean")
    assert not (tmp_path / label).exists()  # building the settings writes nothing


@pytest.mark.parametrize(
    ("amx", "avx512_bf16", "expected"),
    [(False, False, "fp32"), (True, False, "bf16"), (False, True, "bf16")],
)
def test_auto_precision_is_bf16_only_on_a_cpu_that_computes_it(
    tiny_study, monkeypatch, amx, avx512_bf16, expected
):
    """Without AMX or AVX512-BF16 oneDNN emulates bf16 (~28x slower than fp32 on an AVX2 CPU):
    ``--final_precision auto`` (the default) samples in fp32 there, and names the final
    evaluation's folders by the precision it resolved to."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert study.parse_args(final_argv(tiny_study, 10)).final_precision == expected
    chosen = study.parse_args([*final_argv(tiny_study, 10), "--final_precision", "fp32"])
    assert chosen.final_precision == "fp32"


def test_the_non_member_stop_and_retrack_run_through_the_study(tiny_study, monkeypatch):
    """Issue 23's rows: SISS with ``--until nonmember`` (its rule's checks recorded) and
    ReTrack, each trained from its recipe config by the study."""
    for label in ("siss-0.5-nonmember", "retrack"):
        monkeypatch.setitem(study.METHODS, label, (study.METHODS[label][0], 2))
    argv = [*final_argv(tiny_study, 0)[:-2], "--final_samples", "0", "--seeds", "0"]
    study.main([*argv, "--methods", "siss-0.5-nonmember", "retrack"])
    stopped = json.loads((tiny_study / "siss-0.5-nonmember-seed0" / "metrics.json").read_text())
    assert stopped["method"] == "siss" and stopped["nonmember_stop"]["rule"] == "mean"
    assert stopped["nonmember_stop"]["checks"]  # the start's check at least
    retrack = json.loads((tiny_study / "retrack-seed0" / "metrics.json").read_text())
    assert retrack["method"] == "retrack" and retrack["steps"] == 2
    rows = json.loads((tiny_study / "results.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["pretrained", "retrain", "siss-0.5-nonmember", "retrack"]


def test_the_audit_table_counts_verdicts_and_seeds_within_the_retrained_interval():
    """Constructed audits of two seeds: the verdicts are counted, the key statistic (the
    percentile, not the NLL) is averaged beside the retrained model's, "within" counts the seeds
    whose value lies in the retrained model's interval, and a statistic the retrained model
    could not measure says so instead of counting as outside."""
    from siss._digits.study import audit_markdown
    from siss.audit import AuditReport, CheckResult, Estimate, compare

    def report(name, percentile, verdict, low=0.0, high=1.0):
        stats = {
            "nll_bpd": Estimate(8.0, 7.9, 8.1, 4, "lower"),
            "percentile": Estimate(percentile, low, high, 128, "lower"),
        }
        held = {"held": True, "not held": False, "overshot": False}[verdict]
        return AuditReport(name, [CheckResult("likelihood", 0, stats, held, "", verdict=verdict)])

    retrained = [
        report("retrain", 0.6, "not held", 0.5, 0.7),
        report("retrain", 0.4, "not held", 0.3, 0.5),
    ]
    unlearned = [report("a", 0.65, "not held"), report("a", 0.98, "overshot")]
    table = audit_markdown(
        {"siss-0.5": [compare(None, u, r) for u, r in zip(unlearned, retrained, strict=True)]}
    )
    row = table.splitlines()[-1]
    assert row == (
        "| SISS (λ=0.5), teacher keep target | not held 1, overshot 1; "
        "percentile 0.815 → 0.5; within 1/2 |"
    )
    missing = report("retrain", 0.6, "not held")
    missing.results[0].statistics["percentile"] = Estimate.missing("diverged", "lower")
    table = audit_markdown({"retrack": [compare(None, unlearned[0], missing)]})
    assert table.splitlines()[-1].endswith("; percentile not measured on any seed (diverged) |")
    table = audit_markdown(
        {"retrack": [compare(None, unlearned[0], missing), compare(None, *retrained)]}
    )
    assert table.splitlines()[-1].endswith("; percentile not measured on every seed (diverged) |")


def test_the_audit_table_gives_a_check_ranked_per_noise_level_a_column_per_level():
    """``reconstruction_sweep`` ranks the image at each t: each level is a column of its own,
    compared with the retrained model's at that level."""
    from siss._digits.study import audit_markdown
    from siss.audit import AuditReport, CheckResult, Estimate, compare

    def report(name, low_t, high_t):
        stats = {
            "similarity@t=50": Estimate(0.9, 0.8, 1.0, 4, "higher"),
            "percentile@t=50": Estimate(low_t, low_t - 0.1, low_t + 0.1, 128, "higher"),
            "percentile@t=500": Estimate(high_t, high_t - 0.1, high_t + 0.1, 128, "higher"),
        }
        check = CheckResult("reconstruction_sweep", 0, stats, False, "", verdict="not held")
        return AuditReport(name, [check])

    table = audit_markdown(
        {"siss-0.5": [compare(None, report("a", 0.8, 0.6), report("r", 0.5, 0.65))]}
    )
    header, _, row = table.splitlines()[-3:]
    assert header == "| method | reconstruction_sweep @t=50 | reconstruction_sweep @t=500 |"
    assert row == (
        "| SISS (λ=0.5), teacher keep target | not held 1; percentile@t=50 0.8 → 0.5; within 0/1 "
        "| not held 1; percentile@t=500 0.6 → 0.65; within 1/1 |"
    )
