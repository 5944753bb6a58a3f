"""benchmarks/gpu.py (issue 12's one command) runs end to end on toy models on the CPU.

Its figures mean nothing here; this checks that the script the GPU session will run works,
writes every section it was asked for, resumes, and says "not measured" for the CUDA-only parts.
"""

import json

import pytest

from benchmarks import gpu

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--smoke", "--device", "cpu", "--workloads", "sd15", "dit-xl2", "--rounds", "1"]
TINY += ["--unit", "1", "--warmup", "0", "--batch-size", "2", "--nan-steps", "2"]


def test_every_section_on_toy_models_and_resume(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    sections = ["timing", "recipe", "memory", "syncs", "bf16"]
    result = gpu.main([*TINY, "--out", str(out), "--sections", *sections])
    written = json.loads(out.read_text())
    assert written["smoke"] is True
    assert set(sections) <= set(written)
    run = written["runs"][0]
    assert run["device"] == "cpu" and run["torch"] and run["diffusers"] and run["date"]
    for key in ("sd15/fp32", "sd15/bf16", "dit-xl2/fp32", "dit-xl2/bf16"):
        entry = written["timing"][key]
        assert set(entry["step_ms"]) == set(gpu.METHODS)
        assert all(stats["median"] > 0 for stats in entry["step_ms"].values())
        assert entry["ratios"]["siss / plain"]["target"] == 1.03
    for mode in ("full", "lora"):
        memory = written["recipe"][f"sd15/{mode}/memory"]
        computed = memory["computed_mib"]
        assert memory["status"].startswith("not measured") and "measured_mib" not in memory
        assert computed["recipe"] == pytest.approx(
            computed["plain"] + computed["teacher"] + computed["balancer_buffer"]
        )
        assert (computed["teacher"] > 0) == (mode == "full")
        for precision in ("fp32", "bf16"):
            entry = written["recipe"][f"sd15/{mode}/{precision}"]
            assert set(entry["step_ms"]) == set(gpu.RECIPE_METHODS)
            assert entry["ratios"]["recipe / plain"]["target"] == 1.35
        assert (memory["trainable"] < memory["parameters"]) == (mode == "lora")
    # CUDA-only measurements say so instead of giving a number
    assert written["syncs"]["status"].startswith("not measured")
    assert all(
        e["status"].startswith("not measured")
        for k, e in written["memory"].items()
        if k != "wall_s"
    )
    for lam in ("0.0", "0.5", "1.0"):
        assert written["bf16"]["weights"][lam]["max_relative_error"] <= 1e-6
        assert written["bf16"]["nonfinite_grad_steps"][lam] == {
            **written["bf16"]["nonfinite_grad_steps"][lam],
            "count": 0,
            "steps": 2,
        }
    assert result["timing"] == written["timing"]

    # a second call keeps finished sections and appends its run
    gpu.main([*TINY, "--out", str(out), "--sections", "syncs"])
    again = json.loads(out.read_text())
    assert again["timing"] == written["timing"] and len(again["runs"]) == 2
    assert "already in" in capsys.readouterr().out


def test_a_cut_off_section_resumes_at_its_next_entry(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    only = ["--workloads", "sd15", "--sections", "timing"]
    gpu.main([*TINY, "--out", str(out), *only, "--precisions", "fp32"])
    first = json.loads(out.read_text())["timing"]
    assert set(first) == {"sd15/fp32"}
    gpu.main([*TINY, "--out", str(out), *only, "--precisions", "fp32", "bf16"])
    second = json.loads(out.read_text())["timing"]
    assert set(second) == {"sd15/fp32", "sd15/bf16"} and second["sd15/fp32"] == first["sd15/fp32"]
    assert "timing sd15/fp32: already in" in capsys.readouterr().out


def test_a_smoke_file_is_not_mixed_with_a_full_run(tmp_path):
    out = tmp_path / "gpu.json"
    gpu.main([*TINY, "--out", str(out), "--sections", "syncs"])
    with pytest.raises(SystemExit, match="smoke"):
        gpu.main(["--device", "cpu", "--out", str(out), "--sections", "syncs"])


def test_bad_flags_are_named(tmp_path):
    with pytest.raises(SystemExit):
        gpu.parse_args(["--out", str(tmp_path / "x.json"), "--rounds", "0"])
