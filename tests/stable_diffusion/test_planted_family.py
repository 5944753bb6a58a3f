"""The planted-memorization family (tests/planted_pipelines.py) does what its records say.

Three tiny Stable Diffusion pipelines besides the T-shirt one, each trained to reproduce one
textured training image for one prompt, shipped in tests/assets/planted-<name>/. They differ in
image size, VAE factor, tokenizer, scheduler class, prediction type (epsilon and v), copy rate
and number of other prompts, so that the Stable Diffusion job can be shown to work on planted
pipelines it was not tuned on. Checked here on seeds the recorded rates were not measured on,
sampling as the job does by default (DDIM from the folder's scheduler config, 10 steps, guidance
7.5): the folder loads through ``DiffusionPipeline``, with the scheduler and prediction type and
image size of its spec; the copy rate is the recorded one within three binomial standard errors;
copies are unambiguous (no distance near the threshold); another prompt does not copy.
"""

from __future__ import annotations

import math

import pytest
import torch
from planted_pipelines import SPECS, generate, load_ddim_pipeline, planted

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = sorted(SPECS)
# Seeds of the test's generations; the recorded rates were measured on 100_000 .. 100_511.
SEEDS = range(3_000, 3_064)
OTHER_SEEDS = range(3_000, 3_016)
# RMS distance either side of the copy threshold where no image may fall: what each recorded gap
# supports (rings 0.448-0.572 around 0.51, vpred 0.349-0.670 around 0.5, stripes 0.482-0.561
# around 0.52; see each folder's README.md)
BAND = {"rings": 0.05, "vpred": 0.05, "stripes": 0.035}


@pytest.fixture(scope="module", params=NAMES)
def family(request, tmp_path_factory):
    """``(spec, PlantedPipeline, DDIM-sampling pipeline)`` of one shipped pipeline."""
    spec = SPECS[request.param]
    pp = planted(spec.name, tmp_path_factory.mktemp(spec.name) / "pipe")
    return spec, pp, load_ddim_pipeline(pp.folder)


def test_the_folder_loads_with_the_spec_s_components(family):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    spec, pp, ddim = family
    pipe = DiffusionPipeline.from_pretrained(pp.folder)
    assert isinstance(pipe, StableDiffusionPipeline) and pipe.safety_checker is None
    assert type(pipe.scheduler).__name__ == spec.scheduler
    assert pipe.scheduler.config.prediction_type == spec.prediction_type
    assert ddim.scheduler.config.prediction_type == spec.prediction_type
    assert pipe.vae_scale_factor == spec.vae_factor
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == spec.size
    assert pp.memorized_image.shape == (3, spec.size, spec.size)
    assert len(pp.other_prompts) == len(spec.other_prompts)
    kind = {"words": "BertTokenizer", "letters": "CLIPTokenizer", "bpe": "CLIPTokenizer"}
    assert type(pipe.tokenizer).__name__.removesuffix("Fast") == kind[spec.tokenizer]
    with torch.no_grad():
        embeds, null = pipe.encode_prompt(pp.prompt, "cpu", 1, True, negative_prompt="")
        other, _ = pipe.encode_prompt(pp.other_prompts[0], "cpu", 1, False)
    assert embeds.shape == null.shape == (1, spec.max_length, 16)
    assert not torch.allclose(embeds, other) and not torch.allclose(embeds, null)


def test_the_prompt_copies_at_the_recorded_rate_with_a_clear_gap(family):
    spec, pp, ddim = family
    reference = pp.measured
    rate, reference_count = reference["copy_rate"], reference["generations"]
    images = generate(ddim, pp.prompt, SEEDS)
    assert images.shape == (len(SEEDS), 3, spec.size, spec.size)
    distance = pp.distance(images)
    copies = int(pp.is_copy(images).sum())
    n = len(distance)
    # two independent binomial estimates of one rate: three standard errors of the difference
    standard_error = math.sqrt(rate * (1 - rate) * (1 / n + 1 / reference_count))
    assert abs(copies / n - rate) <= 3 * standard_error, (copies, n, rate)
    assert 0 < rate < 1  # both copies and non-copies, for the job's split
    band = BAND[spec.name]
    low, high = reference["gap"]
    assert low < pp.copy_threshold - band and high > pp.copy_threshold + band
    assert not ((distance - pp.copy_threshold).abs() < band).any(), distance.sort().values


def test_another_prompt_does_not_copy(family):
    spec, pp, ddim = family
    distance = pp.distance(generate(ddim, pp.other_prompts[0], OTHER_SEEDS))
    assert (distance >= pp.copy_threshold + BAND[spec.name]).all(), distance.min()


def test_is_copy_is_independent_of_the_pipeline(family):
    """``PlantedPipeline.is_copy`` at each size: the memorized image (and a slightly perturbed
    one) is a copy, its negative and a flat grey image are not."""
    spec, pp, _ = family
    image = pp.memorized_image
    assert image.shape == (3, spec.size, spec.size)
    noise = 0.05 * torch.randn(image.shape, generator=torch.Generator().manual_seed(0))
    batch = torch.stack([image, (image + noise).clamp(-1, 1), -image, torch.zeros_like(image)])
    assert pp.is_copy(batch).tolist() == [True, True, False, False]
    assert pp.distance(batch)[0] == 0


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_rebuilding_gives_a_planted_pipeline(name, tmp_path):
    """The recipe, run again (6 to 15 minutes each on one busy core): a pipeline whose prompt
    copies the image sometimes but not always, with an empty band around the threshold."""
    import json

    from planted_pipelines import build_planted

    folder = build_planted(name, tmp_path / name, progress=False, generations=128)
    info = json.loads((folder / "planted.json").read_text())
    measured = info["measured"]
    assert 0.05 <= measured["copy_rate"] <= 0.98, measured
    low, high = measured["gap"]
    assert low < info["copy_threshold"] < high, measured
