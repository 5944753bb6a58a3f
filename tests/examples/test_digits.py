"""The digits-with-outlier data set of the examples, and the classifier weights shipped."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from siss._digits import data as digits
from siss.metrics import DigitClassifier, default_threshold, generation_rate

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def data():
    return digits.load_training_set(seed=0)


def test_training_set_shape_range_and_outlier_share(data):
    images, mask, outlier = data
    # 1,797 digits plus round(0.01 * 1797 / 0.99) = 18 T-shirts: 0.99% of the set.
    assert images.shape == (1815, 1, 16, 16) and images.dtype == torch.float32
    assert mask.shape == (1815,) and int(mask.sum()) == 18
    assert float(images.min()) >= -1.0 and float(images.max()) <= 1.0
    assert outlier.shape == (1, 16, 16)
    assert torch.equal(images[mask], outlier.expand(18, 1, 16, 16))
    # Shuffled: the copies are not all at the end.
    assert mask.nonzero().min() < 1815 - 18


def test_seeded_and_deterministic(data):
    again = digits.load_training_set(seed=0)
    other = digits.load_training_set(seed=1)
    assert torch.equal(again.images, data.images) and torch.equal(again.is_outlier, data.is_outlier)
    assert not torch.equal(other.is_outlier, data.is_outlier)
    # Same multiset of images whatever the seed.
    assert torch.allclose(other.images.sum(0), data.images.sum(0), atol=1e-3)


def test_retrain_set_has_no_outlier(data):
    clean = digits.load_training_set(seed=0, exclude_outlier=True)
    assert clean.images.shape == (1797, 1, 16, 16)
    assert not clean.is_outlier.any()
    distances = (clean.images - data.outlier).flatten(1).norm(dim=1)
    assert float(distances.min()) > 0


def test_outlier_is_far_from_every_digit(data):
    """The detector of the paper (L2 in [0, 1] below the rescaled threshold) never fires on a
    real digit, so a detected sample is a reproduction of the outlier."""
    images, mask, outlier = data
    unit = digits.to_unit_range(images[~mask])
    threshold = default_threshold(outlier.shape)  # 10 * 16 / 28 = 5.71
    distances = (unit - digits.to_unit_range(outlier)).flatten(1).norm(dim=1)
    assert float(distances.min()) > threshold + 0.5  # observed minimum 6.70
    est = generation_rate(digits.to_unit_range(images), digits.to_unit_range(outlier))
    assert est.count == 18


def test_tshirt_drawing():
    shirt = digits.make_tshirt(16)
    assert shirt.shape == (1, 16, 16)
    unit = digits.to_unit_range(shirt)[0]
    # A bright garment on a dark background, symmetric left to right, with a neckline notch.
    assert torch.allclose(unit, unit.flip(-1), atol=1e-6)
    assert 0.5 < float(unit.mean()) < 0.8
    assert float(unit[:, 0].max()) < 0.7 and float(unit[-1].max()) <= 0.5  # antialiased edges
    assert float(unit[1, 7:9].max()) < 0.1 < float(unit[1, 4])  # notch between the collars
    assert digits.make_tshirt(28, channels=3).shape == (3, 28, 28)


def test_inject_outlier_counts_and_validation():
    images = torch.zeros(99, 1, 4, 4)
    out = digits.inject_outlier(images, torch.ones(1, 4, 4), fraction=0.01)
    assert int(out.is_outlier.sum()) == 1 and out.images.shape[0] == 100
    out = digits.inject_outlier(images, torch.ones(1, 4, 4), fraction=0.5)
    assert int(out.is_outlier.sum()) == 99
    with pytest.raises(ValueError, match="fraction"):
        digits.inject_outlier(images, torch.ones(1, 4, 4), fraction=1.0)
    with pytest.raises(ValueError, match="outlier shape"):
        digits.inject_outlier(images, torch.ones(1, 5, 5))


def test_image_folder_and_outlier_file(tmp_path):
    from PIL import Image

    gen = np.random.default_rng(0)
    for i in range(5):
        pixels = gen.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"img{i}.png")
    Image.fromarray(np.full((10, 10), 255, dtype=np.uint8)).save(tmp_path / "shirt.bmp")
    (tmp_path / "notes.txt").write_text("not an image")
    gray = digits.load_training_set(
        source="folder",
        root=tmp_path,
        outlier_path=tmp_path / "shirt.bmp",
        size=8,
        outlier_fraction=0.2,
    )
    # 6 image files (the outlier file is inside the folder too) + round(0.2 * 6 / 0.8) = 2.
    assert gray.images.shape == (8, 1, 8, 8)
    assert torch.allclose(gray.outlier, torch.ones(1, 8, 8))
    color = digits.load_training_set(source="folder", root=tmp_path, size=8, channels=3)
    assert color.images.shape[1:] == (3, 8, 8) and color.outlier.shape == (3, 8, 8)
    with pytest.raises(ValueError, match="no image files"):
        digits.load_training_set(source="folder", root=tmp_path / "missing")


def test_mnist_source_needs_torchvision_and_root(monkeypatch):
    with pytest.raises(ValueError, match="root"):
        digits.load_training_set(source="mnist")
    monkeypatch.setitem(sys.modules, "torchvision", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)
    with pytest.raises(ImportError, match="torchvision"):
        digits.load_training_set(source="mnist", root="/nonexistent")
    with pytest.raises(ValueError, match="grayscale"):
        digits.load_training_set(channels=3)
    with pytest.raises(ValueError, match="source"):
        digits.load_training_set(source="cifar")


def test_shipped_classifier_recognises_the_digits():
    """The weights written by examples/train_classifier.py (99.7% on its held-out split)."""
    weights = EXAMPLES / "assets" / "digit_classifier.safetensors"
    model = DigitClassifier.from_file(weights)
    images, labels = digits.load_digit_classes(size=16)
    with torch.no_grad():
        pred = model(images).logits.argmax(1)
    # 80% of these images were its training set; overall accuracy observed 99.9%.
    assert float((pred == labels).float().mean()) > 0.98


@pytest.mark.parametrize("name", ["pretrained", "retrain"])
def test_shipped_diffusion_checkpoints_load(name):
    """The EMA checkpoints written by examples/pretrain.py, with their DDPM schedule."""
    from diffusers import DDPMScheduler, UNet2DModel

    path = EXAMPLES / "assets" / name
    unet = UNet2DModel.from_pretrained(path).eval()
    scheduler = DDPMScheduler.from_pretrained(path)
    assert (unet.config.sample_size, unet.config.in_channels) == (16, 1)
    assert scheduler.config.num_train_timesteps == 1000
    assert scheduler.config.beta_schedule == "linear"
    assert scheduler.config.prediction_type == "epsilon"
    x = torch.zeros(2, 1, 16, 16)
    with torch.no_grad():
        eps = unet(x, torch.tensor([10, 900])).sample
    assert eps.shape == x.shape and torch.isfinite(eps).all()
