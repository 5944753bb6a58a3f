"""siss.audit.split: the memorized / not-memorized split of generated images.

Synthetic features with a planted tight cluster (it must be found, with exactly its members)
and without one (it must say "not found" and why); the rule's calibration against its derived
single-mode bound; laws (order of the rows, scale of the features) with hypothesis; the
reference rule's known answers; the feature maps (pixels, a tiny VAE, a tiny CLIP vision model
saved to a folder); and bad input, named.
"""

import json
import math

import pytest
import torch
from conftest import fuzz_settings, tiny_sd_vae
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from siss.audit import (
    MemorizationSplit,
    image_encoder_features,
    memorization_split,
    split_by_clustering,
    split_by_reference,
    vae_features,
)
from siss.audit.generation import pixel_features

pytestmark = pytest.mark.usefixtures("one_thread")


def planted(copies=8, others=32, width=64, noise=0.01, seed=0):
    """``copies`` near-duplicates of one random point (the first rows) and ``others`` diverse
    points, all ``(N, width)`` float64; the near-duplicates' spread is ``noise * sqrt(width)``
    against the others' ``sqrt(width)``."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.randn(1, width, generator=g, dtype=torch.float64)
    near = centre + noise * torch.randn(copies, width, generator=g, dtype=torch.float64)
    far = torch.randn(others, width, generator=g, dtype=torch.float64)
    return torch.cat([near, far])


# --------------------------------------------------------------------------------------------
# 2-means
# --------------------------------------------------------------------------------------------


def test_planted_tight_cluster_is_found_with_exactly_its_members():
    features = planted()
    split = split_by_clustering(features)
    assert split.found and split.rule == "2-means"
    expected = torch.arange(40) < 8
    assert torch.equal(split.memorized, expected)
    assert split.counts == (8, 32)
    assert torch.equal(split.clusters, (~expected).long())
    stats = split.statistics
    assert stats["size_tight"] == 8 and stats["size_other"] == 32
    # spread of the copies: noise * sqrt(width) = 0.08; the others lie ~sqrt(2 * 64) = 11.3 away
    assert stats["spread_tight"] < 0.1 < 10 < stats["other_to_tight"]
    assert stats["ratio"] == pytest.approx(stats["spread_tight"] / stats["other_to_tight"])
    assert stats["ratio"] < 0.01
    assert "memorized group found" in split.reason
    # scores: distance to the tight centre, small for the copies only
    assert split.scores[:8].max() < split.scores[8:].min()
    # the centres are the groups' means, tight first
    torch.testing.assert_close(split.centres[0], features[:8].mean(0))
    torch.testing.assert_close(split.centres[1], features[8:].mean(0))


def test_no_planted_cluster_is_reported_as_not_found_with_a_reason():
    g = torch.Generator().manual_seed(1)
    features = torch.randn(64, 64, generator=g, dtype=torch.float64)
    split = split_by_clustering(features)
    assert not split.found
    assert not split.memorized.any() and split.counts == (0, 64)
    assert "no memorized group" in split.reason and "tightness=0.25" in split.reason
    # a spread-out population split in two: the halves are about as wide as they are apart
    assert split.statistics["ratio"] > 0.7
    assert split.statistics["size_tight"] + split.statistics["size_other"] == 64
    assert not split.classify(features).any()  # nothing memorized to classify as


@pytest.mark.parametrize(
    ("sample", "limit"),
    [
        ("uniform", 1 / math.sqrt(13)),
        ("gaussian", math.sqrt((1 - 2 / math.pi) / (1 + 6 / math.pi))),
    ],
)
def test_single_mode_ratio_matches_its_derivation_and_is_not_found(sample, limit):
    """The default tightness 0.25 sits below the large-sample ratio of a 2-means split of a 1-D
    uniform (1/sqrt(13) = 0.277) and Gaussian (0.354) population. Tolerance 0.02: 4 standard
    deviations of the ratio over 20 seeds at N = 4000 (measured: 0.005 for both), plus the
    finite-sample bias (measured: -0.003 and -0.006)."""
    g = torch.Generator().manual_seed(0)
    draw = torch.rand if sample == "uniform" else torch.randn
    split = split_by_clustering(draw(4000, 1, generator=g, dtype=torch.float64))
    assert split.statistics["ratio"] == pytest.approx(limit, abs=0.02)
    assert not split.found


def test_a_small_group_of_copies_is_found_from_the_densest_image():
    """4 copies among 128 images of 768 features: k-means++'s lowest-variance split cuts the
    diverse images instead (measured: it needs about 8 copies here); the start from the densest
    image finds the 4, and the split keeps the tighter partition."""
    from sklearn.cluster import KMeans

    features = planted(copies=4, others=124, width=768, noise=0.02, seed=9)
    plain = torch.from_numpy(KMeans(2, n_init=10, random_state=0).fit_predict(features.numpy()))
    assert not (
        torch.equal(plain, (torch.arange(128) >= 4).long())
        or torch.equal(plain, (torch.arange(128) < 4).long())
    )
    split = split_by_clustering(features)
    assert split.found and split.start == "densest image"
    assert torch.equal(split.memorized, torch.arange(128) < 4)
    # and diverse images alone: no false alarm from either start
    alone = split_by_clustering(planted(copies=0, others=128, width=768, seed=9))
    assert not alone.found and alone.statistics["ratio"] > 0.5


@pytest.mark.parametrize("copies", [0, 6])
def test_many_features_cluster_on_distance_preserving_coordinates(copies, monkeypatch):
    """Above 256 features (and more features than images) 2-means runs on N-dimensional
    coordinates with the features' Gram matrix (16 s per k-means start on raw 512x512x3 images):
    the same partition and statistics as on the raw features."""
    import siss.audit.split as split_module

    features = planted(copies=copies, others=40 - copies, width=1024, noise=0.05, seed=10)
    projected = split_by_clustering(features)
    monkeypatch.setattr(split_module, "_PROJECT_ABOVE", 10**9)
    raw = split_by_clustering(features)
    assert projected.found == raw.found == bool(copies)
    assert torch.equal(projected.clusters, raw.clusters) and projected.start == raw.start
    for key, value in raw.statistics.items():
        assert projected.statistics[key] == pytest.approx(value, rel=1e-9), key
    torch.testing.assert_close(projected.centres, raw.centres)


def test_two_tight_clusters_the_tighter_one_is_memorized():
    g = torch.Generator().manual_seed(2)
    a = torch.zeros(1, 16, dtype=torch.float64) + 0.01 * torch.randn(6, 16, generator=g).double()
    b = (
        torch.full((1, 16), 5.0, dtype=torch.float64)
        + 0.03 * torch.randn(6, 16, generator=g).double()
    )
    split = split_by_clustering(torch.cat([a, b]))
    assert split.found and torch.equal(split.memorized, torch.arange(12) < 6)


def test_a_cluster_below_min_size_is_set_aside_not_memorized():
    # one odd image far from 30 diverse ones: 2-means isolates it; it is set aside and the 30
    # are clustered again, a spread-out population: no memorized group
    features = planted(copies=0, others=30, seed=3)
    outlier = torch.full((1, 64), 40.0, dtype=torch.float64)
    split = split_by_clustering(torch.cat([features, outlier]))
    assert not split.found and not split.memorized.any()
    assert split.clusters[-1] == 2 and split.statistics["set_aside"] == 1
    assert "set aside" in split.reason
    # a far pair of copies is a group of 2 (found) but not of 3 (set aside)
    pair = torch.cat([planted(copies=0, others=30, seed=4), planted(copies=2, others=0) + 10])
    found = split_by_clustering(pair)
    assert found.found and torch.equal(found.memorized, torch.arange(32) >= 30)
    strict = split_by_clustering(pair, min_size=3)
    assert not strict.found and strict.statistics["set_aside"] == 2
    assert (strict.clusters[30:] == 2).all()


def test_degenerate_inputs_say_why_nothing_was_split():
    same = torch.ones(5, 3, dtype=torch.float64)
    split = split_by_clustering(same)
    assert not split.found and "identical" in split.reason
    assert torch.isnan(split.scores).all() and split.clusters is None
    two = split_by_clustering(torch.tensor([[0.0], [1.0]], dtype=torch.float64))
    assert not two.found and "min_size=2" in two.reason
    json.dumps(split.to_dict(), allow_nan=False)
    json.dumps(two.to_dict(), allow_nan=False)


def test_to_dict_is_json_safe_and_enough_to_reapply_the_rule():
    features = planted(seed=5)
    split = split_by_clustering(features, tightness=0.2, min_size=3, seed=7)
    data = json.loads(json.dumps(split.to_dict(), allow_nan=False))
    assert data["rule"] == "2-means" and data["found"] is True
    assert (data["tightness"], data["min_size"], data["seed"]) == (0.2, 3, 7)
    assert data["counts"] == {"memorized": 8, "not_memorized": 32, "total": 40}
    assert data["memorized_indices"] == list(range(8))
    assert set(data["statistics"]) >= {"spread_tight", "spread_other", "separation", "ratio"}
    assert len(data["scores"]) == 40 and "KMeans" in data["rule_text"]
    # the centres from the saved labels and the features, then the paper's nearest-centre rule
    clusters = torch.tensor(data["clusters"])
    centres = torch.stack([features[clusters == 0].mean(0), features[clusters == 1].mean(0)])
    torch.testing.assert_close(centres, split.centres)
    fresh = planted(copies=4, others=12, seed=6)
    fresh[:4] = split.centres[0] + 0.01 * torch.randn(4, 64, dtype=torch.float64)
    assert torch.equal(split.classify(fresh), torch.arange(16) < 4)


def test_clustering_scale_invariance_for_any_positive_factor():
    features = planted(seed=8)
    base = split_by_clustering(features)
    for factor in (1e-3, 0.37, 123.0):
        scaled = split_by_clustering(features * factor)
        assert torch.equal(scaled.memorized, base.memorized)
        assert scaled.statistics["ratio"] == pytest.approx(base.statistics["ratio"], rel=1e-9)


def test_clustering_ignores_the_order_where_plain_kmeans_does_not():
    """On these 7 points sklearn's KMeans (n_init=10, random_state=0) returns a different
    partition for the two orders (its k-means++ starts follow the row order); the split does
    not, because it clusters the rows in a canonical order."""
    import warnings

    from sklearn.cluster import KMeans

    points = [[0.3, 0.5], [-0.8, -0.3], [0.0, -0.1], [-0.9, -0.6], [0.9, -0.7], [0.7, 0.6]]
    features = torch.tensor([*points, [-0.2, -0.1]], dtype=torch.float64)
    perm = torch.tensor([6, 4, 0, 1, 3, 5, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = [
            torch.from_numpy(KMeans(2, n_init=10, random_state=0).fit_predict(x.numpy()))
            for x in (features, features[perm])
        ]
    same = plain[0][perm]
    assert not (torch.equal(same, plain[1]) or torch.equal(1 - same, plain[1]))
    base, shuffled = split_by_clustering(features), split_by_clustering(features[perm])
    assert torch.equal(shuffled.clusters, base.clusters[perm])


rows = st.integers(2, 20).flatmap(
    lambda n: st.integers(1, 5).flatmap(
        lambda f: hnp.arrays(
            "float64",
            (n, f),
            elements=st.floats(-100, 100, allow_nan=False, allow_subnormal=False, width=32),
        )
    )
)


@fuzz_settings(25)
@given(rows, st.randoms(use_true_random=False))
def test_fuzz_clustering_ignores_the_order_of_the_images(array, rng):
    features = torch.from_numpy(array)
    order = list(range(len(features)))
    rng.shuffle(order)
    perm = torch.tensor(order)
    base, shuffled = split_by_clustering(features), split_by_clustering(features[perm])
    assert shuffled.found == base.found
    assert torch.equal(shuffled.memorized, base.memorized[perm])
    if base.clusters is not None:
        assert torch.equal(shuffled.clusters, base.clusters[perm])
        for key, value in base.statistics.items():
            assert shuffled.statistics[key] == pytest.approx(
                value, rel=1e-9, abs=1e-12, nan_ok=True
            ), key


@fuzz_settings(25)
@given(rows, st.integers(-8, 8))
def test_fuzz_clustering_is_unchanged_by_scaling_with_a_power_of_two(array, exponent):
    features = torch.from_numpy(array)
    base, scaled = split_by_clustering(features), split_by_clustering(features * 2.0**exponent)
    assert scaled.found == base.found and scaled.reason.split(":")[0] == base.reason.split(":")[0]
    assert torch.equal(scaled.memorized, base.memorized)
    if base.clusters is not None:
        assert torch.equal(scaled.clusters, base.clusters)
        assert scaled.statistics["ratio"] == pytest.approx(base.statistics["ratio"], rel=1e-12)


# --------------------------------------------------------------------------------------------
# Reference rule
# --------------------------------------------------------------------------------------------


def test_reference_rule_known_answers():
    features = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.5, 0.0], [1.0, 0.0]], dtype=torch.float64)
    split = split_by_reference(features, torch.zeros(2), threshold=1.0)
    assert split.rule == "reference" and split.found
    assert split.memorized.tolist() == [True, False, True, False]  # strict: distance < 1
    assert split.scores.tolist() == [0.0, 5.0, 0.5, 1.0]
    assert split.statistics["count"] == 2 and split.threshold == 1.0
    # several reference rows: the nearest one counts
    two = split_by_reference(features, torch.tensor([[0.0, 0.0], [3.0, 4.0]]), threshold=1.0)
    assert two.memorized.tolist() == [True, True, True, False]
    none = split_by_reference(features, torch.full((2,), 50.0), threshold=1.0)
    assert not none.found and "no image" in none.reason and "nearest distance" in none.reason
    assert not split.classify(torch.tensor([[9.0, 9.0]], dtype=torch.float64)).any()


def test_reference_rule_cosine():
    features = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.3]], dtype=torch.float64)
    split = split_by_reference(features, torch.tensor([2.0, 0.0]), threshold=0.9, metric="cosine")
    assert split.memorized.tolist() == [True, False, True]
    assert split.scores[:2].tolist() == [1.0, 0.0]
    assert split.metric == "cosine" and "cosine" in split.rule_text
    with pytest.raises(ValueError, match=r"`reference_features`.*all-zero"):
        split_by_reference(features, torch.zeros(2), threshold=0.5, metric="cosine")
    with pytest.raises(ValueError, match="`threshold`"):
        split_by_reference(features, torch.ones(2), threshold=1.5, metric="cosine")


# --------------------------------------------------------------------------------------------
# From images
# --------------------------------------------------------------------------------------------


def planted_images(copies=5, others=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    memorized = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
    near = (memorized + 0.02 * torch.randn(copies, 3, 16, 16, generator=g)).clamp(-1, 1)
    return memorized, torch.cat([near, torch.rand(others, 3, 16, 16, generator=g) * 2 - 1])


def test_memorization_split_on_pixels_both_rules():
    memorized, images = planted_images()
    expected = torch.arange(16) < 5
    clustered = memorization_split(images)
    assert clustered.found and torch.equal(clustered.memorized, expected)
    assert clustered.features == "pixels mapped from [-1, 1] to [0, 1]"
    referenced = memorization_split(images, reference=memorized)
    assert referenced.rule == "reference" and torch.equal(referenced.memorized, expected)
    # pixels in [0, 1]; the threshold is the middle of the gap between the copies' distances to
    # the reference and the other images'
    pixels = ((images.double() - memorized.double()) / 2).flatten(1).norm(dim=1)
    torch.testing.assert_close(referenced.scores, pixels)
    gap = (pixels[:5].max().item(), pixels[5:].min().item())
    assert referenced.threshold == pytest.approx(sum(gap) / 2)
    assert (referenced.statistics["gap_low"], referenced.statistics["gap_high"]) == pytest.approx(
        gap
    )
    # the rule applied to new images is the same: distance to the reference below the threshold
    assert torch.equal(referenced.classify(pixel_features(images)), expected)
    strict = memorization_split(images, reference=memorized[0], threshold=0.5)
    assert torch.equal(strict.memorized, expected)


def test_vae_features_are_the_posterior_means_and_split():
    vae = tiny_sd_vae(seed=0)
    features = vae_features(vae)
    _, images = planted_images()
    values = features(images)
    assert values.shape == (16, 4 * 8 * 8) and values.dtype == torch.float64
    torch.testing.assert_close(values, features(images))  # deterministic: no posterior noise
    with torch.no_grad():
        mean = vae.encode(images).latent_dist.mean * vae.config.scaling_factor
    torch.testing.assert_close(values, mean.double().flatten(1), rtol=1e-5, atol=1e-6)
    split = memorization_split(images, features=features)
    assert split.found and torch.equal(split.memorized, torch.arange(16) < 5)
    assert split.features.startswith("VAE posterior means")


@pytest.mark.parametrize("projection", [False, True])
def test_image_encoder_features_from_a_local_folder(tmp_path, projection):
    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModel,
        CLIPVisionModelWithProjection,
    )

    config = CLIPVisionConfig(
        hidden_size=8,
        intermediate_size=16,
        projection_dim=6,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=16,
        patch_size=4,
    )
    torch.manual_seed(0)
    cls = CLIPVisionModelWithProjection if projection else CLIPVisionModel
    cls(config).save_pretrained(tmp_path / "clip")
    features = image_encoder_features(tmp_path / "clip", device="cpu")
    _, images = planted_images()
    values = features(images)
    assert values.shape == (16, 6 if projection else 8)
    torch.testing.assert_close(values.norm(dim=1), torch.ones(16, dtype=torch.float64))
    # other sizes are resized to the model's 16x16 input
    big = torch.nn.functional.interpolate(images, size=(32, 32), mode="nearest")
    assert features(big).shape == values.shape
    assert "clip" in features.description
    split = memorization_split(
        images, features=features, reference=images[0], threshold=0.99, metric="cosine"
    )
    assert split.memorized[0] and split.metric == "cosine"


def test_image_encoder_features_from_a_callable():
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 4, stride=4), torch.nn.Flatten())
    features = image_encoder_features(encoder, image_size=8)
    _, images = planted_images()
    values = features(images)
    assert values.shape == (16, 4 * 2 * 2)
    torch.testing.assert_close(values.norm(dim=1), torch.ones(16, dtype=torch.float64))


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_bad_features_are_named():
    with pytest.raises(ValueError, match="`features` is empty"):
        split_by_clustering(torch.zeros(0, 3))
    with pytest.raises(ValueError, match="`features` has 1 row"):
        split_by_clustering(torch.zeros(1, 3))
    nan = planted()
    nan[3, 2] = math.nan
    with pytest.raises(ValueError, match="`features` holds NaN"):
        split_by_clustering(nan)
    with pytest.raises(ValueError, match="`features` must have shape"):
        split_by_clustering(torch.zeros(4))
    with pytest.raises(TypeError, match="`features`"):
        split_by_clustering([[0.0], [1.0]])
    with pytest.raises(ValueError, match="`tightness`"):
        split_by_clustering(planted(), tightness=0)
    with pytest.raises(ValueError, match="`min_size`"):
        split_by_clustering(planted(), min_size=0)
    with pytest.raises(ValueError, match="`reference_features`"):
        split_by_reference(planted(), torch.zeros(3), threshold=1.0)
    with pytest.raises(ValueError, match="`metric`"):
        split_by_reference(planted(), torch.zeros(64), threshold=1.0, metric="l1")
    with pytest.raises(ValueError, match="`threshold`"):
        split_by_reference(planted(), torch.zeros(64), threshold=-1.0)


def test_bad_images_and_arguments_are_named_before_features_run():
    calls = []

    def features(batch):
        calls.append(len(batch))
        return batch.flatten(1)

    memorized, images = planted_images()
    with pytest.raises(ValueError, match="`images` must hold N >= 2"):
        memorization_split(images[:1], features=features)
    with pytest.raises(ValueError, match="`reference` images have shape"):
        memorization_split(images, reference=torch.zeros(3, 8, 8), threshold=1.0)
    with pytest.raises(ValueError, match="`images` must hold N >= 2"):  # the gap needs two
        memorization_split(images[:1], features=features, reference=memorized)
    with pytest.raises(ValueError, match="`threshold` applies to the reference rule"):
        memorization_split(images, threshold=1.0)
    bad = images.clone()
    bad[0, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="`images` holds NaN"):
        memorization_split(bad, features=features)
    assert calls == []
    with pytest.raises(ValueError, match="`features` must map images"):
        memorization_split(images, features=lambda batch: batch)
    with pytest.raises(ValueError, match="`path_or_model`"):
        image_encoder_features("/nonexistent/clip")
    with pytest.raises(TypeError, match="`vae`"):
        vae_features(object())


def test_result_type_counts():
    split = MemorizationSplit(
        memorized=torch.tensor([True, False, False]),
        rule="reference",
        found=True,
        threshold=1.0,
        scores=torch.tensor([0.1, 2.0, 3.0], dtype=torch.float64),
        statistics={"count": 1},
        reason="1 of 3",
    )
    assert split.counts == (1, 2)


def test_one_rule_the_distance_to_the_centre_below_the_gaps_middle():
    """2-means finds the group; the rule that decides, for the split's own images and for new
    ones, is the distance to the tight centre below the middle of the gap. A faint ghost nearer
    the copies' centre than the others' mean but past the gap is a copy for the paper's
    nearer-centre classifier only (reported beside, never deciding)."""
    g = torch.Generator().manual_seed(3)
    centre = torch.zeros(40, dtype=torch.float64)
    copies = centre + 0.05 * torch.randn(8, 40, generator=g, dtype=torch.float64)
    others = 4 + torch.randn(24, 40, generator=g, dtype=torch.float64)
    split = split_by_clustering(torch.cat([copies, others]))
    assert split.found and torch.equal(split.memorized, torch.arange(32) < 8)
    distances = torch.cat([copies, others]).sub(split.centres[0]).norm(dim=1)
    low, high = distances[:8].max().item(), distances[8:].min().item()
    assert split.threshold == pytest.approx((low + high) / 2)
    assert split.statistics["disagreements"] == 0
    # orthogonal to the others' direction, past the gap: nearer the copies' centre all the same
    sideways = torch.tensor([1.0, -1.0], dtype=torch.float64).repeat(20)
    ghost = (split.centres[0] + 1.5 * high * sideways / sideways.norm())[None]
    assert not split.classify(ghost).item() and split.classify_nearer_centre(ghost).item()
    assert split.classify(copies[:1] + 0.01).item()


def test_a_reference_that_is_not_the_tight_group_finds_nothing():
    """With a reference and no threshold, a tight group that is farther from the reference than
    the other images is not its copies: not found, and the reason names the threshold."""
    memorized, images = planted_images()
    unrelated = -memorized  # the negative image: nearer every varied image than the copies
    split = memorization_split(images, reference=unrelated)
    assert not split.found and not split.memorized.any()
    assert "`threshold`" in split.reason


def test_the_gap_threshold_takes_custom_features_without_a_given_threshold():
    memorized, images = planted_images()
    split = memorization_split(images, reference=memorized, features=lambda x: x.flatten(1) * 3)
    assert split.found and torch.equal(split.memorized, torch.arange(16) < 5)
