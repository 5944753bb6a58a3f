"""``benchmarks/nonmember_levels.py`` runs on a tiny model folder and prints one percentile per
noise level, each in [0, 1]; the same model twice gives the same row (fixed draws)."""

import pytest
from conftest import tiny_unet
from diffusers import DDPMScheduler

from benchmarks import nonmember_levels


def test_one_percentile_per_level_the_same_on_a_second_run(tmp_path, capsys):
    folder = tmp_path / "model"
    tiny_unet(sample_size=16).save_pretrained(folder)
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(folder)
    argv = [str(folder), str(folder), "--scheduler", str(folder), "--draws", "2",
            "--references", "8", "--ranks", "50", "500"]  # fmt: skip
    table = nonmember_levels.main(argv)
    (row,) = table.values()
    assert len(row) == 2 and all(0.0 <= value <= 1.0 for value in row)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "model | rank 50 | rank 500"
    assert lines[1] == lines[2]  # the same folder twice: the same draws, the same row


def test_repeats_print_a_mean_and_spread_per_level(tmp_path, capsys):
    """``--repeats``: the first repeat is the table's row (draw seed 0, every reference); each
    level's mean and standard deviation over the repeats are printed after the table."""
    folder = tmp_path / "model"
    tiny_unet(sample_size=16).save_pretrained(folder)
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(folder)
    argv = [str(folder), "--scheduler", str(folder), "--draws", "2", "--references", "16",
            "--ranks", "50", "500"]  # fmt: skip
    single = nonmember_levels.main(argv)
    repeated = nonmember_levels.main([*argv, "--repeats", "4"])
    assert single == repeated
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2] == "mean ± standard deviation over 4 repeats (module docstring)"
    cells = lines[-1].split(" | ")[1:]
    assert len(cells) == 2 and all("±" in cell for cell in cells)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["{missing}"], "{missing}: no config.json there"),
        (["{model}", "--scheduler", "{missing}"], "--scheduler {missing}: no scheduler_config"),
        (["{model}", "--draws", "0"], "--draws: must be"),
        (["{model}", "--ranks", "1000"], "--ranks: must be"),
    ],
)
def test_bad_flags_are_named_before_a_model_loads(tmp_path, capsys, flags, message):
    folder = tmp_path / "model"
    tiny_unet(sample_size=16).save_pretrained(folder)
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(folder)
    names = {"model": folder, "missing": tmp_path / "missing"}
    argv = [flag.format(**names) for flag in flags]
    if "--scheduler" not in argv:
        argv += ["--scheduler", str(folder)]
    with pytest.raises(SystemExit) as exit_:
        nonmember_levels.main(argv)
    assert exit_.value.code == 2 and message.format(**names) in capsys.readouterr().err
