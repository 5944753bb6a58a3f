"""The digits examples on a rectified-flow model (issue 11, part 4): pretrain.py --process flow,
unlearn.py and study.py on a FlowMatchEulerDiscreteScheduler checkpoint.

Known answers where there are any: on a one-image data set the exact velocity field is known in
closed form, ``v(x_s, s) = (x_s - x*) / s``, so pretraining's flow targets, the unlearning
losses' and the Euler sampler must all agree with it (a flipped sign or a timestep scale other
than ``s * T`` fails them). The rest is plumbing on tiny UNets (few steps, few samples).
"""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_unet
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DModel

from examples import pretrain, study, unlearn
from siss._digits import models

pytestmark = pytest.mark.usefixtures("one_thread")

T = 1000


class Oracle(torch.nn.Module):
    """The exact rectified-flow velocity when the data is the single image ``target``:
    ``x_s = (1 - s) x* + s eps`` gives ``eps - x* = (x_s - x*) / s``, with ``s = timesteps / T``.
    Called like a ``UNet2DModel`` (``.sample`` on the output)."""

    def __init__(self, target: torch.Tensor):
        super().__init__()
        self.target = target
        self.config = type("Config", (), {"in_channels": 1, "sample_size": target.shape[-1]})

    def forward(self, x, timesteps):
        s = (torch.as_tensor(timesteps, dtype=x.dtype) / T).reshape(-1, 1, 1, 1)
        return type("Output", (), {"sample": (x - self.target) / s})


@pytest.fixture
def target():
    return torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_pretraining_targets_are_the_exact_velocity_and_match_the_unlearning_loss(target):
    from siss.adapters import loss_from_scheduler, schedule_from_scheduler

    scheduler = models.build_flow_scheduler()
    generator = torch.Generator().manual_seed(1)
    x0 = target.expand(256, -1, -1, -1)
    index = torch.randint(0, T, (256,), generator=generator)
    eps = torch.randn(x0.shape, generator=generator)
    xt, timesteps, velocity = models.flow_training_batch(
        schedule_from_scheduler(scheduler), x0, index, eps
    )
    oracle = Oracle(target)
    assert F.mse_loss(oracle(xt, timesteps).sample, velocity) < 1e-8
    assert F.mse_loss(-oracle(xt, timesteps).sample, velocity) > 1.0  # the sign is tested
    # the unlearning loss draws its own pairs: the same oracle fits its targets too
    loss_fn = loss_from_scheduler("naive", scheduler)
    draw = loss_fn.sample(x0, x0, generator=generator)
    terms = loss_fn.terms(oracle(draw.noisy, draw.timesteps).sample, draw)
    assert float(terms.keep) < 1e-8


def test_the_euler_sampler_lands_on_the_data_under_the_exact_velocity(target):
    samples = models.sample_images(
        Oracle(target),
        models.build_flow_scheduler().config,
        4,
        sampler="euler",
        num_inference_steps=7,
        generator=torch.Generator().manual_seed(0),
        progress=False,
    )
    assert torch.allclose(samples, target.expand(4, -1, -1, -1), atol=1e-4)


def test_a_sampler_of_the_other_process_is_refused():
    with pytest.raises(ValueError, match="does not apply"):
        models.inference_scheduler(models.build_flow_scheduler().config, "ddim")
    with pytest.raises(ValueError, match="does not apply"):
        models.inference_scheduler(models.build_scheduler().config, "euler")


@pytest.fixture(scope="module")
def flow_pair(tmp_path_factory):
    """Tiny flow ``pretrained`` and ``retrain`` checkpoints (random weights, saved, loaded back)."""
    folder = tmp_path_factory.mktemp("flow-assets")
    for seed, name in enumerate(("flow-pretrained", "flow-retrain")):
        tiny_unet(seed, sample_size=16).save_pretrained(folder / name, safe_serialization=True)
        FlowMatchEulerDiscreteScheduler(num_train_timesteps=T).save_pretrained(folder / name)
    return folder / "flow-pretrained", folder / "flow-retrain"


def argv(checkpoint, out, *extra):
    return [
        "--pretrained_model_name_or_path", str(checkpoint), "--output_dir", str(out),
        "--max_train_steps", "2", "--train_batch_size", "8", "--eval_every", "1",
        "--eval_samples", "8", "--track_samples", "4", "--eval_steps", "2", "--nll_probes", "2",
        "--nll_tolerance", "1e-2", "--checkpointing_steps", "1", "--no_progress", *extra,
    ]  # fmt: skip


def test_pretrain_process_flow_saves_a_flow_checkpoint_that_evaluates(tmp_path, capsys):
    out = tmp_path / "flow"
    pretrain.main([
        "--process", "flow", "--max_train_steps", "2", "--train_batch_size", "4",
        "--lr_warmup_steps", "1", "--eval_samples", "4", "--eval_steps", "2",
        "--output_dir", str(out), "--no_progress",
    ])  # fmt: skip
    config = json.loads((out / "scheduler_config.json").read_text())
    assert config["_class_name"] == "FlowMatchEulerDiscreteScheduler" and config["shift"] == 1.0
    info = json.loads((out / "training_info.json").read_text())
    assert info["process"] == "flow"
    assert info["evaluations"][0]["sampler"] == "euler" and info["evaluations"][0]["samples"] == 4
    assert "outlier rate" in capsys.readouterr().out
    # --eval_only reads the process from the checkpoint, not from --process
    args = pretrain.parse_args(["--eval_only", "--output_dir", str(out)])
    assert args.sampler == "euler" and args.eval_steps == pretrain.DEFAULT_EVAL_STEPS["flow"]
    assert pretrain.parse_args(["--process", "flow"]).output_dir.name == "flow-pretrained"
    retrain = pretrain.parse_args(["--process", "flow", "--exclude_outlier"])
    assert retrain.output_dir.name == "flow-retrain"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--sampler", "ddpm"], "--sampler ddpm does not apply to a rectified-flow"),
        (["--flow_shift", "0"], "--flow_shift"),
    ],
)
def test_pretrain_bad_flow_flags_fail_at_parse_time(capsys, flags, message):
    with pytest.raises(SystemExit):
        pretrain.parse_args(["--process", "flow", *flags])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "method",
    [
        ["--method", "siss", "--lam", "0.5"],
        ["--method", "siss-nois"],
        ["--method", "naive"],
        ["--method", "neggrad"],
    ],
    ids=["siss", "nois", "naive", "neggrad"],
)
def test_every_method_unlearns_a_flow_checkpoint(flow_pair, tmp_path, method):
    pretrained, _ = flow_pair
    args = unlearn.parse_args(argv(pretrained, tmp_path, *method))
    assert (args.process, args.eval_sampler) == ("flow", "euler")
    result = unlearn.run(args)
    assert result["process"] == "flow"
    assert [row["step"] for row in result["history"]] == [0, 1, 2]
    for key in ("outlier_rate", "outlier_nll_bpd", "outlier_nll_bpd_se", "inception_score", "fid"):
        assert isinstance(result["after"][key], float), key
    assert result["after"]["not_measured"] == {}
    saved = UNet2DModel.from_pretrained(tmp_path / "model")
    before = UNet2DModel.from_pretrained(pretrained)
    assert any(
        not torch.equal(a, b)
        for a, b in zip(saved.state_dict().values(), before.state_dict().values(), strict=True)
    )


def test_erasediff_is_refused_on_flow_with_the_reason(flow_pair, tmp_path, capsys):
    with pytest.raises(SystemExit):
        unlearn.parse_args(argv(flow_pair[0], tmp_path / "out", "--method", "erasediff"))
    err = capsys.readouterr().err
    assert "--method erasediff" in err and "predicted noise" in err
    assert not (tmp_path / "out").exists()


def test_the_flow_nll_is_the_flow_ode_bits_per_dim(flow_pair):
    """unlearn.py's NLL of a flow checkpoint is siss.audit's flow_bits_per_dim, not the VP one."""
    from siss.audit.likelihood import flow_bits_per_dim

    pretrained, _ = flow_pair
    unet = UNet2DModel.from_pretrained(pretrained)
    images = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    scheduler = models.load_scheduler(pretrained)
    got = models.outlier_nll(
        unet, scheduler, images, tolerance=1e-2, generator=torch.Generator().manual_seed(4)
    )
    expected = flow_bits_per_dim(
        lambda x, t: unet(x, t).sample,
        images,
        rtol=1e-2,
        atol=1e-2,
        generator=torch.Generator().manual_seed(4),
    )
    assert torch.equal(got, expected)


def test_main_prints_the_process(flow_pair, tmp_path, capsys):
    pretrained, _ = flow_pair
    unlearn.main(argv(pretrained, tmp_path, "--method", "naive"))
    printed = capsys.readouterr().out
    assert "rectified flow" in printed and "euler-2" in printed


@pytest.mark.parametrize(
    "checkpoint, sampler",
    [("flow", "ddpm"), ("flow", "ddim"), ("flow", "dpm"), ("ddpm", "euler")],
)
def test_an_eval_sampler_of_the_other_process_is_refused_by_name(
    flow_pair, tmp_path, capsys, checkpoint, sampler
):
    if checkpoint == "flow":
        folder = flow_pair[0]
    else:
        folder = tmp_path / "ddpm"
        tiny_unet(sample_size=16).save_pretrained(folder, safe_serialization=True)
        DDPMScheduler(num_train_timesteps=T).save_pretrained(folder)
    with pytest.raises(SystemExit) as exit_info:
        unlearn.parse_args(argv(folder, tmp_path / "out", "--eval_sampler", sampler))
    assert exit_info.value.code == 2
    assert f"--eval_sampler {sampler} does not apply" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_without_a_known_scheduler_is_refused(tmp_path, capsys):
    folder = tmp_path / "euler"
    folder.mkdir()
    (folder / "scheduler_config.json").write_text('{"_class_name": "EulerDiscreteScheduler"}')
    with pytest.raises(SystemExit):
        unlearn.parse_args(["--pretrained_model_name_or_path", str(folder)])
    assert "--pretrained_model_name_or_path" in capsys.readouterr().err


@pytest.fixture
def flow_study(flow_pair, tmp_path, monkeypatch):
    monkeypatch.setitem(study.METHODS, "naive", ({"method": "naive"}, 2))
    real = study.unlearn_job
    cheap = {"nll_probes": 2, "nll_tolerance": 1e-2, "train_batch_size": 8}
    cheap["checkpointing_steps"] = 2
    monkeypatch.setattr(
        study, "unlearn_job", lambda config, **settings: real(config, **{**cheap, **settings})
    )
    monkeypatch.chdir(tmp_path)  # the default output folder is relative
    pretrained, retrain = flow_pair
    return [
        "--pretrained_model_name_or_path", str(pretrained), "--retrain", str(retrain),
        "--seeds", "0", "--methods", "naive", "--eval_samples", "8", "--eval_steps", "2",
        "--eval_every", "1", "--track_samples", "4", "--no_progress", "--final_samples", "0",
    ]  # fmt: skip


def test_the_study_runs_on_the_flow_pair_into_its_own_folder(flow_study, tmp_path, capsys):
    study.main(flow_study)
    out = tmp_path / "outputs" / "study-flow-pretrained"
    table = (out / "table.md").read_text()
    assert table.startswith("Process: rectified flow")
    assert "| method (flow) |" in table and "| Naive deletion | 2 |" in table
    results = json.loads((out / "results.json").read_text())
    assert results["process"] == "flow"
    assert [row["label"] for row in results["rows"]] == ["pretrained", "retrain", "naive"]
    run = json.loads((out / "naive-seed0" / "metrics.json").read_text())
    assert run["process"] == "flow" and run["config"]["eval_sampler"] == "euler"
    assert run["config"]["pretrained_model_name_or_path"] == flow_study[1]
    # the retrain row is the retrain checkpoint, evaluated, not the pretrained one
    retrain = json.loads((out / "retrain-seed0" / "metrics.json").read_text())
    pretrained = json.loads((out / "pretrained-seed0" / "metrics.json").read_text())
    assert retrain["after"]["outlier_nll_bpd"] != pretrained["after"]["outlier_nll_bpd"]
    assert table in capsys.readouterr().out


def test_the_default_methods_of_a_flow_study_are_those_that_apply(flow_study):
    args = study.parse_args([a for a in flow_study if a not in ("--methods", "naive")])
    assert args.methods == [m for m in study.METHODS if m != "erasediff"]
    assert args.process == "flow"


def test_a_study_folder_of_another_pair_is_refused(flow_study, flow_pair, tmp_path):
    out = tmp_path / "shared"
    study.check_pair(study.parse_args([*flow_study, "--output_dir", str(out)]))
    study.check_pair(study.parse_args([*flow_study, "--output_dir", str(out)]))  # same pair
    swapped = [*flow_study, "--output_dir", str(out)]
    swapped[1], swapped[3] = swapped[3], swapped[1]
    with pytest.raises(SystemExit, match="choose another --output_dir"):
        study.main(swapped)
    assert not (out / "pretrained-seed0").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--eval_sampler", "ddpm"], "--eval_sampler ddpm does not apply"),
        (["--retrain", "DDPM"], "must be trained with the same process"),
        (["--methods", "naive", "erasediff"], "--methods erasediff: EraseDiff fits"),
    ],
)
def test_bad_study_flags_fail_before_any_run(flow_study, tmp_path, capsys, flags, message):
    if "DDPM" in flags:
        folder = tmp_path / "ddpm"
        tiny_unet(sample_size=16).save_pretrained(folder, safe_serialization=True)
        DDPMScheduler(num_train_timesteps=T).save_pretrained(folder)
        flags = ["--retrain", str(folder)]
    with pytest.raises(SystemExit) as exit_info:
        study.parse_args([*flow_study, *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "outputs").exists()
