"""The digits set with several planted shapes (siss._digits.data), for sequential requests."""

import pytest
import torch

from siss._digits import data as digits
from siss.metrics import default_threshold, generation_rate


@pytest.fixture(scope="module")
def planted():
    return digits.load_shapes_training_set(5, seed=0)


def test_five_shapes_at_one_percent_each(planted):
    assert planted.names == ("tshirt", "trousers", "bag", "ankle_boot", "sneaker")
    # 1,797 digits + 5 x round(0.01 * 1797 / 0.95) = 5 x 19: 1.004% each of 1,892.
    assert planted.images.shape == (1892, 1, 16, 16) and planted.shapes.shape == (5, 1, 16, 16)
    counts = [int((planted.shape_index == k).sum()) for k in range(5)]
    assert counts == [19] * 5 and int((planted.shape_index == -1).sum()) == 1797
    for k in range(5):
        copies = planted.images[planted.shape_index == k]
        assert torch.equal(copies, planted.shapes[k].expand_as(copies))
    # The OutlierDataset view: any shape is an outlier, the first shape is "the" outlier.
    assert torch.equal(planted.is_outlier, planted.shape_index >= 0)
    assert torch.equal(planted.outlier, digits.make_tshirt(16))
    assert float(planted.images.min()) >= -1 and float(planted.images.max()) <= 1


def test_shapes_are_far_from_every_digit_and_from_each_other(planted):
    """The detector (L2 in [0, 1] below 5.71) never fires on a digit or on another shape, so a
    count for shape k is a reproduction of shape k. Margins as test_digits.py's (0.5)."""
    unit = digits.to_unit_range
    threshold = default_threshold((1, 16, 16))
    clean = unit(planted.images[planted.shape_index == -1]).flatten(1)
    shapes = unit(planted.shapes).flatten(1)
    to_digits = torch.cdist(shapes, clean).min(dim=1).values
    assert float(to_digits.min()) > threshold + 0.5  # observed 6.45 (trousers)
    between = torch.cdist(shapes, shapes) + torch.eye(5) * 1e9
    assert float(between.min()) > threshold + 0.5  # observed 6.78 (trousers, T-shirt)
    for k in range(5):
        rate = generation_rate(unit(planted.images), unit(planted.shapes[k]))
        assert rate.count == 19


def test_tshirt_shape_is_the_tshirt_and_one_shape_is_the_old_set():
    assert torch.equal(
        digits.make_shape("tshirt", 28, channels=3), digits.make_tshirt(28, channels=3)
    )
    old = digits.load_training_set(seed=3)
    again = digits.load_training_set(seed=3, outlier_shapes=1)
    assert torch.equal(again.images, old.images) and isinstance(again, digits.OutlierDataset)
    one = digits.load_shapes_training_set(1, seed=3)
    assert torch.equal(one.images, old.images)
    assert torch.equal(one.is_outlier, old.is_outlier)
    images = torch.randn(40, 1, 4, 4)
    shape = torch.ones(1, 1, 4, 4)
    a = digits.plant_outliers(
        images, shape, generator=torch.Generator().manual_seed(0), fraction=0.1
    )
    b = digits.inject_outlier(
        images, shape[0], generator=torch.Generator().manual_seed(0), fraction=0.1
    )
    assert torch.equal(a.images, b.images) and torch.equal(a.is_outlier, b.is_outlier)


def test_retrain_set_leaves_out_every_shape(planted):
    clean = digits.load_training_set(seed=0, exclude_outlier=True, outlier_shapes=5)
    assert isinstance(clean, digits.ShapesDataset) and not clean.is_outlier.any()
    # The same images in the same order as the one-outlier retrain set.
    assert torch.equal(clean.images, digits.load_training_set(seed=0, exclude_outlier=True).images)
    assert torch.equal(clean.shapes, planted.shapes)
    three = digits.load_training_set(seed=0, outlier_shapes=3)
    assert three.names == ("tshirt", "trousers", "bag") and int(three.is_outlier.sum()) == 3 * 19


def test_shapes_validation():
    with pytest.raises(ValueError, match="unknown shape"):
        digits.make_shape("dress")
    with pytest.raises(ValueError, match="shapes must be in"):
        digits.load_shapes_training_set(6)
    with pytest.raises(ValueError, match="distinct names"):
        digits.load_shapes_training_set(("bag", "bag"))
    with pytest.raises(ValueError, match="outlier_shapes"):
        digits.load_training_set(outlier_shapes=2, outlier_path="shirt.png")
    with pytest.raises(ValueError, match="outlier_shapes"):
        digits.load_training_set(outlier_shapes=2.0)
    images = torch.zeros(10, 1, 4, 4)
    with pytest.raises(ValueError, match="fraction"):
        digits.plant_outliers(images, torch.ones(5, 1, 4, 4), fraction=0.2)
    with pytest.raises(ValueError, match="shapes"):
        digits.plant_outliers(images, torch.ones(2, 1, 5, 5))
    named = digits.load_shapes_training_set(("sneaker", "bag"), seed=1)
    assert named.names == ("sneaker", "bag")
    assert torch.equal(named.shapes[0], digits.make_shape("sneaker"))
