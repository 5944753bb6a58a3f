"""The split stage of the Stable Diffusion job (``siss.stable_diffusion.split``) on the random
tiny pipeline: a split with an empty side stops the job, naming the flag that would change it,
after generation and before training."""

from __future__ import annotations

import json

import pytest

from tests.stable_diffusion.sd_harness import CHEAP, expect_exit, run

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate")


def test_fully_memorized_split_names_the_flags(tiny_sd_folder, tmp_path, capsys):
    """With a threshold every image passes (the random tiny model's images all lie within
    distance 100 of one of them), A is everything, X \\ A is empty: the refusal names the
    threshold. Without one, the random model has no memorized group to find."""
    out = tmp_path / "out"
    argv = ["--pretrained_model_name_or_path", tiny_sd_folder, "--prompt", "a photo",
            "--output_dir", out, "--num_images", "8",
            *CHEAP]  # fmt: skip
    run("generate", *argv)
    reference = out / "images" / "00000.png"
    message = expect_exit(capsys, ["split", *argv, "--reference_image", reference,
                                   "--threshold", "100"],
                          "all 8 images", "lower --threshold (100)", "--train_prompt")  # fmt: skip
    assert "--num_images" in message
    expect_exit(capsys, ["split", *argv, "--reference_image", reference],
                "no memorization found", "give --threshold")  # fmt: skip
    assert (out / "split.json").is_file() and (out / "split_memorized.png").is_file()
    # a reference far from every image (white): "no memorization found", naming --threshold
    from PIL import Image

    Image.new("RGB", (16, 16), "white").save(tmp_path / "white.png")
    argv += ["--reference_image", tmp_path / "white.png", "--threshold", "0.5"]
    expect_exit(capsys, ["split", *argv], "no memorization found", "raise it to find more")


def test_random_model_has_no_memorization_by_2_means(tiny_sd_folder, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [
        "--pretrained_model_name_or_path",
        tiny_sd_folder,
        "--prompt",
        "a photo",
        "--output_dir",
        out,
        "--num_images",
        "12",
    ]
    expect_exit(capsys, [*argv, *CHEAP], "no memorization found", "--tightness",
                "--reference_image")  # fmt: skip
    split = json.loads((out / "split.json").read_text())
    assert split["rule"] == "2-means" and split["found"] is False
    assert split["statistics"]["ratio"] > 0.25


def test_generations_that_are_not_finite_stop_the_job_uncounted(tmp_path, capsys):
    """A UNet that outputs NaN: its images were decoded to black (NaN is 0 in uint8), split as
    "no memorization found" and, after unlearning, counted as 0 copies of 4, a measurement of
    nothing. The job now stops at the first such generation and writes no image."""
    import torch
    from conftest import tiny_conditional_unet, tiny_sd_pipeline

    unet = tiny_conditional_unet()
    with torch.no_grad():
        unet.conv_out.bias.fill_(float("nan"))
    folder = tiny_sd_pipeline(tmp_path / "pipe", unet=unet)
    out = tmp_path / "out"
    argv = ["--pretrained_model_name_or_path", folder, "--prompt", "a photo",
            "--output_dir", out, "--num_images", "4", *CHEAP]  # fmt: skip
    expect_exit(capsys, ["generate", *argv], "4 of the 4 generations", "non-finite latents",
                "--dtype")  # fmt: skip
    assert not (out / "images").exists() or not any((out / "images").iterdir())
