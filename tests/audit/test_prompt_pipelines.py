"""python -m siss.audit --prompt on SDXL, SD3 and Flux pipeline folders (pooled embeddings).

The prompt is encoded by the pipeline's own ``encode_prompt`` (``prompt_conditioning``), so the
audit's conditioning carries SDXL's ``added_cond_kwargs`` (``text_embeds``, ``time_ids``) and
SD3's and Flux's ``pooled_projections`` (Flux: packed latents, position ids built by the adapter);
every check must take them (the denoisers refuse to run without).
Tiny pipelines from ``tests/conftest.py``, saved and passed by path.
"""

import json
import math

import pytest
import torch
from conftest import (
    CHEAP_AUDIT_FLAGS,
    tiny_flux_pipeline,
    tiny_sd3_pipeline,
    tiny_sdxl_pipeline,
)

import siss.audit.run
from siss.adapters import prompt_conditioning
from siss.audit.__main__ import main

pytestmark = pytest.mark.usefixtures("one_thread")

CHEAP = [*CHEAP_AUDIT_FLAGS, "--no_figure"]


def fixed_shift_flux_pipeline(folder):
    """:func:`tiny_flux_pipeline` with its scheduler at the fixed shift FLUX.1's dynamic shifting
    gives 8x8 latents (16 packed tokens): the audit refuses a dynamically shifted scheduler (its
    sigmas depend on a per-resolution ``mu`` it does not set), and a folder's own scheduler is
    the one it reads, so a Flux folder is audited with its scheduler saved at that shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    folder = tiny_flux_pipeline(folder)
    own = FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler")
    config = own.config
    mu = calculate_shift(
        16, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift
    )
    fixed = FlowMatchEulerDiscreteScheduler.from_config(
        config, use_dynamic_shifting=False, shift=math.exp(mu)
    )
    fixed.save_pretrained(folder / "scheduler")
    return folder


BUILDERS = {
    "sdxl": tiny_sdxl_pipeline,
    "sd3": tiny_sd3_pipeline,
    "flux": fixed_shift_flux_pipeline,
}
POOLED = {"sd3": "tensor(1, 16)", "flux": "tensor(1, 32)"}  # the pooled projections' shapes


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pooled")
    g = torch.Generator().manual_seed(0)
    torch.save(torch.rand(1, 3, 16, 16, generator=g) * 2 - 1, root / "forget.pt")
    torch.save(torch.rand(4, 3, 16, 16, generator=g) * 2 - 1, root / "reference.pt")
    return root


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_prompt_on_a_pooled_pipeline_runs_every_check(family, data, monkeypatch):
    from diffusers import DiffusionPipeline

    folder = BUILDERS[family](data / family)
    seen = {}
    real_audit = siss.audit.run.audit

    def recording_audit(*args, **kwargs):
        seen.update(kwargs)
        return real_audit(*args, **kwargs)

    monkeypatch.setattr(siss.audit.run, "audit", recording_audit)
    out = data / f"out-{family}"
    args = ["--model", str(folder), "--prompt", "a photo of a cat", "--output_dir", str(out)]
    args += ["--forget", str(data / "forget.pt"), "--reference", str(data / "reference.pt")]
    checks = ["memorization", "membership", "reconstruction", "likelihood", "generation"]
    assert main([*args, "--checks", *checks, "--samples", "4", *CHEAP]) == 0

    report = json.loads((out / family / "audit.json").read_text())
    assert {r["check"] for r in report["results"]} == set(checks)
    memorization = next(r for r in report["results"] if r["check"] == "memorization")
    assert memorization["statistics"]["noise_magnitude"]["status"] == "measured"
    assert memorization["statistics"]["noise_magnitude"]["n"] == 4

    # the audit got exactly the pipeline's own conditioning, for the prompt and for ""
    absent = {"text_encoder_3": None, "tokenizer_3": None} if family == "sd3" else {}
    pipe = DiffusionPipeline.from_pretrained(str(folder), **absent)
    expected = prompt_conditioning(pipe, "a photo of a cat")
    for ours, theirs in (
        (seen["conditioning"], expected.conditional),
        (seen["null_conditioning"], expected.unconditional),
    ):
        assert ours.keys() == theirs.keys()
        for key, value in theirs.items():
            if isinstance(value, dict):
                for sub, tensor in value.items():
                    torch.testing.assert_close(ours[key][sub], tensor, rtol=0, atol=0)
            else:
                torch.testing.assert_close(ours[key], value, rtol=0, atol=0)
    conditioning = report["config"]["conditioning"]
    if family == "sdxl":
        assert set(conditioning["added_cond_kwargs"]) == {"text_embeds", "time_ids"}
        # 16x16 pixels encoded to 8x8 latents: time ids of an uncropped 16x16 image
        time_ids = seen["conditioning"]["added_cond_kwargs"]["time_ids"]
        assert time_ids.tolist() == [[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]]
    else:
        assert conditioning["pooled_projections"] == POOLED[family]


def test_prompt_needs_a_pipeline_folder(tmp_path, capsys):
    from conftest import tiny_conditional_unet
    from diffusers import DDPMScheduler

    folder = tmp_path / "bare"
    tiny_conditional_unet().save_pretrained(folder / "unet")
    DDPMScheduler(num_train_timesteps=100).save_pretrained(folder / "scheduler")
    torch.save(torch.randn(2, 4, 8, 8), tmp_path / "x.pt")
    args = ["--model", str(folder), "--prompt", "a cat", "--output_dir", str(tmp_path / "o")]
    args += ["--forget", str(tmp_path / "x.pt"), "--reference", str(tmp_path / "x.pt")]
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--prompt" in err and "model_index.json" in err
    assert not (tmp_path / "o").exists()
