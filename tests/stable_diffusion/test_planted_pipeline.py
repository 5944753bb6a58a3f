"""The planted-memorization pipeline does what the Stable Diffusion job's tests rely on.

``conftest.planted_sd_pipeline`` copies a tiny Stable Diffusion pipeline (tests/assets/planted-sd/)
whose UNet was trained to reproduce one training image, a white T-shirt on black, for the prompt
"a photo of a tshirt" at a rate of about half (the rest are smooth random colour fields). Checked
here on seeds the recorded reference rate was not measured on: the pipeline loads through both
diffusers entry points; the copy rate for the prompt is the recorded one within three binomial
standard errors; a copy is unambiguous (pixel distances to the memorized image fall in two groups
far from the threshold); and a prompt trained without the T-shirt does not produce it.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import planted_sd_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

# Seeds of the test's generations; the reference rate in planted.json was measured on
# 100_000 .. 100_511 (tests/assets/planted-sd/README.md).
SEEDS = range(2_000, 2_064)
STEPS = 10  # DDIM steps; the reference rate was measured with these and guidance 7.5
BAND = 0.1  # RMS distance either side of the copy threshold where no image falls


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return planted_sd_pipeline(tmp_path_factory.mktemp("planted") / "pipe")


@pytest.fixture(scope="module")
def pipe(planted):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(planted.folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompt: str, guidance_scale: float = 7.5) -> torch.Tensor:
    """One image per seed of ``SEEDS``, ``(N, 3, 16, 16)`` in ``[-1, 1]``."""
    generators = [torch.Generator().manual_seed(seed) for seed in SEEDS]
    with torch.no_grad():
        images = pipe(
            [prompt] * len(generators),
            num_inference_steps=STEPS,
            guidance_scale=guidance_scale,
            generator=generators,
            output_type="pt",
        ).images
    return images * 2 - 1


def test_the_folder_loads_through_both_entry_points(planted, pipe):
    from diffusers import DDIMScheduler, DiffusionPipeline, StableDiffusionPipeline

    assert isinstance(DiffusionPipeline.from_pretrained(planted.folder), StableDiffusionPipeline)
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.safety_checker is None
    assert planted.memorized_image.shape == (3, 16, 16)
    assert planted.memorized_image.min() == -1 and planted.memorized_image.max() == 1
    with torch.no_grad():
        embeds, null = pipe.encode_prompt(planted.prompt, "cpu", 1, True, negative_prompt="")
        other, _ = pipe.encode_prompt(planted.other_prompts[0], "cpu", 1, False)
    assert embeds.shape == null.shape == (1, 32, 16)
    assert not torch.allclose(embeds, other) and not torch.allclose(embeds, null)


def test_the_prompt_copies_the_memorized_image_at_the_recorded_rate(planted, pipe):
    reference = planted.measured
    rate, reference_count = reference["copy_rate"], reference["generations"]
    distance = planted.distance(generate(pipe, planted.prompt))
    copies = int((distance < planted.copy_threshold).sum())
    n = len(distance)
    # Two independent binomial estimates of the same rate: the difference has variance
    # p(1-p)(1/n + 1/n_ref); three standard errors (a seeded test: this fails only if the
    # pipeline's behaviour changed, e.g. a diffusers update changed the sampler).
    standard_error = math.sqrt(rate * (1 - rate) * (1 / n + 1 / reference_count))
    assert abs(copies / n - rate) <= 3 * standard_error, (copies, n, rate)
    assert 0.3 <= rate <= 0.7  # "about half of the time": both groups big enough to split
    # A copy is unambiguous: the reference distances left a band of at least 0.1 either side of
    # the threshold empty (copies are within ~0.3 RMS of the image, everything else beyond ~0.8),
    # and so do these.
    low, high = reference["gap"]
    assert low < planted.copy_threshold - BAND and high > planted.copy_threshold + BAND
    assert not ((distance - planted.copy_threshold).abs() < BAND).any(), distance.sort().values


def test_a_prompt_trained_without_the_image_does_not_copy_it(planted, pipe):
    distance = planted.distance(generate(pipe, planted.other_prompts[0]))
    # Trained on varied images only: no copy in 64 (Clopper-Pearson 95% upper bound 5.6%), the
    # nearest image far from the threshold.
    assert (distance >= planted.copy_threshold + BAND).all(), distance.min()


def test_copies_form_the_tight_group_of_a_two_means_split(planted, pipe):
    from sklearn.cluster import KMeans

    images = generate(pipe, planted.prompt)
    copy = planted.is_copy(images)
    labels = torch.as_tensor(
        KMeans(n_clusters=2, n_init=10, random_state=0).fit_predict(images.flatten(1).numpy())
    )
    # the two clusters are exactly the copies and the rest (in some order)
    assert torch.equal(labels == labels[copy][0], copy)
    spread = [images[labels == k].flatten(1).std(0).mean().item() for k in (0, 1)]
    tight = int(labels[copy][0])
    assert spread[tight] < 0.5 * spread[1 - tight], spread


def test_siss_on_kept_latents_removes_the_copies(planted):
    """What the example does, in a few lines: split generations by the copy threshold, fine-tune
    the UNet with SISS (forget: the copies' latents, keep: the others', prompt embedding fixed),
    count copies again on fresh seeds."""
    from diffusers import StableDiffusionPipeline

    from siss import NormBalancer, SISSLoss
    from siss.adapters import adapter_for, loss_from_scheduler

    pipe = StableDiffusionPipeline.from_pretrained(planted.folder)
    pipe.set_progress_bar_config(disable=True)

    def sample(seeds):
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        with torch.no_grad():
            latents = pipe(
                [planted.prompt] * len(seeds),
                num_inference_steps=STEPS,
                generator=generators,
                output_type="latent",
            ).images
            images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
        return latents, images.clamp(-1, 1)

    latents, images = sample(range(64))
    copy = planted.is_copy(images)
    fresh = range(10_000, 10_064)
    before = planted.is_copy(sample(fresh)[1]).double().mean().item()

    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(planted.prompt, "cpu", 1, False)
    unet = pipe.unet.train().requires_grad_(True)
    params = list(unet.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    balancer = NormBalancer(params, ratio=0.1)
    loss_fn = loss_from_scheduler(SISSLoss, pipe.scheduler, lam=0.5, superfactor=0.0)
    adapter = adapter_for(unet)
    forget, keep = latents[copy], latents[~copy]
    for _ in range(35):
        rows_x = torch.randint(0, len(keep), (16,), generator=generator)
        rows_a = torch.randint(0, len(forget), (16,), generator=generator)
        terms = adapter.loss(
            keep[rows_x], forget[rows_a], loss_fn, generator=generator, encoder_hidden_states=embeds
        )
        optimizer.zero_grad()
        balancer.backward(terms.keep, terms.forget)
        balancer.step()
        optimizer.step()
    unet.eval()
    after = planted.is_copy(sample(fresh)[1]).double().mean().item()
    # measured: 62.5% -> 1.6% (README.md). Asserted: a drop of more than three standard errors
    # of the difference of two proportions of 64 (pooled), and nearly no copies left.
    pooled = (before + after) / 2
    standard_error = math.sqrt(pooled * (1 - pooled) * 2 / 64)
    assert before - after > 3 * standard_error, (before, after)
    assert after <= 0.1, after


@pytest.mark.slow
def test_rebuilding_gives_a_planted_pipeline(tmp_path):
    """The recipe, run again (minutes): a pipeline that copies the image about half the time."""
    planted = planted_sd_pipeline(tmp_path / "rebuilt", rebuild=True, progress=False)
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(planted.folder)
    pipe.set_progress_bar_config(disable=True)
    rate = planted.is_copy(generate(pipe, planted.prompt)).double().mean().item()
    assert 0.2 <= rate <= 0.8, rate
    assert not planted.is_copy(generate(pipe, planted.other_prompts[0])).any()
