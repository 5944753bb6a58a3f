"""Inception-Score- and FID-style scores, against closed forms and naive references."""

import math

import pytest
import torch
from safetensors.torch import save_file
from scipy.linalg import sqrtm

from siss.metrics import (
    ClassifierOutput,
    DigitClassifier,
    extract,
    fid_score,
    frechet_distance,
    frechet_distance_from_statistics,
    gaussian_statistics,
    inception_score,
    is_score,
)


def _random_spd(dim: int, gen: torch.Generator) -> torch.Tensor:
    a = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    return a @ a.T / dim + 0.1 * torch.eye(dim, dtype=torch.float64)


def _naive_inception_score(logits: torch.Tensor) -> float:
    """Textbook loop over samples in float64."""
    p = torch.softmax(logits.double(), dim=1)
    py = p.mean(0)
    kl = [float((row * (row.log() - py.log())).sum()) for row in p]
    return math.exp(sum(kl) / len(kl))


def test_fid_of_a_set_with_itself_is_zero():
    f = torch.randn(400, 16, generator=torch.Generator().manual_seed(0))
    # float64 statistics and a symmetric eigen square root: zero up to round-off (~1e-13).
    assert frechet_distance(f, f) < 1e-9


def test_fid_matches_the_closed_form_for_commuting_covariances():
    mu1, mu2 = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([1.0, 1.0, 0.5])
    var1, var2 = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([9.0, 1.0, 0.25])
    expected = float((mu1 - mu2).square().sum() + (var1.sqrt() - var2.sqrt()).square().sum())
    got = frechet_distance_from_statistics(mu1, torch.diag(var1), mu2, torch.diag(var2))
    assert got == pytest.approx(expected, rel=1e-12)


def test_fid_matches_scipy_sqrtm_for_full_covariances():
    gen = torch.Generator().manual_seed(1)
    dim = 8
    mu1 = torch.randn(dim, generator=gen, dtype=torch.float64)
    mu2 = torch.randn(dim, generator=gen, dtype=torch.float64)
    s1, s2 = _random_spd(dim, gen), _random_spd(dim, gen)
    cross = sqrtm((s1 @ s2).numpy()).real.trace()  # the textbook non-symmetric form
    expected = float((mu1 - mu2).square().sum() + s1.trace() + s2.trace()) - 2 * cross
    assert frechet_distance_from_statistics(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_fid_of_samples_converges_to_the_population_value():
    gen = torch.Generator().manual_seed(2)
    n, dim = 20000, 2
    a = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    b = 2.0 * torch.randn(n, dim, generator=gen, dtype=torch.float64) + torch.tensor([1.0, 0.0])
    # Population: |mu|^2 + sum (1 - 2)^2 = 1 + 2 = 3. The plug-in estimate has standard error
    # about sqrt(Var) / sqrt(n) with per-sample variance O(10) here: ~0.03; 0.15 is 5 SE.
    assert frechet_distance(a, b) == pytest.approx(3.0, abs=0.15)
    # A pure translation adds exactly |c|^2.
    assert frechet_distance(a, a + torch.tensor([3.0, 4.0], dtype=torch.float64)) == (
        pytest.approx(25.0, rel=1e-12)
    )


def test_gaussian_statistics_match_torch_cov():
    f = torch.randn(50, 4, generator=torch.Generator().manual_seed(3))
    mu, sigma = gaussian_statistics(f)
    assert torch.allclose(mu, f.double().mean(0))
    assert torch.allclose(sigma, torch.cov(f.double().T))


def test_inception_score_of_confident_uniform_predictions_is_k():
    for k in (2, 10):
        logits = 100.0 * torch.eye(k).repeat(5, 1)
        assert inception_score(logits).mean == pytest.approx(k, rel=1e-9)


def test_inception_score_of_constant_predictions_is_one():
    logits = torch.randn(1, 10, generator=torch.Generator().manual_seed(4)).repeat(64, 1)
    score = inception_score(logits, splits=4)
    assert score.mean == pytest.approx(1.0, abs=1e-12)
    assert score.std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_matches_a_naive_loop_and_splits():
    logits = 3 * torch.randn(120, 10, generator=torch.Generator().manual_seed(5))
    assert inception_score(logits).mean == pytest.approx(_naive_inception_score(logits), rel=1e-10)
    parts = [_naive_inception_score(chunk) for chunk in logits.split(40)]
    score = inception_score(logits, splits=3)
    assert score.mean == pytest.approx(sum(parts) / 3, rel=1e-10)
    assert score.std == pytest.approx(
        torch.tensor(parts, dtype=torch.float64).std(unbiased=False).item(), rel=1e-6
    )
    assert 1.0 <= score.mean <= 10.0


def test_extract_batches_selects_and_restores_training_mode():
    torch.manual_seed(0)
    model = DigitClassifier()
    model.train()
    images = torch.rand(10, 1, 16, 16, generator=torch.Generator().manual_seed(6)) * 2 - 1
    full = extract(model, images, select="features", batch_size=100)
    assert full.shape == (10, 128)
    assert torch.allclose(extract(model, images, select="features", batch_size=3), full, atol=1e-6)
    assert torch.allclose(extract(model, images, select=1, batch_size=4), full, atol=1e-6)
    assert model.training  # eval mode only during the call (dropout off inside)
    with pytest.raises(TypeError, match="select"):
        extract(model, images)
    model.eval()  # a plain callable is run as is: no mode switching for it
    logits = extract(lambda x: model(x).logits, images)
    assert logits.shape == (10, 10)
    assert is_score(model, images, select="logits").mean == pytest.approx(
        inception_score(logits).mean, rel=1e-6
    )
    assert fid_score(model, images, images, select="features") < 1e-6


def test_digit_classifier_shapes_and_round_trip(tmp_path):
    torch.manual_seed(0)
    model = DigitClassifier().eval()
    x = torch.zeros(3, 1, 16, 16)
    out = model(x)
    assert isinstance(out, ClassifierOutput)
    assert out.logits.shape == (3, 10) and out.features.shape == (3, 128)
    path = tmp_path / "clf.safetensors"
    save_file(model.state_dict(), str(path))
    loaded = DigitClassifier.from_file(path)
    assert not loaded.training
    assert torch.equal(loaded(x).logits, out.logits)
    with pytest.raises(ValueError, match="`x`"):
        model(torch.zeros(3, 1, 28, 28))
    with pytest.raises(ValueError, match="image_size"):
        DigitClassifier(image_size=18)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: inception_score(torch.zeros(0, 10)), "logits"),
        (lambda: inception_score(torch.zeros(4, 10), splits=5), "splits"),
        (lambda: gaussian_statistics(torch.zeros(1, 3)), "features"),
        (
            lambda: frechet_distance_from_statistics(
                torch.zeros(2), torch.eye(2), torch.zeros(3), torch.eye(3)
            ),
            "shapes",
        ),
        (lambda: extract(lambda x: x, torch.zeros(0, 2)), "images"),
        (lambda: extract(lambda x: x, torch.zeros(2, 2), batch_size=0), "batch_size"),
    ],
)
def test_invalid_arguments_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --- Non-finite features, bad dtypes, shapes and devices ---------------------------------------


def test_frechet_distance_of_nan_features_names_the_argument_and_count():
    """Used to raise an obscure ``_LinAlgError`` from ``eigh``."""
    bad = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    bad[[1, 4], 2] = float("nan")
    good = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match=r"`features1`.*2 of 6"):
        frechet_distance(bad, good)
    bad[1, 2] = float("inf")
    with pytest.raises(ValueError, match=r"`features2`.*2 of 6"):
        frechet_distance(good, bad)
    with pytest.raises(ValueError, match="`features`"):
        gaussian_statistics(bad)


def test_inception_score_of_nonfinite_logits_raises_with_the_count():
    """Used to return ``ScoreEstimate(nan, nan)`` with no word on why."""
    logits = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    logits[3, 0] = float("nan")
    logits[5, 1] = float("inf")
    with pytest.raises(ValueError, match=r"`logits`.*2 of 8"):
        inception_score(logits)


def test_scores_of_nan_images_name_the_images_and_the_count():
    images = torch.zeros(5, 2)
    images[0, 1] = float("nan")
    with pytest.raises(ValueError, match=r"`images`.*1 of 5"):
        is_score(lambda x: x, images)
    with pytest.raises(ValueError, match=r"`images2`.*1 of 5"):
        fid_score(lambda x: x, torch.randn(5, 2), images)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.uint8])
def test_integer_features_and_logits_raise_type_error(dtype):
    """Integer features gave FID 0.0 and integer logits (labels?) an Inception Score of 1."""
    values = torch.zeros(4, 3, dtype=dtype)
    with pytest.raises(TypeError, match="`features1`"):
        frechet_distance(values, torch.zeros(4, 3))
    with pytest.raises(TypeError, match="`logits`"):
        inception_score(values)
    with pytest.raises(TypeError, match="`sigma2`"):
        frechet_distance_from_statistics(torch.zeros(3), torch.eye(3), torch.zeros(3), values[:3])


def test_empty_feature_or_class_axis_raises():
    """Used to report FID 0.0 and IS 1.0 for nothing measured."""
    with pytest.raises(ValueError, match="`features1`"):
        frechet_distance(torch.zeros(4, 0), torch.zeros(4, 0))
    with pytest.raises(ValueError, match="`logits`"):
        inception_score(torch.zeros(4, 0))


def test_statistics_must_be_finite_symmetric_and_psd():
    eye = torch.eye(2)
    with pytest.raises(ValueError, match="`sigma1`"):  # used to return 0.0
        frechet_distance_from_statistics(torch.zeros(2), -eye, torch.zeros(2), eye)
    with pytest.raises(ValueError, match="`sigma1`"):  # used to return nan
        frechet_distance_from_statistics(torch.zeros(2), eye * math.nan, torch.zeros(2), eye)
    with pytest.raises(ValueError, match="`sigma2`"):
        frechet_distance_from_statistics(
            torch.zeros(2), eye, torch.zeros(2), torch.tensor([[1.0, 0.5], [0.0, 1.0]])
        )
    with pytest.raises(ValueError, match="`mu2`"):
        frechet_distance_from_statistics(torch.zeros(2), eye, torch.tensor([0.0, math.inf]), eye)
    with pytest.raises(ValueError, match="`mu1`"):  # used to raise from inside linalg.eigh
        frechet_distance_from_statistics(
            torch.zeros(()), torch.zeros(()), torch.zeros(()), torch.zeros(())
        )
    # A singular covariance (fewer samples than features) is fine: round-off negatives pass.
    f = torch.randn(3, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert frechet_distance(f, f) < 1e-9


def test_meta_tensors_raise_value_error():
    with pytest.raises(ValueError, match="`features1`"):
        frechet_distance(torch.zeros(4, 3, device="meta"), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="`logits`"):
        inception_score(torch.zeros(4, 3, device="meta"))
    with pytest.raises(ValueError, match="`images`"):
        extract(lambda x: x, torch.zeros(4, 3, device="meta"))


def test_extreme_but_finite_logits_give_a_finite_score():
    logits = torch.tensor([[1e300, -1e300], [-1e300, 1e300]], dtype=torch.float64)
    assert inception_score(logits).mean == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: inception_score(torch.zeros(4, 3), splits=True), TypeError, "`splits`"),
        (lambda: inception_score(torch.zeros(4, 3), splits=2.0), TypeError, "`splits`"),
        (lambda: extract(lambda x: x, torch.zeros(2, 2), batch_size=1.5), TypeError, "batch_size"),
        (lambda: extract(lambda x: x, torch.zeros(2, 2), batch_size=True), TypeError, "batch_size"),
        (lambda: extract(lambda x: x.sum(), torch.zeros(2, 2)), ValueError, "`extractor`"),
        (lambda: extract(lambda x: x[:1], torch.zeros(2, 2)), ValueError, "`extractor`"),
        (lambda: extract(lambda x: (x,), torch.zeros(2, 2), select=3), ValueError, "`select`"),
        (lambda: extract(lambda x: x, torch.zeros(2)), ValueError, "`images`"),
        (lambda: DigitClassifier()(torch.zeros(2, 1, 16, 16, dtype=torch.int64)), TypeError, "`x`"),
        (
            lambda: DigitClassifier()(torch.zeros(2, 1, 16, 16, dtype=torch.float64)),
            TypeError,
            "`x`",
        ),
        (lambda: DigitClassifier()(torch.zeros(2, 1, 16, 16, device="meta")), ValueError, "`x`"),
        (lambda: DigitClassifier()(torch.zeros(2, 1, 28, 28)), ValueError, "`x`"),
        (lambda: DigitClassifier(image_size=16.0), TypeError, "`image_size`"),
        (lambda: DigitClassifier(in_channels=True), TypeError, "`in_channels`"),
        (lambda: DigitClassifier(num_classes=0), ValueError, "`num_classes`"),
        (lambda: DigitClassifier(dropout=1.5), ValueError, "`dropout`"),
    ],
)
def test_bad_arguments_name_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_numpy_scalars_are_accepted_by_quality_metrics():
    np = pytest.importorskip("numpy")
    logits = 50.0 * torch.eye(4).repeat(2, 1)
    assert inception_score(logits, splits=np.int64(2)).mean == pytest.approx(4.0)
    assert extract(lambda x: x, torch.zeros(3, 2), batch_size=np.int64(2)).shape == (3, 2)
    assert DigitClassifier(image_size=np.int64(8), feature_dim=np.int32(4)).image_size == 8


# --- torchmetrics' FrechetInceptionDistance against the former float64 formula -----------------


def _former_frechet_distance(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """The formula ``frechet_distance`` used before torchmetrics (issue 13), in float64.

    Two-pass covariances and the symmetric cross term ``tr (S1^1/2 S2 S1^1/2)^1/2`` from ``eigh``.
    """
    f1, f2 = f1.double(), f2.double()
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1 = (f1 - mu1).T @ (f1 - mu1) / (f1.shape[0] - 1)
    s2 = (f2 - mu2).T @ (f2 - mu2) / (f2.shape[0] - 1)
    evals, evecs = torch.linalg.eigh(s1)
    root1 = (evecs * evals.clamp(min=0).sqrt()) @ evecs.T
    cross = torch.linalg.eigvalsh(root1 @ s2 @ root1).clamp(min=0).sqrt().sum()
    return max(float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * cross), 0.0)


def _rounding_bound(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """Float64 round-off bound of the distance of full-rank feature sets.

    Both formulas are backward-stable float64 eigen solves, exact up to ~F * eps relative to the
    size of the matrices they factor; torchmetrics forms its covariances in one pass
    (``sum f f^T - N mu mu^T``), so that size is the raw second moment ``|mu|^2 + tr S`` of each
    set, not ``tr S`` alone. A factor 8 covers the few roundings per entry.
    """
    scale = sum(float(f.double().square().sum(1).mean()) for f in (f1, f2))
    return 8 * f1.shape[1] * torch.finfo(torch.float64).eps * scale


@pytest.mark.parametrize(("n", "dim", "seed"), [(400, 16, 0), (1000, 128, 1), (50, 3, 2)])
def test_frechet_distance_equals_the_former_float64_formula(n, dim, seed):
    gen = torch.Generator().manual_seed(seed)
    f1 = torch.randn(n, dim, generator=gen)
    f2 = 0.7 * torch.randn(n, dim, generator=gen) @ torch.randn(dim, dim, generator=gen) / dim**0.5
    f2 = f2 + 0.3
    expected = _former_frechet_distance(f1, f2)
    assert abs(frechet_distance(f1, f2) - expected) <= _rounding_bound(f1, f2)
    assert abs(frechet_distance(f2, f1) - expected) <= _rounding_bound(f1, f2)


def test_fid_score_equals_the_former_formula_on_classifier_features():
    torch.manual_seed(0)
    model = DigitClassifier(feature_dim=8).eval()
    gen = torch.Generator().manual_seed(7)
    images1 = torch.rand(300, 1, 16, 16, generator=gen) * 2 - 1
    images2 = torch.rand(200, 1, 16, 16, generator=gen) * 1.6 - 0.8
    # The same batches as fid_score's: float32 features vary with the batch size (~1e-7).
    f1 = extract(model, images1, select="features", batch_size=64)
    f2 = extract(model, images2, select="features", batch_size=64)
    got = fid_score(model, images1, images2, select="features", batch_size=64)
    assert got == frechet_distance(f1, f2)
    # A nearly dead ReLU unit makes both covariances nearly singular: a ~0 eigenvalue of the
    # cross term comes out as round-off delta <= bound * m (m: larger raw second moment) and
    # enters through sqrt, so each of the F eigenvalues may carry sqrt(delta), doubled.
    m = max(float(f.double().square().sum(1).mean()) for f in (f1, f2))
    bound = 2 * f1.shape[1] * math.sqrt(_rounding_bound(f1, f2) * m)
    assert abs(got - _former_frechet_distance(f1, f2)) <= bound
