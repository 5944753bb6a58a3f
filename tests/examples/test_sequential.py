"""examples/sequential.py on a tiny UNet: outputs, resume, refused resume, the stop rule.

The checkpoint is a tiny ``UNet2DModel`` built from config, saved and loaded by path. Few steps
and samples: this checks the queue's plumbing, not the science.
"""

import json

import pytest
import torch
from conftest import tiny_unet
from diffusers import DDPMScheduler
from safetensors.torch import load_file

from examples import sequential
from siss._digits import evaluate
from siss._digits.evaluate import Evaluator

pytestmark = pytest.mark.usefixtures("one_thread")
WEIGHTS = "diffusion_pytorch_model.safetensors"
RESUME = ["--resume_from_checkpoint", "latest"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-ddpm")
    tiny_unet(sample_size=16).save_pretrained(folder, safe_serialization=True)
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(folder)
    return folder


def argv(checkpoint, out, *extra):
    return [
        "--pretrained_model_name_or_path", str(checkpoint), "--output_dir", str(out),
        "--shapes", "3", "--max_train_steps", "2", "--train_batch_size", "8",
        "--eval_samples", "16", "--eval_steps", "2", "--nll_probes", "2", "--nll_tolerance", "1e-2",
        "--band_seeds", "2", "--band_level", "0.9999", "--no_progress", *extra,
    ]  # fmt: skip


def untimed(records):
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if not k.endswith("wall_s")}
        return value

    return [strip(record) for record in records]


def test_queue_runs_every_request_and_resumes_to_the_same_end(checkpoint, tmp_path):
    whole = sequential.run(sequential.parse_args(argv(checkpoint, tmp_path / "whole")))
    queue = whole["queue"]
    assert queue.done == ["tshirt", "trousers", "bag"] and queue.stopped is None
    for record in queue.records:  # every shape measured after every request
        assert set(record["evaluation"]["shapes"]) == {"tshirt", "trousers", "bag"}
        for shape in record["evaluation"]["shapes"].values():
            assert shape["samples"] == 16 and isinstance(shape["nll_bpd"], float)
    table = (tmp_path / "whole" / "table.md").read_text()
    assert table == whole["table"] and "| 3: bag |" in table and "Quality band" in table
    assert (tmp_path / "whole" / "sequential.png").stat().st_size > 0
    saved = json.loads((tmp_path / "whole" / "queue.json").read_text())
    assert [r["request"] for r in saved["records"]] == queue.done

    parts = tmp_path / "parts"
    first = sequential.run(
        sequential.parse_args(argv(checkpoint, parts, "--stop_after_requests", "1"))
    )
    assert first["queue"].pending == ["trousers", "bag"]
    resumed = sequential.run(sequential.parse_args(argv(checkpoint, parts, *RESUME)))
    assert untimed(resumed["queue"].records) == untimed(queue.records)
    one = load_file(str(tmp_path / "whole" / "requests" / "03-bag" / WEIGHTS))
    two = load_file(str(parts / "requests" / "03-bag" / WEIGHTS))
    assert all(torch.equal(one[k], two[k]) for k in one)
    before = load_file(str(checkpoint / WEIGHTS))
    assert any(not torch.equal(one[k], before[k]) for k in before)

    with pytest.raises(ValueError, match=r"--lam \(0.5 there, 1.0 now\)"):
        sequential.run(sequential.parse_args(argv(checkpoint, parts, *RESUME, "--lam", "1")))
    # a queue begun by the unlearn.py that drew keep rows with replacement is not continued
    saved = json.loads((parts / "queue.json").read_text())
    assert saved["config"]["draws"] == sequential.DRAWS
    del saved["config"]["draws"]
    (parts / "queue.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="draws"):
        sequential.run(sequential.parse_args(argv(checkpoint, parts, *RESUME)))


def test_the_queue_stops_when_quality_leaves_its_band(checkpoint, tmp_path, monkeypatch):
    """A model whose FID-style score leaves the band after the first request stops the queue
    there, naming the requests left; the record of that request is kept."""
    shapes = Evaluator.shapes

    def worse_after_training(self, unet, scheduler, data, count, noise_seed=None, *rest):
        row = shapes(self, unet, scheduler, data, count, noise_seed, *rest)
        if noise_seed is None:  # after a request, not the band's evaluations
            row["fid"] += 1e9
        return row

    monkeypatch.setattr(Evaluator, "shapes", worse_after_training)
    result = sequential.run(sequential.parse_args(argv(checkpoint, tmp_path)))
    queue = result["queue"]
    assert queue.done == ["tshirt"] and queue.pending == ["trousers", "bag"]
    assert "quality left its band after request 1 (tshirt)" in queue.stopped
    assert queue.stopped.endswith("Requests not processed: trousers, bag")
    assert "Stopped:" in result["table"]
    again = sequential.run(sequential.parse_args(argv(checkpoint, tmp_path, *RESUME)))
    assert again["queue"].done == ["tshirt"]  # a stopped queue stays stopped


def test_flags_are_checked_before_any_work(checkpoint, tmp_path, capsys):
    for extra, flag in (
        (["--shapes", "6"], "--shapes"),
        (["--band_seeds", "1"], "--band_seeds"),
        (["--band_level", "1"], "--band_level"),
        (["--max_train_steps", "0"], "--max_train_steps"),
    ):
        with pytest.raises(SystemExit):
            sequential.parse_args(argv(checkpoint, tmp_path, *extra))
        assert flag in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sequential.parse_args(argv(tmp_path / "missing", tmp_path))
    assert "--outlier_shapes 5" in capsys.readouterr().err


def test_eval_precision_reaches_every_sampling_and_the_saved_settings(
    checkpoint, tmp_path, monkeypatch
):
    """The band's extra draws and the queue's evaluations sample in the same precision."""
    used = []

    def recording(real):
        def sample(*args, **kwargs):
            used.append(kwargs["precision"])
            return real(*args, **kwargs)

        return sample

    monkeypatch.setattr(evaluate, "sample_images", recording(evaluate.sample_images))
    args = sequential.parse_args(argv(checkpoint, tmp_path / "q", "--eval_precision", "bf16"))
    queue = sequential.run(args)["queue"]
    assert len(used) > 2 and set(used) == {"bf16"}  # band draws + one per evaluation
    assert queue.config["--eval_precision"] == "bf16"
