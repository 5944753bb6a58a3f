"""CLIP-IQA and CLIP score on a random tiny CLIP built from config and loaded by path: the values
mean nothing, the plumbing (transformers 5 shim, data range, one model for both) is checked."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import write_tiny_clip

from siss.metrics import CLIPQuality

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random tiny CLIP saved to a folder (``conftest.write_tiny_clip``)."""
    return write_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


def images(count: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, 32, 32), generator=generator, dtype=torch.uint8)


def test_scores_match_torchmetrics_on_the_same_model(tiny_clip):
    from torchmetrics.functional.multimodal import clip_image_quality_assessment, clip_score
    from transformers import CLIPModel, CLIPProcessor

    batch = images(4)
    result = CLIPQuality(tiny_clip)(batch, "a photo of a cat")
    assert 0.0 <= result["clip_iqa"] <= 1.0
    assert result["clip_iqa_se"] is not None and result["clip_iqa_se"] > 0.0
    assert math.isfinite(result["clip_score"]) and result["clip_score"] >= 0.0

    # the same numbers from torchmetrics' functional API on the same weights, unwrapped by hand
    model = CLIPModel.from_pretrained(tiny_clip)
    processor = CLIPProcessor.from_pretrained(tiny_clip)

    def text_features(*args, **kwargs):
        out = CLIPModel.get_text_features(model, *args, **kwargs)
        return out if isinstance(out, torch.Tensor) else out.pooler_output  # a tensor before 5

    def image_features(*args, **kwargs):
        out = CLIPModel.get_image_features(model, *args, **kwargs)
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    model.get_text_features, model.get_image_features = text_features, image_features
    per_image = clip_image_quality_assessment(
        batch.float(), lambda: (model, processor), data_range=1.0
    )
    assert result["clip_iqa"] == pytest.approx(float(per_image.double().mean()), abs=1e-6)
    expected_se = float(per_image.double().std() / 2.0)
    assert result["clip_iqa_se"] == pytest.approx(expected_se, abs=1e-6)
    expected = clip_score(batch.float(), ["a photo of a cat"] * 4, lambda: (model, processor))
    assert result["clip_score"] == pytest.approx(float(expected.detach()), abs=1e-4)


def test_scores_depend_on_the_images_and_the_prompt(tiny_clip):
    quality = CLIPQuality(tiny_clip)
    first, again = quality(images(3, seed=1), "a cat"), quality(images(3, seed=1), "a cat")
    assert first == again  # reset between calls: no accumulation across calls
    assert quality(images(3, seed=2), "a cat")["clip_iqa"] != first["clip_iqa"]
    # clipped at 0: a random tiny CLIP (its init differs across transformers) scores some prompts 0
    prompts = ("a cat", "two dogs", "a red car")
    scores = {quality(images(3, seed=1), prompt)["clip_score"] for prompt in prompts}
    assert len(scores) > 1


def test_not_measured_is_said_not_zeroed(tiny_clip):
    quality = CLIPQuality(tiny_clip)
    one = quality(images(1), None)
    assert one["clip_iqa_se"] is None  # one image: no standard error
    assert one["clip_score"] is None and "no prompt" in one["clip_score_note"]


def test_bad_input_raises(tiny_clip, tmp_path):
    with pytest.raises(ValueError, match="`source`"):
        CLIPQuality(tmp_path / "missing")
    with pytest.raises(TypeError, match="`source`"):
        CLIPQuality(3)
    quality = CLIPQuality(tiny_clip)
    with pytest.raises(TypeError, match=r"`images`.*uint8"):
        quality(images(2).float(), "a cat")
    with pytest.raises(ValueError, match="`images`"):
        quality(images(2)[:, :1], "a cat")
    with pytest.raises(ValueError, match="`prompt`"):
        quality(images(2), "")
