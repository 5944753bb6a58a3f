"""python -m siss.audit on tiny models saved with save_pretrained: files written, --help."""

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from siss.audit.__main__ import build_parser, load_images, main, parse_options

pytestmark = pytest.mark.usefixtures("one_thread")

CHEAP = [
    "--checks",
    "generation",
    "reconstruction",
    "membership",
    "--samples",
    "4",
    "--steps",
    "3",
    "--option",
    "reconstruction.noise_draws=1",
    "--option",
    "membership.noise_draws=1",
    "--option",
    "membership.bootstrap=100",
    "--no_progress",
    "--device",
    "cpu",
]


@pytest.fixture
def folders(tmp_path, audit_models):
    scheduler = DDPMScheduler(num_train_timesteps=100)
    first = tmp_path / "first"
    audit_models.tiny_unet().save_pretrained(first)
    scheduler.save_pretrained(first)
    # a pipeline-style folder: unet/ and scheduler/ subfolders
    second = tmp_path / "second"
    model = audit_models.tiny_unet()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    model.save_pretrained(second / "unet")
    scheduler.save_pretrained(second / "scheduler")
    g = torch.Generator().manual_seed(0)
    torch.save(torch.rand(1, 1, 8, 8, generator=g) * 2 - 1, tmp_path / "forget.pt")
    from safetensors.torch import save_file

    save_file({"images": torch.rand(5, 1, 8, 8, generator=g) * 2 - 1}, tmp_path / "ref.safetensors")
    return tmp_path, first, second


def test_command_writes_json_markdown_figure_and_comparison(folders, capsys):
    tmp, first, second = folders
    out = tmp / "out"
    code = main(
        [
            "--model",
            str(first),
            "--model",
            str(second),
            "--forget",
            str(tmp / "forget.pt"),
            "--reference",
            str(tmp / "ref.safetensors"),
            "--output_dir",
            str(out),
            *CHEAP,
        ]
    )
    assert code == 0
    for name in ("first", "second"):
        data = json.loads((out / name / "audit.json").read_text())
        assert {r["check"] for r in data["results"]} == {
            "generation",
            "reconstruction",
            "membership",
        }
        assert data["config"]["reference_n"] == 5 and data["config"]["num_samples"] == 4
        assert data["config"]["command"]["forget"] == [str(tmp / "forget.pt")]
        assert (out / name / "audit.md").read_text().startswith("Audit of")
        assert (out / name / "audit.png").read_bytes()[:4] == b"\x89PNG"
        for result in data["results"]:  # the reference values behind the figure's histograms
            if result["check"] in ("reconstruction", "membership") and result["image"] == 0:
                assert len(result["details"]["reference_values"]) == 5
        mask = os.umask(0)
        os.umask(mask)
        for file in ("audit.json", "audit.png"):  # the umask's mode, not mkstemp's 0600
            assert (out / name / file).stat().st_mode & 0o777 == 0o666 & ~mask
    compare = (out / "compare.md").read_text()
    assert str(first) in compare and "| change |" in compare
    assert not list(out.rglob("*.tmp")) and not list(out.rglob(".*"))
    assert "| generation | 0 | rate |" in capsys.readouterr().out


def test_reference_model_is_audited_and_compared_by_role(folders, capsys):
    """--reference-model (e.g. the retrained model): audited like the others; compare.md puts
    the first --model and each other against it, columns named by --roles."""
    tmp, first, second = folders
    out = tmp / "out"
    images = ["--forget", str(tmp / "forget.pt"), "--reference", str(tmp / "ref.safetensors")]
    code = main(
        ["--model", str(first), "--model", str(second), "--reference_model", str(first),
         "--roles", "pretrained", "unlearned", "retrained", *images, "--output_dir", str(out),
         *CHEAP, "--no_figure"]
    )  # fmt: skip
    assert code == 0
    assert {p.name for p in out.iterdir() if p.is_dir()} == {"first", "second", "first-2"}
    compare = (out / "compare.md").read_text()
    assert compare.startswith("pretrained `")
    assert "| unlearned within retrained's interval | closer to retrained |" in compare
    assert "| check | image | pretrained | unlearned | retrained | unlearned like retrained |" in (
        compare
    )
    assert compare.strip() in capsys.readouterr().out
    # one --model: that model against the reference alone
    code = main(
        ["--model", str(second), "--reference_model", str(first), *images, "--output_dir",
         str(tmp / "alone"), *CHEAP, "--no_figure"]
    )  # fmt: skip
    alone = (tmp / "alone" / "compare.md").read_text()
    assert code == 0 and "| check | image | statistic | second | first |" in alone
    with pytest.raises(SystemExit):
        main(["--model", str(first), "--roles", "a", "b", *images, "--output_dir", str(out),
              *CHEAP])  # fmt: skip
    assert "--roles" in capsys.readouterr().err


def test_help_explains_every_flag():
    result = subprocess.run(
        [sys.executable, "-m", "siss.audit", "--help"], capture_output=True, text=True, check=True
    )
    text = result.stdout
    for action in build_parser()._actions:
        if action.help == argparse.SUPPRESS:  # an old spelling, hidden
            continue
        for flag in action.option_strings:
            assert flag in text
        if action.option_strings and action.dest != "help":
            assert action.help, action.dest
    for flag in ("--model", "--forget", "--reference", "--members", "--prompt", "--output_dir"):
        assert flag in text


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--samples", "0"], "--samples"),
        (["--option", "likelihood"], "CHECK.KEY=VALUE"),
        (["--option", "likelihood.repeets=2"], "repeets"),
        (["--forget", "missing.pt"], "missing.pt"),
        (["--checks", "generaton"], "generaton"),
    ],
)
def test_errors_name_the_flag(folders, capsys, extra, match):
    tmp, first, _ = folders
    args = ["--model", str(first), "--forget", str(tmp / "forget.pt")]
    args += ["--reference", str(tmp / "ref.safetensors"), "--output_dir", str(tmp / "o"), *extra]
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    assert match in capsys.readouterr().err
    assert not (tmp / "o").exists()


def test_model_without_scheduler_needs_the_scheduler_flag(folders, capsys, audit_models):
    tmp, first, _ = folders
    bare = tmp / "bare" / "model"
    audit_models.tiny_unet().save_pretrained(bare)
    args = ["--model", str(bare), "--forget", str(tmp / "forget.pt")]
    args += ["--reference", str(tmp / "ref.safetensors"), "--output_dir", str(tmp / "o")]
    with pytest.raises(SystemExit):
        main(args)
    assert "--scheduler" in capsys.readouterr().err
    assert main([*args, "--scheduler", str(first), *CHEAP, "--no_figure"]) == 0
    assert (tmp / "o" / "bare-model" / "audit.json").exists()


def test_png_files_are_mapped_to_the_data_range(tmp_path):
    from PIL import Image

    array = np.array([[0, 255], [51, 102]], dtype=np.uint8)
    Image.fromarray(array).save(tmp_path / "a.png")
    images = load_images([str(tmp_path)], "--forget", 1, (-1.0, 1.0))
    assert images.shape == (1, 1, 2, 2)
    expected = torch.tensor([[-1.0, 1.0], [-0.6, -0.2]])
    torch.testing.assert_close(images[0, 0], expected)
    rgb = load_images([str(tmp_path / "a.png")], "--forget", 3, (0.0, 1.0))
    assert rgb.shape == (1, 3, 2, 2) and float(rgb.max()) == 1.0


def test_options_parse_json_values():
    assert parse_options(["likelihood.repeats=8", "reconstruction_sweep.ts=[100,500]"]) == {
        "likelihood": {"repeats": 8},
        "reconstruction_sweep": {"ts": (100, 500)},
    }


def test_figure_draws_reference_histograms_with_the_forget_value(folders):
    """One histogram per check from ``details["reference_values"]``, the forget image's value a
    vertical line; a report without reference values (an older one) says so instead."""
    from siss.audit import AuditReport
    from siss.audit.figure import audit_figure
    from siss.audit.report import CheckResult, Estimate

    stats = {
        "error": Estimate(1.0, 0.9, 1.1, 4, "lower"),
        "percentile": Estimate.missing("x", "lower"),
    }
    details = {"reference_values": [1.2, 1.3, float("nan"), 1.5]}
    report = AuditReport(
        "m",
        [
            CheckResult("membership", 0, stats, None, "no verdict", details),
            CheckResult(
                "reconstruction",
                0,
                {"similarity": Estimate(0.5, 0.4, 0.6, 2, "higher")},
                None,
                "r",
                {},
            ),
        ],
        {"data_range": [-1.0, 1.0]},
    )
    fig = audit_figure(report)
    titles = {ax.get_title(): ax for ax in fig.axes}
    membership = titles["membership: 4 reference values (1 non-finite, not drawn)"]
    assert sum(p.get_height() for p in membership.patches if hasattr(p, "get_height")) >= 3
    assert any(list(line.get_xdata()) == [1.0, 1.0] for line in membership.get_lines())
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert "no reference values stored" in texts and "no likelihood check in this audit" in texts


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--device", "cuda"], "--device cuda: CUDA is not available"),
        (["--device", "tpu"], "--device tpu: not a torch device"),
        (["--samples", "0"], "--samples: must be >= 1, got 0"),
        (["--forget", "WRONG"], "--forget: images of 16x16; --model"),
        (
            ["--reference", "WRONG"],
            "--forget holds images of 1x8x8 (channels x height x width) "
            "and --reference of 1x16x16: every set must have one shape",
        ),
        # --forget the odd one out: named first, not --reference
        (
            ["--forget", "BIG"],
            "--forget holds images of 1x16x16 (channels x height x width) and --reference of 1x8x8",
        ),
        (["--output_dir", "/dev/null/audit"], "--output_dir /dev/null/audit: /dev/null is a file"),
        (["--scheduler", "/nonexistent/scheduler"], "--scheduler: no folder /nonexistent"),
        (["--model", "FIRST", "--roles", "x", "x"], "--roles: each model needs its own name"),
        (["--option", "generation.threshold=-1"], "--option (--model "),
    ],
    ids=[
        "no-cuda",
        "bad-device",
        "samples",
        "forget-size",
        "reference-size",
        "forget-odd-size",
        "out",
        "scheduler",
        "roles",
        "option-value",
    ],
)
def test_bad_input_is_named_with_exit_2_and_nothing_written(folders, capsys, flags, named):
    """Each bad value is refused naming its flag before an audit runs: exit code 2, and the
    output folder is not created."""
    if flags[0] == "--device" and flags[1] == "cuda" and torch.cuda.is_available():
        flags = ["--device", "cuda:999"]
        named = "--device cuda:999: this machine has"
    tmp, first, _ = folders
    torch.save(torch.rand(1, 1, 16, 16), tmp / "big.pt")
    images = {"--forget": str(tmp / "forget.pt"), "--reference": str(tmp / "ref.safetensors")}
    if flags == ["--forget", "WRONG"]:  # both sets 16x16 for a model that generates 8x8
        flags = ["--forget", str(tmp / "big.pt"), "--reference", str(tmp / "big.pt")]
    if flags == ["--reference", "WRONG"]:
        flags = ["--reference", str(tmp / "big.pt")]
    if flags == ["--forget", "BIG"]:
        flags = ["--forget", str(tmp / "big.pt")]
    flags = [str(first) if flag == "FIRST" else flag for flag in flags]  # a second --model
    out = tmp / "out"
    argv = ["--model", str(first), "--output_dir", str(out)]
    argv += [x for pair in images.items() for x in pair]
    argv += [*CHEAP, *flags]  # the last value of a flag wins
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err
    assert not out.exists()


def test_help_states_real_defaults_only(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text
    assert "(default: 1000)" in text  # --samples


def test_the_old_spellings_still_work_with_a_warning(folders, capsys):
    """0.2.0.dev0's ``--out``, ``--reference-model``, ``--batch-size``, ``--data-range``,
    ``--no-progress`` and ``--no-figure``: accepted until ``REMOVED_IN``, each named with its
    new spelling on stderr."""
    tmp, first, second = folders
    out = tmp / "old"
    argv = ["--model", str(first), "--reference-model", str(second), "--forget",
            str(tmp / "forget.pt"), "--reference", str(tmp / "ref.safetensors"), "--out", str(out),
            *CHEAP, "--batch-size", "16", "--data-range", "-1", "1", "--no-progress",
            "--no-figure"]  # fmt: skip
    assert main(argv) == 0
    error = capsys.readouterr().err
    renamed = [("--out", "--output_dir"), ("--reference-model", "--reference_model"),
               ("--batch-size", "--batch_size"), ("--data-range", "--data_range"),
               ("--no-progress", "--no_progress"), ("--no-figure", "--no_figure")]  # fmt: skip
    for old, new in renamed:
        assert f"{old} is the old spelling of {new}" in error
    assert (out / "compare.md").is_file() and not (out / "first" / "audit.png").exists()
