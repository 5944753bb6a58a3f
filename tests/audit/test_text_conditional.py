"""python -m siss.audit --prompt on a tiny Stable-Diffusion-like pipeline folder, end to end.

The folder is ``conftest.tiny_sd_pipeline``'s, built from configs (no download): a
``UNet2DConditionModel`` on 4x8x8 latents, a ``DDPMScheduler``, a one-layer ``CLIPTextModel`` of
width 8 (the UNet's cross-attention dim) over 32 tokens, a ``CLIPTokenizer`` from a local
vocabulary, and an ``AutoencoderKL`` from 3x16x16 pixels to 4x8x8 latents, saved with the
pipeline's ``save_pretrained``.
"""

import json
import math

import pytest
import torch
from conftest import CHEAP_AUDIT_FLAGS, tiny_sd_pipeline, tiny_unet

from siss.audit.__main__ import main

pytestmark = pytest.mark.usefixtures("one_thread")

CHECKS = ["memorization", "membership", "reconstruction", "likelihood"]
CHEAP = CHEAP_AUDIT_FLAGS


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    folder = tiny_sd_pipeline(root / "tiny-sd")
    g = torch.Generator().manual_seed(0)
    torch.save(torch.rand(1, 3, 16, 16, generator=g) * 2 - 1, root / "forget.pt")
    torch.save(torch.rand(6, 3, 16, 16, generator=g) * 2 - 1, root / "reference.pt")
    torch.save(torch.randn(4, 4, 8, 8, generator=g), root / "latents.pt")
    torch.save(torch.rand(2, 1, 16, 16, generator=g) * 2 - 1, root / "gray.pt")
    return root, folder


def test_prompt_on_a_latent_pipeline_measures_every_statistic(pipeline, capsys):
    root, folder = pipeline
    out = root / "out"
    args = ["--model", str(folder), "--prompt", "a photo of a tshirt", "--output_dir", str(out)]
    args += ["--forget", str(root / "forget.pt"), "--reference", str(root / "reference.pt")]
    assert main([*args, "--checks", *CHECKS, *CHEAP]) == 0
    written = out / "tiny-sd"
    data = json.loads((written / "audit.json").read_text())
    assert (written / "audit.md").read_text().startswith("Audit of")
    assert (written / "audit.png").read_bytes()[:4] == b"\x89PNG"
    config = data["config"]
    # pixels (3x16x16) were encoded by the VAE: the audit ran on 4x8x8 latents
    assert config["image_shape"] == [4, 8, 8]
    assert config["command"]["prompt"] == "a photo of a tshirt"
    latent = config["command"]["latent_space"]
    assert latent["vae"].endswith("vae") and latent["data_range"][0] < 0 < latent["data_range"][1]
    assert config["conditioning"] == {"encoder_hidden_states": "tensor(1, 32, 8)"}
    assert {r["check"] for r in data["results"]} == set(CHECKS)

    memorization = [r for r in data["results"] if r["check"] == "memorization"]
    assert memorization
    for result in memorization:
        for name, stat in result["statistics"].items():
            if stat["status"] == "measured":
                assert stat["n"] >= 2, name
                assert math.isfinite(stat["low"]) and math.isfinite(stat["high"]), name
                assert stat["low"] <= stat["value"] <= stat["high"], name
    measured = [s for r in memorization for s in r["statistics"].values()]
    assert any(s["status"] == "measured" for s in measured)

    for result in data["results"]:
        for name, stat in result["statistics"].items():
            where = f"{result['check']}[{result['image']}].{name}"
            if stat["status"] == "measured":
                assert stat["n"] is not None and stat["n"] >= 1, where
                assert stat["low"] is not None and stat["high"] is not None, where
            else:
                assert stat["note"], where  # a stated reason, never a silent gap
        if (
            result["check"] in ("likelihood", "reconstruction", "membership")
            and result["image"] == 0
        ):
            values = result["details"]["reference_values"]
            assert len(values) == 6 and all(isinstance(v, float) for v in values)
    assert "memorization" in capsys.readouterr().out


def test_latents_are_taken_as_given(pipeline):
    root, folder = pipeline
    out = root / "out-latents"
    args = ["--model", str(folder), "--prompt", "a cat", "--output_dir", str(out), "--no_figure"]
    args += ["--forget", str(root / "latents.pt"), "--reference", str(root / "latents.pt")]
    assert main([*args, "--checks", "membership", *CHEAP]) == 0
    data = json.loads((out / "tiny-sd" / "audit.json").read_text())
    assert data["config"]["image_shape"] == [4, 8, 8] and data["config"]["forget_n"] == 4


def test_images_of_neither_pixel_nor_latent_channels_are_named(pipeline, capsys):
    root, folder = pipeline
    args = ["--model", str(folder), "--prompt", "a cat", "--output_dir", str(root / "o")]
    args += ["--forget", str(root / "gray.pt"), "--reference", str(root / "reference.pt")]
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--forget" in err and "1 channels" in err and "latent" in err


def test_text_conditional_model_without_prompt_is_named(pipeline, capsys):
    root, folder = pipeline
    args = ["--model", str(folder), "--output_dir", str(root / "o")]
    args += ["--forget", str(root / "forget.pt"), "--reference", str(root / "reference.pt")]
    with pytest.raises(SystemExit):
        main(args)
    assert "--prompt" in capsys.readouterr().err


def test_prompt_for_an_unconditional_model_is_named(tmp_path, capsys):
    from diffusers import DDPMScheduler

    folder = tmp_path / "plain"
    tiny_unet().save_pretrained(folder / "unet")
    DDPMScheduler(num_train_timesteps=100).save_pretrained(folder / "scheduler")
    torch.save(torch.rand(2, 1, 8, 8) * 2 - 1, tmp_path / "x.pt")
    args = ["--model", str(folder), "--prompt", "a cat", "--output_dir", str(tmp_path / "o")]
    args += ["--forget", str(tmp_path / "x.pt"), "--reference", str(tmp_path / "x.pt")]
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--prompt" in err and "not text-conditional" in err
    assert not (tmp_path / "o").exists()
