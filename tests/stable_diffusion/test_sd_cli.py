"""The command line of the Stable Diffusion job (``siss.stable_diffusion.cli``): ``--help`` of
``python -m siss.stable_diffusion``, the exit status, and every bad input the issue lists
stopping with an error naming the flag before the expensive work (on the random tiny pipeline,
CPU, no download). The installed ``siss-stable-diffusion --help``: tests/test_commands.py.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import tiny_conditional_unet, tiny_sd_pipeline

from siss._cli import FlagError
from siss.stable_diffusion import cli
from tests.stable_diffusion.sd_harness import CHEAP, MODULE, ROOT, expect_exit

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate")


def test_help_runs_as_a_script_and_names_every_stage_and_flag():
    done = subprocess.run(
        [sys.executable, *MODULE, "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert text.startswith("usage: python -m siss.stable_diffusion"), text[:200]
    for word in (
        "generate",
        "split",
        "unlearn",
        "verify",
        "--rank",
        "--full",
        "--reference_image",
        "--prompts",
        "--clip_model",
        "--resume_from_checkpoint",
        "latest",
        "--verify_every",
        "--gradient_checkpointing",
        "--compile",
        "--mixed_precision",
    ):
        assert word in text, word  # fmt: skip
    parser_flags = [a for a in text.split() if a.startswith("--")]
    assert len(set(parser_flags)) > 40


def test_main_exits_with_status_zero_once_done(tiny_sd_folder, tmp_path):
    """``main`` is the installed command's entry point (``sys.exit(main())``): it returns 0, not
    the metrics (a dict would exit with status 1)."""
    out = tmp_path / "out"
    argv = ["generate", "--pretrained_model_name_or_path", tiny_sd_folder, "--prompt", "a",
            "--output_dir", out,
            "--num_images", "2", *CHEAP]  # fmt: skip
    assert cli.main([str(a) for a in argv]) == 0
    assert sorted(p.name for p in (out / "images").iterdir()) == ["00000.png", "00001.png"]


def test_a_bad_flag_exits_with_status_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.main(
            [
                "--pretrained_model_name_or_path",
                str(tmp_path),
                "--output_dir",
                str(tmp_path / "out"),
            ]
        )
    assert stopped.value.code == 2
    assert "give --prompt or --prompts" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "content", "named"),
    [
        ("empty.txt", "# nothing\n\n", "no prompt in it"),
        ("array.jsonl", '["a photo"]\n', "line 1: not a JSON object"),
        ("latin1.txt", "caf\xe9\n".encode("latin-1"), "not UTF-8 text"),
        ("utf16.txt", "a photo\n".encode("utf-16"), "not UTF-8 text"),
    ],
)
def test_an_unreadable_prompt_list_exits_2_naming_the_flag(tiny_sd_folder, tmp_path, capsys,
                                                           name, content, named):  # fmt: skip
    """Each was a traceback with status 1 (a ``ValueError``, a bare ``UnicodeDecodeError``)."""
    path = tmp_path / name
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stopped:
        cli.main(["--pretrained_model_name_or_path", str(tiny_sd_folder), "--prompts",
                  str(path), "--output_dir", str(out)])  # fmt: skip
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert f"siss-stable-diffusion: error: --prompts {path}" in error and named in error, error
    assert not out.exists()


def test_missing_model_path_names_the_flag(tmp_path, capsys):
    out = tmp_path / "out"
    expect_exit(
        capsys,
        [
            "--pretrained_model_name_or_path",
            tmp_path / "no-such",
            "--prompt",
            "a",
            "--output_dir",
            out,
        ],
        "--pretrained_model_name_or_path",
    )
    assert not out.exists()


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--max_train_steps", "-5"], "--max_train_steps must be >= 1, got -5"),
        (["--learning_rate", "0"], "--learning_rate: must be in (0, inf], got 0.0"),
        (["--method", "naive", "--keep_target", "teacher"], "--keep_target: 'teacher' needs"),
        (["--balance_every", "0"], "--balance_every: must be >= 1, got 0"),
        (["--num_images", "1"], "--num_images: must be >= 2, got 1"),
        (["--lora_alpha", "0"], "--lora_alpha: must be > 0, got 0.0"),
        (["--guidance_scale", "nan"], "--guidance_scale: must be >= 0, got nan"),
        (["--quality_floor", "2"], "--quality_floor: must be in [0, 1], got 2.0"),
        (["--threads", "0"], "--threads: must be >= 1, got 0"),
        (["--stop_after", "-1"], "--stop_after: must be >= 1, got -1"),
        (["--train_prompt", " "], "--train_prompt is empty"),
        (["--timesteps", "5000"], "--timesteps 5000: outside the pipeline's training schedule"),
        (["--forget_timesteps", "0", "1000"], "--forget_timesteps 0 1000: outside the pipeline"),
        (["--output_dir", "/dev/null/out"], "--output_dir /dev/null/out: /dev/null is a file"),
        *(
            []
            if torch.cuda.is_available()
            else [
                (["--device", "cuda"], "--device cuda: CUDA is not available"),
                (["--dtype", "float16"], "--dtype float16 does not run on the CPU"),
            ]
        ),
    ],
)
def test_bad_recipe_flags_are_named_before_loading(tiny_sd_folder, tmp_path, capsys, flags, named):
    out = tmp_path / "out"
    expect_exit(
        capsys,
        [
            "--pretrained_model_name_or_path",
            tiny_sd_folder,
            "--prompt",
            "a",
            "--output_dir",
            out,
            *flags,
        ],
        named,
    )
    assert not out.exists()


def test_pipeline_without_text_encoder_is_refused_before_loading(tmp_path, capsys):
    from conftest import tiny_unet
    from diffusers import DDPMPipeline, DDPMScheduler

    folder = tmp_path / "ddpm"
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler()).save_pretrained(folder)
    out = tmp_path / "out"
    expect_exit(capsys, ["--pretrained_model_name_or_path", folder, "--prompt", "a",
                "--output_dir", out, *CHEAP],
                "--pretrained_model_name_or_path", "text encoder")  # fmt: skip
    assert not (out / "images").exists()


def test_reference_image_of_the_wrong_size_stops_before_generating(
    tiny_sd_folder, tmp_path, capsys
):
    from PIL import Image

    reference = tmp_path / "ref.png"
    Image.new("RGB", (20, 24), "red").save(reference)
    out = tmp_path / "out"
    argv = [
        "--pretrained_model_name_or_path",
        tiny_sd_folder,
        "--prompt",
        "a",
        "--output_dir",
        out,
        *CHEAP,
    ]
    expect_exit(
        capsys, [*argv, "--reference_image", reference], "--reference_image", "20x24", "16x16"
    )
    assert not (out / "images").exists()


def test_a_reference_image_that_is_no_image_exits_2_before_loading(tmp_path, capsys, monkeypatch):
    """It was a PIL traceback (status 1) once the pipeline had loaded and generated."""
    reference = tmp_path / "text.png"
    reference.write_text("not an image")
    monkeypatch.setattr(cli, "load_pipeline", lambda *a: pytest.fail("the pipeline was loaded"))
    out = tmp_path / "out"
    argv = ["--pretrained_model_name_or_path", str(tmp_path), "--prompt", "a", "--output_dir",
            str(out), "--reference_image", str(reference), *CHEAP]  # fmt: skip
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    with pytest.raises(SystemExit) as stopped:
        cli.main(argv)
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert f"error: --reference_image {reference}: not an image that PIL can read" in error, error
    assert not out.exists()


def test_lora_on_a_model_without_attention_is_refused(tmp_path, capsys):
    unet = tiny_conditional_unet(
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        mid_block_type=None,
    )
    folder = tiny_sd_pipeline(tmp_path / "pipe", unet=unet)
    out = tmp_path / "out"
    argv = ["--pretrained_model_name_or_path", folder, "--prompt", "a", "--output_dir", out, *CHEAP]
    expect_exit(capsys, argv, "--rank 4", "--lora_targets", "--full")
    assert not (out / "images").exists()
    with pytest.raises(SystemExit) as exited:  # the command: a flag's refusal is status 2
        cli.main([str(arg) for arg in argv])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert "siss-stable-diffusion: error: --rank 4" in error and "--lora_targets" in error
    expect_exit(capsys, [*argv, "--rank", "0"], "--rank")
    expect_exit(capsys, [*argv, "--full", "--rank", "8"], "--full", "--rank")


@pytest.mark.parametrize(
    ("raised", "status", "printed"),
    [
        # a flag refused once the pipeline is read: status 2, argparse's wording
        (FlagError("--resolution 30 30: multiples of 8"), 2, "siss-stable-diffusion: error: "),
        # a job that cannot go on, whatever its message begins with: its message, not status 2
        (SystemExit("--until nonmember needs at least 6 non-copies"), "--until nonmember", ""),
    ],
)
def test_only_a_flag_error_exits_with_status_2(monkeypatch, capsys, raised, status, printed):
    def run_command(argv):
        raise raised

    monkeypatch.setattr(cli, "run_command", run_command)
    with pytest.raises(SystemExit) as stopped:
        cli.main([])
    code = stopped.value.code
    assert code == status if isinstance(status, int) else code.startswith(status)
    assert capsys.readouterr().err.startswith(printed)


def test_batch_sizes_that_do_not_divide_are_refused(tiny_sd_folder, tmp_path, capsys):
    argv = [
        "--pretrained_model_name_or_path",
        tiny_sd_folder,
        "--prompt",
        "a",
        "--output_dir",
        tmp_path,
        *CHEAP,
    ]
    expect_exit(capsys, [*argv, "--batch-size", "6", "--micro-batch-size", "4"], "--batch-size")


@pytest.mark.parametrize(
    ("environ", "refused"),
    [
        ({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}, True),
        ({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "x", "WORLD_SIZE": "2", "RANK": "0"}, False),
        ({"ACCELERATE_USE_CPU": "False"}, False),  # accelerate launch, one process asked for
        ({"MASTER_ADDR": "127.0.0.1", "WORLD_SIZE": "2"}, False),  # torchrun
        ({}, False),
    ],
)
def test_a_launch_that_started_fewer_processes_than_asked_is_refused(environ, refused, capsys):
    parser = cli.build_parser()
    if not refused:
        cli.check_launcher(parser, environ)
        return
    with pytest.raises(SystemExit) as exited:
        cli.check_launcher(parser, environ)
    assert exited.value.code == 2
    assert "torchrun --nproc_per_node N" in capsys.readouterr().err


def test_accelerate_launch_of_two_cpu_processes_stops_before_loading(tmp_path):
    """The issue's case: ``accelerate launch --num_processes 2`` on the CPU ran one process and
    reported ``processes: 1``. Now it stops with exit 2 and writes nothing."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes",
               "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "siss.stable_diffusion", "generate", "--pretrained_model_name_or_path",
               str(tmp_path / "absent"),
               "--prompt", "a", "--output_dir", str(out)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode != 0
    assert "started one" in done.stderr and "torchrun --nproc_per_node N" in done.stderr
    assert not out.exists()
