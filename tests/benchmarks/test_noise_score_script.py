"""benchmarks/noise_score.py (issue 22, section 6) runs on the planted pipeline.

With the pipeline's own UNet as the "unlearned" one, every change it reports is exactly zero:
the decomposition, the moved predictions, the copies and the scores.
"""

import json

import pytest
from conftest import planted_sd_pipeline

from benchmarks import noise_score

pytestmark = pytest.mark.usefixtures("one_thread")


def test_unchanged_unet_moves_nothing(tmp_path, capsys):
    planted = planted_sd_pipeline(tmp_path / "pipe")
    out = tmp_path / "noise.json"
    args = ["--model", str(planted.folder), "--unet", str(planted.folder / "unet")]
    args += ["--prompt", planted.prompt, "--out", str(out), "--generations", "3"]
    args += ["--sample-steps", "4", "--reference-prompts", planted.other_prompts[0]]
    assert noise_score.main(args) == 0
    result = json.loads(out.read_text())
    assert set(result["decomposition"].values()) == {0.0}
    scores = {key: value["mean_se"][0] for key, value in result["scores"].items()}
    assert len(set(scores.values())) == 1 and scores["before@before"] > 0
    for moved in result["predictions"].values():
        assert moved["delta_eps_cond"][0] == moved["delta_eps_uncond"][0] == 0.0
        assert moved["d_before"] == moved["d_after"]
    prompts = result["prompts"]
    assert list(prompts["before"]) == [planted.prompt, "", planted.other_prompts[0]]
    assert prompts["before"] == prompts["after"]
    assert prompts["before"][planted.prompt]["copies"]["of"] == 3
    printed = capsys.readouterr().out
    assert "reported change +0.000 = model effect on fixed x_t +0.000" in printed
