"""examples/stable_diffusion.py end to end on tiny Stable Diffusion pipelines (CPU, no download).

The pipelines are built from config and saved with ``save_pretrained`` (``tests/conftest.py``:
``tiny_sd_pipeline``, and ``planted_sd_pipeline``, whose UNet was trained to generate one fixed
"memorized" image for its prompt about two thirds of the time). Checked: the memorized fraction
drops after unlearning (LoRA and full UNet); an interrupted run resumed ends with the
uninterrupted run's LoRA weights; two real processes (torchrun, gloo) end with identical weights
on both ranks, equal to the one-process run on the same global batch; every bad input the issue
lists stops with an error naming the flag before the expensive work; the prompt-list readers;
``--help``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_conditional_unet, tiny_sd_pipeline
from safetensors.torch import load_file

from examples import stable_diffusion as sd

ROOT = Path(__file__).resolve().parents[2]
MODULE = ["-m", "examples.stable_diffusion"]  # run from ROOT, as the docs say

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate")

# Cheap settings: 10 sampling steps, small batches; every run on the CPU in float32.
CHEAP = [
    "--device", "cpu", "--sample-steps", "10", "--gen-batch-size", "16", "--no-progress",
    "--noise-generations", "2",
]  # fmt: skip


@pytest.fixture
def fresh_accelerate():
    """accelerate keeps one process-wide state; every run of the script starts from none."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A random-weight tiny SD pipeline folder (3x16x16 images)."""
    return tiny_sd_pipeline(tmp_path_factory.mktemp("tiny") / "pipe")


def run(*argv):
    return sd.main([str(a) for a in argv])


def lora_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "lora" / "pytorch_lora_weights.safetensors"))


# --------------------------------------------------------------------------------------------
# --help and bad input
# --------------------------------------------------------------------------------------------


def test_help_runs_as_a_script_and_names_every_stage_and_flag():
    done = subprocess.run(
        [sys.executable, *MODULE, "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    text = done.stdout
    for word in (
        "generate",
        "split",
        "unlearn",
        "verify",
        "--lora-rank",
        "--full",
        "--reference-image",
        "--prompts",
        "--clip-model",
        "--resume",
        "--verify-every",
        "--gradient-checkpointing",
        "--compile",
        "--mixed-precision",
    ):
        assert word in text, word  # fmt: skip
    parser_flags = [a for a in text.split() if a.startswith("--")]
    assert len(set(parser_flags)) > 40


def expect_exit(capsys, argv, *words):
    """The script stops (SystemExit, non-zero) with a message holding ``words``."""
    with pytest.raises(SystemExit) as stopped:
        run(*argv)
    message = f"{stopped.value.code} {capsys.readouterr().err}"
    assert stopped.value.code not in (0, None), message
    for word in words:
        assert word in message, message
    return message


def test_missing_model_path_names_the_flag(tmp_path, capsys):
    out = tmp_path / "out"
    expect_exit(capsys, ["--model", tmp_path / "no-such", "--prompt", "a", "--out", out], "--model")
    assert not out.exists()


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--steps", "-5"], "--steps must be >= 1"),
        (["--lr", "0"], "--lr: must be in (0, inf], got 0.0"),
        (["--method", "naive", "--keep-target", "teacher"], "--keep-target: 'teacher' needs"),
        (["--balance-every", "0"], "--balance-every: must be >= 1, got 0"),
        *(
            []
            if torch.cuda.is_available()
            else [(["--device", "cuda"], "--device cuda: CUDA is not available")]
        ),
    ],
)
def test_bad_recipe_flags_are_named_before_loading(tiny_model, tmp_path, capsys, flags, named):
    out = tmp_path / "out"
    expect_exit(capsys, ["--model", tiny_model, "--prompt", "a", "--out", out, *flags], named)
    assert not out.exists()


def test_pipeline_without_text_encoder_is_refused_before_loading(tmp_path, capsys):
    from conftest import tiny_unet
    from diffusers import DDPMPipeline, DDPMScheduler

    folder = tmp_path / "ddpm"
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler()).save_pretrained(folder)
    out = tmp_path / "out"
    expect_exit(capsys, ["--model", folder, "--prompt", "a", "--out", out, *CHEAP],
                "--model", "text encoder")  # fmt: skip
    assert not (out / "images").exists()


def test_reference_image_of_the_wrong_size_stops_before_generating(tiny_model, tmp_path, capsys):
    from PIL import Image

    reference = tmp_path / "ref.png"
    Image.new("RGB", (20, 24), "red").save(reference)
    out = tmp_path / "out"
    argv = ["--model", tiny_model, "--prompt", "a", "--out", out, "--reference-image", reference]
    expect_exit(capsys, [*argv, *CHEAP], "--reference-image", "20x24", "16x16")
    assert not (out / "images").exists()


def test_lora_on_a_model_without_attention_is_refused(tmp_path, capsys):
    unet = tiny_conditional_unet(
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        mid_block_type=None,
    )
    folder = tiny_sd_pipeline(tmp_path / "pipe", unet=unet)
    out = tmp_path / "out"
    argv = ["--model", folder, "--prompt", "a", "--out", out, *CHEAP]
    expect_exit(capsys, argv, "--lora-rank 4", "--lora-targets", "--full")
    assert not (out / "images").exists()
    expect_exit(capsys, [*argv, "--lora-rank", "0"], "--lora-rank")
    expect_exit(capsys, [*argv, "--full", "--lora-rank", "8"], "--full", "--lora-rank")


def test_fully_memorized_split_names_the_flags(tiny_model, tmp_path, capsys):
    """The random tiny model's images all lie within the default pixel threshold of one of them:
    A is everything, X \\ A is empty."""
    out = tmp_path / "out"
    argv = ["--model", tiny_model, "--prompt", "a photo", "--out", out, "--num-images", "8", *CHEAP]
    run("generate", *argv)
    reference = out / "images" / "00000.png"
    message = expect_exit(capsys, ["split", *argv, "--reference-image", reference],
                          "all 8 images", "--train-prompt")  # fmt: skip
    assert "--num-images" in message
    assert (out / "split.json").is_file() and (out / "split_memorized.png").is_file()
    # a reference far from every image (white): "no memorization found", naming --threshold
    from PIL import Image

    Image.new("RGB", (16, 16), "white").save(tmp_path / "white.png")
    argv += ["--reference-image", tmp_path / "white.png", "--threshold", "0.5"]
    expect_exit(capsys, ["split", *argv], "no memorization found", "raise --threshold")


def test_random_model_has_no_memorization_by_2_means(tiny_model, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--model", tiny_model, "--prompt", "a photo", "--out", out, "--num-images", "12"]
    expect_exit(capsys, [*argv, *CHEAP], "no memorization found", "--tightness",
                "--reference-image")  # fmt: skip
    split = json.loads((out / "split.json").read_text())
    assert split["rule"] == "2-means" and split["found"] is False
    assert split["statistics"]["ratio"] > 0.25


def test_batch_sizes_that_do_not_divide_are_refused(tiny_model, tmp_path, capsys):
    argv = ["--model", tiny_model, "--prompt", "a", "--out", tmp_path, *CHEAP]
    expect_exit(capsys, [*argv, "--batch-size", "6", "--micro-batch-size", "4"], "--batch-size")


# --------------------------------------------------------------------------------------------
# Prompt lists
# --------------------------------------------------------------------------------------------


def test_prompt_list_formats(tmp_path):
    (tmp_path / "list.txt").write_text("# memorized prompts\nfirst prompt\n\nsecond prompt\n")
    jobs = sd.read_prompt_list(tmp_path / "list.txt", tmp_path / "out")
    assert [j.prompt for j in jobs] == ["first prompt", "second prompt"]
    assert [j.out.name for j in jobs] == ["000-first-prompt", "001-second-prompt"]

    (tmp_path / "ref.png").write_bytes(b"")
    rows = [
        {"prompt": "a", "train_prompt": "a'", "reference_image": "ref.png"},
        # Wen et al.'s sdv1_500_memorized.jsonl: caption, index, url
        {"caption": "Mothers influence on her young hippo", "index": 964841345, "url": "https://x"},
    ]
    (tmp_path / "list.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    first, second = sd.read_prompt_list(tmp_path / "list.jsonl", tmp_path / "out")
    assert (first.prompt, first.train_prompt) == ("a", "a'")
    assert first.reference == (tmp_path / "ref.png").resolve()
    assert (second.prompt, second.train_prompt) == ("Mothers influence on her young hippo",) * 2
    assert second.source == {"index": 964841345, "url": "https://x"}

    (tmp_path / "bad.jsonl").write_text('{"url": "no prompt"}\n')
    with pytest.raises(ValueError, match=r"--prompts .* entry 1: no 'prompt'"):
        sd.read_prompt_list(tmp_path / "bad.jsonl", tmp_path / "out")
    (tmp_path / "missing.jsonl").write_text('{"prompt": "a", "reference_image": "nope.png"}\n')
    with pytest.raises(ValueError, match="no reference image"):
        sd.read_prompt_list(tmp_path / "missing.jsonl", tmp_path / "out")


def test_webster_columns_keep_memorized_rows_only():
    """Webster's ground-truth parquet, as pyarrow's ``to_pydict()`` gives it."""
    columns = {
        "caption": ["Galaxy Women's Leather Boots", "Mothers influence on her young hippo", "x"],
        "url": ["u1", "u2", "u3"],
        "overfit_type": ["TV", "MV", "N"],
    }
    rows = sd.records_from_columns(columns, "gt.parquet", sd.MEMORIZED_TYPES)
    assert [r["caption"] for r in rows] == columns["caption"][:2]
    rows = sd.records_from_columns(columns, "gt.parquet", ["MV"])
    assert [r["overfit_type"] for r in rows] == ["MV"]
    with pytest.raises(ValueError, match="no 'caption' or 'prompt' column"):
        sd.records_from_columns({"text": ["a"]}, "gt.parquet", ["MV"])


def test_parquet_without_pyarrow_says_what_to_install(tmp_path):
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        (tmp_path / "gt.parquet").write_bytes(b"PAR1")
        with pytest.raises(SystemExit, match="pip install pyarrow"):
            sd.read_prompt_list(tmp_path / "gt.parquet", tmp_path / "out")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({"caption": ["a", "b"], "url": ["u", "v"], "overfit_type": ["MV", "N"]})
        pq.write_table(table, tmp_path / "gt.parquet")
        jobs = sd.read_prompt_list(tmp_path / "gt.parquet", tmp_path / "out")
        assert [j.prompt for j in jobs] == ["a"]


def test_batch_plan_is_the_same_global_batch_for_any_process_count():
    """The rows and draw seeds of a step do not depend on how many processes share it."""
    one = sd.BatchPlan(0, keep=10, forget=3, batch=8, micro=2, world=1)
    two = [sd.BatchPlan(0, keep=10, forget=3, batch=8, micro=2, world=2) for _ in range(2)]
    for step in range(4):
        single = [(k.tolist(), f.tolist(), g.initial_seed()) for k, f, g in
                  one.micro_batches(step, 0)]  # fmt: skip
        shared = [(k.tolist(), f.tolist(), g.initial_seed()) for rank in (0, 1)
                  for k, f, g in two[rank].micro_batches(step, rank)]  # fmt: skip
        assert sorted(single) == sorted(shared)
        assert len({seed for *_, seed in shared}) == 4  # every micro-batch its own stream
    # every keep row once per epoch of 10 rows: steps 0-4 hold 40 rows = 4 epochs
    rows = torch.cat([k for s in range(5) for k, _, _ in one.micro_batches(s, 0)])
    assert all(sorted(rows[i : i + 10].tolist()) == list(range(10)) for i in range(0, 40, 10))


# --------------------------------------------------------------------------------------------
# Resume and two processes (the random tiny model, split by distance to one of its images)
# --------------------------------------------------------------------------------------------

SMALL_RUN = [
    "--num-images", "16", "--steps", "4", "--batch-size", "8", "--micro-batch-size", "2",
    "--lr", "1e-3", "--verify-images", "2", "--threads", "1",
]  # fmt: skip


def reference_split(model: Path, out: Path, prompt: str = "a photo") -> list:
    """Generate into ``out`` and return the flags of a reference split with about half the
    images on each side (the threshold: the median distance to image 0)."""
    from siss.audit.generation import pixel_features

    base = ["--model", model, "--prompt", prompt, "--out", out, *CHEAP, *SMALL_RUN]
    run("generate", *base)
    images, _ = sd.load_generated(out, 16)
    features = pixel_features(sd.to_signed(images))
    distances = (features - features[:1]).norm(dim=1)
    threshold = distances[1:].median().item() + 1e-6
    return ["--reference-image", out / "images" / "00000.png", "--threshold", threshold]


def initial_lora(model: Path, argv: list) -> dict[str, torch.Tensor]:
    """The LoRA weights the script starts from (its seeded initialisation)."""
    from diffusers import StableDiffusionPipeline

    args = sd.parse_args([*map(str, argv), "--out", "unused"])
    unet = StableDiffusionPipeline.from_pretrained(model).unet
    unet.requires_grad_(False)
    sd.add_lora(unet, args)
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    return {f"unet.{k}": v for k, v in state.items()}


def largest_difference(first: dict, second: dict) -> float:
    assert first.keys() == second.keys()
    return max((first[k].double() - second[k].double()).abs().max().item() for k in first)


@pytest.mark.parametrize(
    "recipe",
    [[], ["--keep-target", "teacher", "--calibration-batches", "2", "--balance-every", "3"]],
    ids=["noise-target", "teacher-calibrated"],
)
def test_resume_ends_with_the_uninterrupted_runs_lora(tiny_model, tmp_path, recipe):
    """Stopped after 2 steps and resumed, the LoRA equals an uninterrupted run's; with the
    teacher recipe the calibrated scale and the balancer's held coefficient (refreshed every 3
    steps: step 2 is between refreshes) come back from accelerate's state."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    split = reference_split(tiny_model, whole)
    argv = ["--model", tiny_model, "--prompt", "a photo", *CHEAP, *SMALL_RUN, *split, *recipe]
    expected = run(*argv, "--out", whole)
    assert expected["split"]["memorized"] >= 1 and expected["split"]["not_memorized"] >= 1
    for folder in ("images", "latents"):
        (parts / folder).mkdir(parents=True)
        for file in (whole / folder).iterdir():
            (parts / folder / file.name).write_bytes(file.read_bytes())
    assert run(*argv, "--out", parts, "--stop-after", "2") == {"stopped": True}
    assert [p.name for p in sd.checkpoints(parts)] == ["step-000002"]
    assert not (parts / "metrics.json").exists() and not (parts / "lora").exists()
    # a resume with another configuration is refused, naming the flag
    with pytest.raises(SystemExit, match=r"--lr \(saved 0.001, now 0.002\)"):
        run(*argv, "--out", parts, "--resume", "--lr", "2e-3")
    # and a plain re-run must not silently start over
    with pytest.raises(SystemExit, match="--resume"):
        run(*argv, "--out", parts)
    resumed = run(*argv, "--out", parts, "--resume")
    final, interrupted = lora_weights(whole), lora_weights(parts)
    for key, value in final.items():
        assert torch.equal(value, interrupted[key]), key
    assert largest_difference(final, initial_lora(tiny_model, argv)) > 1e-3  # it did train
    assert [e["step"] for e in resumed["history"]] == [0, 4]
    assert resumed["loss"] == expected["loss"] and len(expected["loss"]) == 4 * 4
    timeless = [
        {k: v for k, v in r["history"][0].items() if k != "wall_s"} for r in (resumed, expected)
    ]
    assert timeless[0] == timeless[1]
    assert not sd.checkpoints(parts)  # a finished run keeps its weights, not its checkpoints


def test_two_processes_equal_one_process_on_the_same_global_batch(tiny_model, tmp_path):
    """torchrun --nproc_per_node 2 (gloo): 2 micro-batches of 2 per rank and step, against one
    process with 4 micro-batches of 2; the same global batch of 8 and the same draws."""
    one, two = tmp_path / "one", tmp_path / "two"
    split = reference_split(tiny_model, one)
    argv = ["--model", tiny_model, "--prompt", "a photo", *CHEAP, *SMALL_RUN, *split]
    single = run(*argv, "--out", one)
    assert (single["processes"], single["accumulation_steps"]) == (1, 4)
    for folder in ("images", "latents"):  # the same training data: generation is not compared
        (two / folder).mkdir(parents=True)
        for file in (one / folder).iterdir():
            (two / folder / file.name).write_bytes(file.read_bytes())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        *MODULE, *map(str, argv), "--out", str(two),
    ]  # fmt: skip
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=400, env=env, cwd=ROOT
        )
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"torchrun timed out:\n{error.stdout}\n{error.stderr}")
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    double = json.loads((two / "metrics.json").read_text())
    assert (double["processes"], double["accumulation_steps"]) == (2, 2), "not 2 processes"
    assert double["ranks_identical"] and len(double["rank_fingerprints"]) == 2
    assert double["split"] == single["split"]
    start = initial_lora(tiny_model, argv)
    moved = largest_difference(lora_weights(one), start)
    assert moved > 1e-3
    # the same update up to the order of floating-point sums (DDP averages across ranks)
    assert largest_difference(lora_weights(two), lora_weights(one)) < 1e-4 * moved


# --------------------------------------------------------------------------------------------
# End to end on the planted pipeline: the memorized fraction drops (LoRA and full UNet)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    from conftest import planted_sd_pipeline

    return planted_sd_pipeline(tmp_path_factory.mktemp("planted") / "pipe")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random tiny CLIP saved to a folder: the quality plumbing is measured with it (its
    values mean nothing)."""
    from conftest import write_tiny_clip

    return write_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


def binomial_drop(before: dict, after: dict) -> tuple[float, float]:
    """The drop of the memorized fraction and its standard error (two binomial proportions)."""
    p0, n0 = before["fraction"], before["total"]
    p1, n1 = after["fraction"], after["total"]
    return p0 - p1, math.sqrt(p0 * (1 - p0) / n0 + p1 * (1 - p1) / n1)


# 32 training images (25 copies with the shipped weights), 128 verification images (a before
# fraction p has a binomial standard error of at most 0.044), 30 steps of 16 rows. The paper's 35
# steps at lr 1e-5 move SD's 860M-parameter UNet; the tiny UNet's LoRA needs lr 1e-3 for a
# measurable change in 30 steps (81 -> 14 of 128 measured), the full tiny UNet 1e-4.
PLANTED_RUN = [
    *CHEAP, "--num-images", "32", "--verify-images", "128", "--steps", "30",
    "--batch-size", "16", "--micro-batch-size", "16", "--threads", "1",
]  # fmt: skip


def ground_truth_copies(planted, folder: Path, lora: Path | None, seeds: list[int]) -> int:
    """Copies of the planted image (by its known pixel distance, not the script's split) among
    images generated with the saved weights on ``seeds``."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder)
    if lora is not None:
        pipe.load_lora_weights(lora)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    images = pipe(
        [planted.prompt] * len(seeds), num_inference_steps=10, generator=generators,
        output_type="pt",
    ).images  # fmt: skip
    return int(planted.is_copy(images * 2 - 1).sum())


def check_drop(metrics: dict, which: str = "train") -> None:
    before, after = metrics["before"][which], metrics["after"][which]
    drop, se = binomial_drop(before, after)
    assert before["memorized"] > 0, before
    assert drop > 3 * se, f"memorized {before['memorized']} -> {after['memorized']} of 128"


def test_lora_end_to_end_removes_the_planted_image(planted, tiny_clip, tmp_path):
    out = tmp_path / "out"
    argv = ["--model", planted.folder, "--prompt", planted.prompt, "--out", out, *PLANTED_RUN,
            "--lr", "1e-3", "--clip-model", tiny_clip, "--quality-floor", "0"]  # fmt: skip
    metrics = run(*argv)

    # the 2-means split found exactly the planted copies among the 32 training images
    images, latents = sd.load_generated(out, 32)
    truth = planted.is_copy(sd.to_signed(images))
    split = json.loads((out / "split.json").read_text())
    assert split["rule"] == "2-means" and split["found"]
    assert torch.equal(torch.tensor(split["memorized"]), truth)
    assert 0 < metrics["split"]["memorized"] < 32 and latents.shape == (32, 4, 8, 8)

    check_drop(metrics)
    after = metrics["after"]["train"]
    for entry in (metrics["before"]["train"], after):
        assert 0 <= entry["clip_iqa"] <= 1 and math.isfinite(entry["clip_score"])
        assert math.isfinite(entry["noise_score"])
    assert metrics["success"] is (after["memorized"] == 0)  # quality measured: determined
    assert not metrics["verdict"].startswith("not determined")

    # the saved LoRA is the trained one: loaded into the original pipeline, the ground truth
    # (the planted image's pixel distance) counts as few copies on the verification seeds
    seeds = list(range(32, 32 + 128))
    base = ground_truth_copies(planted, planted.folder, None, seeds)
    unlearned = ground_truth_copies(planted, planted.folder, out / "lora", seeds)
    drop, se = binomial_drop(
        {"fraction": base / 128, "total": 128}, {"fraction": unlearned / 128, "total": 128}
    )
    assert drop > 3 * se, (base, unlearned)
    # the verify stage loads the saved LoRA itself and measures what the run measured last
    entry = run("verify", *argv)
    assert entry["train"]["memorized"] == after["memorized"]
    for name in (
        "metrics.png",
        "samples_before_train.png",
        "samples_after_train.png",
        "split_memorized.png",
        "split_not_memorized.png",
        "verify.json",
    ):
        assert (out / name).stat().st_size > 0, name  # fmt: skip


def test_full_unet_end_to_end_removes_the_planted_image(planted, tmp_path):
    from diffusers import UNet2DConditionModel

    out = tmp_path / "out"
    other = planted.other_prompts[0]  # measured as the "original" prompt, never memorized
    argv = ["--model", planted.folder, "--train-prompt", planted.prompt, "--prompt", other,
            "--out", out, *PLANTED_RUN, "--lr", "1e-4", "--full"]  # fmt: skip
    metrics = run(*argv)
    check_drop(metrics)
    entry = run("verify", *argv)  # loads out/unet into the pipeline
    assert entry["train"]["memorized"] == metrics["after"]["train"]["memorized"]
    assert entry["weights"] == str(out / "unet")
    assert metrics["after"]["original"]["prompt"] == other
    assert metrics["before"]["train"]["quality"].startswith("not measured")
    # without a quality measurement the paper's success is never claimed
    if metrics["after"]["train"]["memorized"] == 0:
        assert metrics["success"] is None and metrics["verdict"].startswith("not determined")
    else:
        assert metrics["success"] is False
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    original = UNet2DConditionModel.from_pretrained(planted.folder / "unet")
    changed = [
        not torch.equal(a, b) for a, b in zip(unet.parameters(), original.parameters(), strict=True)
    ]
    assert all(changed[:3]) and sum(changed) > len(changed) // 2


def test_prompt_list_runs_each_prompt_and_writes_one_table(planted, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": planted.prompt}, {"caption": planted.other_prompts[1], "index": 7}]
    prompts.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"
    result = run("--model", planted.folder, "--prompts", prompts, "--out", out, *CHEAP,
                 "--num-images", "16", "--verify-images", "4", "--steps", "2",
                 "--micro-batch-size", "16")  # fmt: skip
    assert [r["prompt"] for r in result] == [planted.prompt, planted.other_prompts[1]]
    assert result[0]["metrics"]["after"]["step"] == 2
    assert result[1]["status"].startswith("skipped: no memorization found")
    table = (out / "summary.md").read_text()
    assert table.count("\n") == 4 and "no memorization found" in table
    assert json.loads((out / "summary.json").read_text())[1]["metrics"] == {}


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_sdxl_and_sd3_pipelines_run_end_to_end(family, tmp_path):
    """The same command on a tiny SDXL (UNet with added time ids) and SD3 (transformer, no T5:
    its folder saves text_encoder_3 as null) pipeline: the LoRA is saved and loads back."""
    import conftest
    from diffusers import DiffusionPipeline

    folder = getattr(conftest, f"tiny_{family}_pipeline")(tmp_path / "pipe")
    out = tmp_path / "out"
    base = ["--model", folder, "--prompt", "a photo", "--out", out, "--num-images", "8",
            "--sample-steps", "4", "--no-progress", "--device", "cpu"]  # fmt: skip
    run("generate", *base)
    images, latents = sd.load_generated(out, 8)
    assert images.shape[1:] == (3, 16, 16) and latents.shape[0] == 8
    from siss.audit.generation import pixel_features

    features = pixel_features(sd.to_signed(images))
    threshold = (features - features[:1]).norm(dim=1)[1:].median().item() + 1e-6
    metrics = run(*base, "--steps", "2", "--verify-images", "2", "--batch-size", "4",
                  "--micro-batch-size", "2", "--reference-image", out / "images" / "00000.png",
                  "--threshold", threshold)  # fmt: skip
    assert metrics["after"]["step"] == 2
    absent = {"text_encoder_3": None, "tokenizer_3": None} if family == "sd3" else {}
    pipe = DiffusionPipeline.from_pretrained(folder, **absent)
    pipe.load_lora_weights(out / "lora")
    denoiser = pipe.unet if family == "sdxl" else pipe.transformer
    assert any("lora" in name for name, _ in denoiser.named_parameters())
