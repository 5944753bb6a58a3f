"""Fuzzing the public metrics API: every call is measured or says why not.

Hypothesis draws tensors over shapes (0-d, 1-D, empty axes, the documented ones), dtypes
(int64, bool, float16, bfloat16, float32, float64), the meta device and special values (NaN,
±inf, 0, ±1e30, negatives, at a few entries or over whole rows), plus Python / numpy scalars of
the right and wrong type and range. For every call the contract is:

- it returns finite values of the documented shape and dtype, or
- it raises ``ValueError`` / ``TypeError`` whose message names one of its arguments in
  backticks -- never another exception from inside torch, scipy or torchdiffeq.

NaN results are allowed only where the docstring documents them with a count: the rate of
:func:`generation_rate` (with ``RateEstimate.nonfinite``), the distances of non-finite rows of
:func:`l2_distances`, and the pass-through of :func:`extract` and :class:`DigitClassifier` on
non-finite inputs. Each test also marks the draws whose inputs are all plainly valid ("clean")
and requires those to succeed, so rejecting everything does not pass.

The default run is seeded (conftest's derandomized "siss" profile) and small (about 250
examples in all). Scale it with ``SISS_FUZZ_SCALE`` (a multiplier of every test's example
count), e.g. for a nightly run with fresh random draws::

    SISS_FUZZ_SCALE=40 HYPOTHESIS_PROFILE=default \
        python -m pytest -q tests/metrics/test_fuzz_metrics.py
"""

from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Real
from typing import Any

import numpy as np
import pytest
import torch
from conftest import fuzz_settings
from hypothesis import event, given
from hypothesis import strategies as st

from siss.metrics import (
    ClassifierOutput,
    DigitClassifier,
    RateEstimate,
    ScoreEstimate,
    VPSchedule,
    bits_per_dim,
    default_threshold,
    extract,
    fid_score,
    frechet_distance,
    frechet_distance_from_statistics,
    gaussian_statistics,
    generation_rate,
    inception_score,
    is_score,
    l2_distances,
    log_likelihood,
    proportion_ci,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# --- Strategies -------------------------------------------------------------------------------
#
# Every test draws ``valid``: a valid draw takes each argument from its documented domain
# (finite extremes such as 0, ±1e30 and negatives included), a fuzzy draw mixes in wrong
# shapes, dtypes, devices, non-finite values and scalars of the wrong type or range. Half the
# examples are then close enough to a real call to check the answer, not only the error.

FINITE_SPECIALS = (0.0, 1e30, -1e30, -1.0)
SPECIALS = (math.nan, math.inf, -math.inf, *FINITE_SPECIALS)
FLOATS = (torch.float32, torch.float64)
ALL_DTYPES = (*FLOATS, *FLOATS, torch.float16, torch.bfloat16, torch.int64, torch.bool)
BAD_INTS = (-1, 0, 2.0, True, "2", None, math.nan)
BAD_REALS = (math.nan, math.inf, -math.inf, -1.0, 0.0, 1.0, True, "1", None, 1e30)

any_shape = st.lists(st.integers(0, 4), min_size=0, max_size=4).map(tuple)


@st.composite
def tensors(
    draw: st.DrawFn,
    shape: st.SearchStrategy[tuple[int, ...]] | tuple[int, ...],
    *,
    valid: bool,
    dtypes: tuple[torch.dtype, ...] = FLOATS,
    low: float = 0.0,
    high: float = 1.0,
    nonfinite: bool = False,
) -> torch.Tensor:
    """A tensor of uniform values in ``[low, high)`` with special values at a few entries or
    over whole rows (a diverged model's samples).

    A valid tensor has one of ``dtypes``, lives on the CPU and holds finite specials only
    (non-finite ones too if ``nonfinite``); otherwise any dtype, now and then the meta device,
    and any special value.
    """
    if not isinstance(shape, tuple):
        shape = draw(shape)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    values = low + (high - low) * torch.rand(shape, generator=gen, dtype=torch.float64)
    specials = FINITE_SPECIALS if valid and not nonfinite else SPECIALS
    if values.numel():
        flat = values.view(-1)
        for _ in range(draw(st.sampled_from((0, 0, 0, 1, 2, 3)))):
            flat[draw(st.integers(0, flat.numel() - 1))] = draw(st.sampled_from(specials))
        if values.dim() >= 1:
            rows = draw(st.sampled_from((0, 0, 0, 0, 1, values.shape[0])))
            values[:rows] = draw(st.sampled_from(specials))
    dtype = draw(st.sampled_from(dtypes if valid else ALL_DTYPES))
    if dtype is torch.bool:
        tensor = values != 0
    elif not dtype.is_floating_point:
        tensor = torch.nan_to_num(values, nan=0.0, posinf=1e9, neginf=-1e9).clamp(-1e9, 1e9)
        tensor = tensor.round().to(dtype)
    else:
        tensor = values.to(dtype)
    if not valid and draw(st.integers(0, 9)) == 0:
        tensor = tensor.to("meta")
    return tensor


def shapes(valid: bool, good: st.SearchStrategy) -> st.SearchStrategy[tuple[int, ...]]:
    """Documented shapes, or in a fuzzy draw also any shape (0-d, 1-D, empty axes)."""
    return good if valid else st.one_of(good, any_shape)


def arg(data: st.DataObject, valid: bool, good: st.SearchStrategy, bad: tuple = ()) -> Any:
    """An argument from ``good``, or in a fuzzy draw sometimes one of ``bad``."""
    if valid or not bad:
        return data.draw(good)
    return data.draw(st.one_of(good, st.sampled_from(bad)))


def ints(low: int, high: int) -> st.SearchStrategy[int]:
    """Ints in ``[low, high]``, Python or numpy."""
    good = st.integers(low, high)
    return st.one_of(good, good.map(np.int64))


def reals(low: float, high: float) -> st.SearchStrategy[float]:
    """Reals in ``[low, high]``, Python or numpy (float32 may round onto an end)."""
    good = st.floats(low, high)
    return st.one_of(good, good.map(np.float64), good.map(np.float32))


# --- Oracles ----------------------------------------------------------------------------------


def outcome(call: Callable[[], Any], names: tuple[str, ...]) -> tuple[Any, Exception | None]:
    """Runs ``call``; a ``ValueError`` / ``TypeError`` must name one of ``names`` in backticks.

    Any other exception propagates and fails the test.
    """
    try:
        return call(), None
    except (ValueError, TypeError) as err:
        message = str(err)
        assert any(f"`{name}`" in message for name in names), (
            f"{type(err).__name__} names none of {names}: {message}"
        )
        return None, err


def usable(t: object, dtypes: tuple[torch.dtype, ...] | None = None) -> bool:
    """A tensor holding finite values (of a floating dtype, or one of ``dtypes``)."""
    if not isinstance(t, torch.Tensor) or t.is_meta:
        return False
    if not (t.dtype in dtypes if dtypes else t.is_floating_point()):
        return False
    return bool(torch.isfinite(t).all())


def real_in(value: object, low: float, high: float, *, open_: bool = True) -> bool:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        return False
    return low < value < high if open_ else low <= value <= high


def int_in(value: object, low: int, high: float = math.inf) -> bool:
    return (
        isinstance(value, (int, np.integer))
        and not isinstance(value, bool)
        and (low <= value <= high)
    )


def finite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)


def row_nonfinite(t: torch.Tensor) -> torch.Tensor:
    return ~torch.isfinite(t.double()).flatten(1).all(1)


def must_succeed(clean: bool, err: Exception | None) -> None:
    """Plainly valid inputs must not raise (an event records the mix, see
    ``--hypothesis-show-statistics``)."""
    event(f"{'clean' if clean else 'unclean'} input, {'raised' if err else 'returned'}")
    assert not (clean and err is not None), f"plainly valid inputs raised {err!r}"


# --- Generation rate --------------------------------------------------------------------------

image_batches = st.one_of(
    st.tuples(st.integers(1, 6), st.integers(1, 2), st.integers(1, 4), st.integers(1, 4)),
    st.tuples(st.integers(1, 6), st.integers(1, 5)),
)
RATE_DTYPES = (*FLOATS, torch.float16, torch.bfloat16)


def draw_images(data: st.DataObject, valid: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, *S)`` samples (non-finite rows are a documented input) and a target."""
    samples = data.draw(
        tensors(shapes(valid, image_batches), valid=valid, dtypes=RATE_DTYPES, nonfinite=True)
    )
    if (
        samples.is_floating_point()
        and not samples.is_meta
        and samples.dim() >= 2
        and samples.numel()
    ):
        # A diverged model: some samples NaN or inf, in one pixel or all of them.
        rows = data.draw(st.lists(st.integers(0, samples.shape[0] - 1), max_size=3))
        pixels = slice(None) if data.draw(st.booleans()) else 0
        samples.view(samples.shape[0], -1)[rows, pixels] = data.draw(
            st.sampled_from((math.nan, math.inf, -math.inf))
        )
    image = tuple(samples.shape[1:])
    target_shape = data.draw(
        st.sampled_from((image, image, (1, *image), None if not valid else image))
    )
    target = data.draw(tensors(any_shape if target_shape is None else target_shape, valid=valid))
    return samples, target


def images_fit(samples: torch.Tensor, target: torch.Tensor) -> bool:
    shape_ok = samples.dim() >= 2 and math.prod(samples.shape[1:]) > 0
    return shape_ok and target.shape in (samples.shape[1:], (1, *samples.shape[1:]))


@fuzz_settings(45)
@given(valid=st.booleans(), data=st.data())
def test_fuzz_generation_rate(valid, data):
    samples, target = draw_images(data, valid)
    threshold = arg(data, valid, st.one_of(st.none(), reals(0.01, 10.0)), BAD_REALS)
    confidence = arg(data, valid, st.one_of(st.just(0.95), reals(0.5, 0.999)), BAD_REALS)
    method = arg(data, valid, st.sampled_from(("exact", "wilson")), ("normal", 1))
    on_nonfinite = arg(data, valid, st.sampled_from(("nan", "nan", "exclude")), ("raise", "x"))
    names = ("samples", "target", "threshold", "confidence", "method", "on_nonfinite")
    est, err = outcome(
        lambda: generation_rate(
            samples,
            target,
            threshold,
            confidence=confidence,
            method=method,
            on_nonfinite=on_nonfinite,
        ),
        names,
    )
    clean = (
        usable(target)
        and samples.is_floating_point()
        and not samples.is_meta
        and samples.shape[:1] != (0,)
        and images_fit(samples, target)
        and (threshold is None or real_in(threshold, 0.0, math.inf))
        and real_in(confidence, 0.0, 1.0)
        and method in ("exact", "wilson")
        and on_nonfinite in ("nan", "exclude")
    )
    must_succeed(clean, err)
    if err is not None:
        return
    assert isinstance(est, RateEstimate)
    event(f"rate measured: {math.isfinite(est.rate)}, non-finite samples: {est.nonfinite > 0}")
    bad = row_nonfinite(samples)
    assert est.nonfinite == int(bad.sum()) and est.total == samples.shape[0] - est.nonfinite
    assert 0 <= est.count <= est.total
    # The count against an independent float64 distance (the inputs are at most 1e30: no
    # overflow); ties within round-off of the threshold may go either way.
    thr = default_threshold(samples.shape[1:]) if threshold is None else float(threshold)
    dist = (samples.double() - target.double().reshape(samples.shape[1:])).flatten(1).norm(dim=1)
    assert int((~bad & (dist < thr * (1 - 1e-9))).sum()) <= est.count
    assert est.count <= int((~bad & (dist < thr * (1 + 1e-9))).sum())
    if est.total == 0 or (est.nonfinite > 0 and on_nonfinite == "nan"):
        # Not measured: never a 0 (perfect unlearning), and the count says why.
        assert math.isnan(est.rate) and math.isnan(est.low) and math.isnan(est.high)
    else:
        assert finite(est.rate, est.low, est.high)
        assert est.rate == est.count / est.total
        assert 0.0 <= est.low <= est.rate <= est.high <= 1.0


@fuzz_settings(20)
@given(valid=st.booleans(), data=st.data())
def test_fuzz_l2_distances(valid, data):
    samples, target = draw_images(data, valid)
    dist, err = outcome(lambda: l2_distances(samples, target), ("samples", "target"))
    floating = samples.is_floating_point() and not samples.is_meta
    must_succeed(floating and usable(target) and images_fit(samples, target), err)
    if err is None:
        assert dist.shape == samples.shape[:1] and dist.dtype == torch.float64
        # Non-finite distances exactly in the rows holding non-finite values (documented).
        expected = row_nonfinite(samples) | (not bool(torch.isfinite(target).all()))
        assert torch.equal(~torch.isfinite(dist), expected)
        assert bool((dist[~expected] >= 0).all())


@fuzz_settings(20)
@given(valid=st.booleans(), data=st.data())
def test_fuzz_proportion_ci(valid, data):
    total = arg(data, valid, ints(1, 50), BAD_INTS)
    count = arg(data, valid, ints(0, total) if int_in(total, 1) else ints(0, 50), BAD_INTS)
    confidence = arg(data, valid, reals(0.5, 0.999), BAD_REALS)
    method = arg(data, valid, st.sampled_from(("exact", "wilson")), ("normal", None))
    names = ("count", "total", "confidence", "method")
    ci, err = outcome(
        lambda: proportion_ci(count, total, confidence=confidence, method=method), names
    )
    clean = int_in(total, 1) and int_in(count, 0, total) and real_in(confidence, 0.0, 1.0)
    must_succeed(clean and method in ("exact", "wilson"), err)
    if err is None:
        low, high = ci
        assert finite(low, high) and 0.0 <= low <= count / total <= high <= 1.0


@fuzz_settings(15)
@given(valid=st.booleans(), data=st.data())
def test_fuzz_default_threshold(valid, data):
    good = st.one_of(
        st.lists(ints(1, 64), max_size=4).map(tuple),
        st.lists(st.integers(1, 64), min_size=1, max_size=3).map(torch.Size),
    )
    image_shape = arg(
        data,
        valid,
        good,
        ((0, 4), (-1, -2), (1.5, 2), (True, 2), 784, "1x28x28", None),
    )
    value, err = outcome(lambda: default_threshold(image_shape), ("image_shape",))
    clean = isinstance(image_shape, tuple) and all(int_in(s, 1) for s in image_shape)
    must_succeed(clean, err)
    if err is None:
        assert finite(value) and value > 0


# --- Quality scores ---------------------------------------------------------------------------

feature_shapes = st.tuples(st.integers(2, 6), st.integers(1, 4))
QUALITY_DTYPES = (*FLOATS, torch.float16, torch.bfloat16)


def features(data: st.DataObject, valid: bool, shape: Any = None, **kwargs) -> torch.Tensor:
    shape = shapes(valid, feature_shapes) if shape is None else shape
    return data.draw(tensors(shape, valid=valid, dtypes=QUALITY_DTYPES, **kwargs))


@fuzz_settings(25)
@given(valid=st.booleans(), data=st.data())
def test_fuzz_inception_score(valid, data):
    logits = features(data, valid, low=-5.0, high=5.0)
    splits = arg(data, valid, ints(1, 2), BAD_INTS)
    score, err = outcome(lambda: inception_score(logits, splits=splits), ("logits", "splits"))
    clean = usable(logits) and logits.dim() == 2 and logits.shape[1] > 0
    clean = clean and int_in(splits, 1, logits.shape[0])
    must_succeed(clean, err)
    if err is None:
        assert isinstance(score, ScoreEstimate) and finite(*score)
        assert 1.0 - 1e-9 <= score.mean <= logits.shape[1] * (1 + 1e-9) and score.std >= 0.0


def frechet_ready(f: torch.Tensor) -> bool:
    return usable(f) and f.dim() == 2 and f.shape[0] >= 2 and f.shape[1] > 0


@fuzz_settings(25)
@given(valid=st.booleans(), data=st.data())
def test_fuzz_frechet_distance_and_statistics(valid, data):
    features1 = features(data, valid, low=-2.0, high=2.0)
    same = (data.draw(st.integers(2, 6)), features1.shape[-1] if features1.dim() else 1)
    features2 = features(data, valid, same if valid else None, low=-2.0, high=2.0)
    stats, err = outcome(lambda: gaussian_statistics(features1), ("features",))
    must_succeed(frechet_ready(features1), err)
    if err is None:
        mu, sigma = stats
        size = features1.shape[1]
        assert mu.shape == (size,) and sigma.shape == (size, size)
        assert mu.dtype == sigma.dtype == torch.float64
        assert usable(mu) and usable(sigma)
        # A set against itself is at distance 0, up to the round-off of the eigen solves.
        self_distance = frechet_distance(features1, features1)
        assert 0.0 <= self_distance <= 1e-6 * size * (1.0 + float(sigma.trace()))
    value, err = outcome(lambda: frechet_distance(features1, features2), ("features1", "features2"))
    clean = frechet_ready(features1) and frechet_ready(features2)
    must_succeed(clean and features2.shape[1] == features1.shape[1], err)
    if err is None:
        assert finite(value) and value >= 0.0


def psd(s: torch.Tensor) -> bool:
    s = s.double()
    scale = 1 + float(s.abs().max())
    return torch.equal(s, s.T) and float(torch.linalg.eigvalsh(s)[0]) >= -1e-6 * scale


@fuzz_settings(20)
@given(valid=st.booleans(), data=st.data())
def test_fuzz_frechet_distance_from_statistics(valid, data):
    size = data.draw(st.integers(1 if valid else 0, 4))
    stats = []
    for shape in ((size,), (size, size), (size,), (size, size)):
        value = features(
            data, valid, shape if valid else shapes(False, st.just(shape)), low=-1.0, high=1.0
        )
        if value.dim() == 2 and value.is_floating_point() and not value.is_meta:
            if valid or data.draw(st.booleans()):  # A A^T: symmetric positive semi-definite
                value = (value.double() @ value.double().T).to(value.dtype)
        stats.append(value)
    mu1, sigma1, mu2, sigma2 = stats
    value, err = outcome(
        lambda: frechet_distance_from_statistics(*stats), ("mu1", "sigma1", "mu2", "sigma2")
    )
    clean = mu1.dim() == 1 and mu1.shape[0] > 0 and all(usable(t) for t in stats)
    clean = clean and mu2.shape == mu1.shape and sigma1.shape == sigma2.shape == (size, size)
    must_succeed(clean and psd(sigma1) and psd(sigma2), err)
    if err is None:
        assert finite(value) and value >= 0.0


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1)


EXTRACTORS: dict[str, tuple[Callable, Any]] = {
    # name: (extractor, the select that picks its tensor)
    "identity": (_identity, None),
    "tuple": (lambda x: (x.flatten(1), x), 0),
    "named": (lambda x: ClassifierOutput(x.flatten(1), x.flatten(1)), "logits"),
    "scalar": (lambda x: x.sum(), None),
    "wrong_batch": (lambda x: x[:1].flatten(1), None),
    "list": (lambda x: x.tolist(), None),
}


@fuzz_settings(30)
@given(valid=st.booleans(), data=st.data())
def test_fuzz_extract_is_and_fid(valid, data):
    kind = data.draw(
        st.sampled_from(("identity", "tuple", "named") if valid else sorted(EXTRACTORS))
    )
    extractor, select = EXTRACTORS[kind]
    select = arg(data, valid, st.just(select), (None, 5, "nope"))
    batch_size = arg(data, valid, ints(1, 4), BAD_INTS)
    splits = arg(data, valid, ints(1, 2), BAD_INTS)
    # Extractors take any dtype; the identity turns every one into float32 features.
    images1 = data.draw(tensors(shapes(valid, feature_shapes), valid=valid, dtypes=ALL_DTYPES))
    images2 = data.draw(tensors(shapes(valid, feature_shapes), valid=valid, dtypes=ALL_DTYPES))
    good = kind in ("identity", "tuple", "named") and select == EXTRACTORS[kind][1]
    good = good and int_in(batch_size, 1)

    def ready(images: torch.Tensor, rows: int) -> bool:
        shape_ok = images.dim() == 2 and images.shape[0] >= rows and images.shape[1] > 0
        return shape_ok and not images.is_meta

    names = ("extractor", "images", "select", "batch_size")
    feats, err = outcome(
        lambda: extract(extractor, images1, select=select, batch_size=batch_size), names
    )
    must_succeed(good and ready(images1, 1), err)
    if err is None:
        assert feats.shape == (images1.shape[0], math.prod(images1.shape[1:]))
        assert feats.dtype == torch.float32 and feats.device.type == "cpu"
        # Values pass through (documented): finite images give finite features.
        if not images1.is_floating_point() or bool(torch.isfinite(images1.float()).all()):
            assert bool(torch.isfinite(feats).all())

    score, err = outcome(
        lambda: is_score(extractor, images1, select=select, splits=splits, batch_size=batch_size),
        (*names, "splits"),
    )
    finite1 = ready(images1, 1) and bool(torch.isfinite(images1.float()).all())
    must_succeed(good and finite1 and int_in(splits, 1, images1.shape[0]), err)
    if err is None:
        assert isinstance(score, ScoreEstimate) and finite(*score) and score.mean >= 1.0 - 1e-9

    value, err = outcome(
        lambda: fid_score(extractor, images1, images2, select=select, batch_size=batch_size),
        ("extractor", "images1", "images2", "select", "batch_size"),
    )
    clean = good and finite1 and ready(images1, 2) and ready(images2, 2)
    clean = clean and bool(torch.isfinite(images2.float()).all())
    must_succeed(clean and images2.shape[1] == images1.shape[1], err)
    if err is None:
        assert finite(value) and value >= 0.0


@fuzz_settings(15)
@given(valid=st.booleans(), data=st.data())
def test_fuzz_digit_classifier(valid, data):
    image_size = arg(data, valid, st.sampled_from((4, 8, np.int64(4))), (6, 0, 8.0, True))
    in_channels = arg(data, valid, ints(1, 2), BAD_INTS)
    num_classes = arg(data, valid, ints(1, 3), BAD_INTS)
    dropout = arg(data, valid, reals(0.0, 1.0), (1.5, -0.1, math.nan, True, "0.1"))
    names = ("image_size", "in_channels", "num_classes", "feature_dim", "dropout")
    model, err = outcome(
        lambda: DigitClassifier(
            image_size, in_channels, num_classes, feature_dim=8, dropout=dropout
        ).eval(),
        names,
    )
    clean = int_in(image_size, 4) and image_size % 4 == 0 and int_in(in_channels, 1)
    clean = clean and int_in(num_classes, 1) and real_in(dropout, 0.0, 1.0, open_=False)
    must_succeed(clean, err)
    if err is not None:
        return
    good_shape = st.tuples(
        st.integers(0, 3), st.just(in_channels), st.just(image_size), st.just(image_size)
    )
    x = data.draw(
        tensors(shapes(valid, good_shape), valid=valid, dtypes=(torch.float32,), low=-1.0)
    )
    out, err = outcome(lambda: model(x), ("x",))
    shape_ok = x.dim() == 4 and tuple(x.shape[1:]) == (in_channels, image_size, image_size)
    must_succeed(usable(x, (torch.float32,)) and shape_ok, err)
    if err is None:
        assert isinstance(out, ClassifierOutput)
        assert out.logits.shape == (x.shape[0], num_classes)
        assert out.features.shape == (x.shape[0], 8)
        if usable(x):
            assert bool(torch.isfinite(out.logits).all())


# --- Likelihood -------------------------------------------------------------------------------


def _ddpm(num_steps: int = 1000) -> torch.Tensor:
    return torch.cumprod(1 - torch.linspace(1e-4, 0.02, num_steps, dtype=torch.float64), 0)


AC = _ddpm()
_VP = VPSchedule(AC)


def _exact_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Noise prediction of N(0, I) data: the flow is constant, so a solve takes a few steps."""
    return _VP.sigma(t[:1] / 999).to(x.dtype) * x


EPS_MODELS: dict[str, Callable] = {
    "exact": _exact_eps,
    "half": lambda x, t: 0.5 * x,  # a non-trivial divergence, still a valid model
    "nan": lambda x, t: x * math.nan,  # a diverged model
    "first_row": lambda x, t: x[:1],
    "list": lambda x, t: x.tolist(),
    "huge": lambda x, t: x * 0 + 1e38,
}
SCHEDULES = {"ddpm": AC, "increasing": AC.flip(0), "meta": AC.to("meta"), "short": AC[:1]}


@fuzz_settings(30)
@given(valid=st.booleans(), data=st.data())
def test_fuzz_likelihood(valid, data):
    which = data.draw(st.sampled_from(("bits_per_dim", "bits_per_dim", "log_likelihood")))
    model = arg(data, valid, st.sampled_from(("exact", "exact", "half")), tuple(EPS_MODELS))
    good_x = st.tuples(st.integers(1, 3), st.just(1), st.integers(1, 2))
    x = data.draw(tensors(shapes(valid, good_x), valid=valid, low=-1.0))
    schedule = arg(data, valid, st.just("ddpm"), tuple(SCHEDULES))
    num_probes = arg(data, valid, ints(1, 2), BAD_INTS)
    tol = arg(data, valid, st.one_of(st.just(1e-3), reals(1e-4, 1e-2)), BAD_REALS)
    method = arg(data, valid, st.sampled_from(("dopri5", "bosh3")), ("euler", "rk4", "nope", 3))
    t_eps = arg(data, valid, st.one_of(st.just(1e-3), reals(1e-5, 1e-2)), BAD_REALS)
    common = {
        "num_probes": num_probes,
        "rtol": tol,
        "atol": tol,
        "method": method,
        "t_eps": t_eps,
        "generator": torch.Generator().manual_seed(0),
    }
    names = ("eps_model", "x", "alphas_cumprod", "num_probes", "rtol", "atol", "method", "t_eps")
    eps_model, alphas_cumprod = EPS_MODELS[model], SCHEDULES[schedule]
    if which == "bits_per_dim":
        data_range = arg(
            data,
            valid,
            st.sampled_from(((-1.0, 1.0), (0, 1), (np.float64(-1), 1))),
            ((1.0, -1.0), (0.0, math.inf), (0.0,), None),
        )
        num_bins = arg(data, valid, st.one_of(st.just(256), st.none(), ints(2, 256)), BAD_INTS)
        # dequantize without num_bins is an error; only fuzzy draws ask for it.
        dequantize = data.draw(st.booleans()) and (num_bins is not None or not valid)
        extra = {"data_range": data_range, "num_bins": num_bins, "dequantize": dequantize}
        result, err = outcome(
            lambda: bits_per_dim(eps_model, x, alphas_cumprod, **common, **extra),
            (*names, "data_range", "num_bins", "dequantize"),
        )
        extra_ok = data_range in ((-1.0, 1.0), (0, 1)) and (num_bins is None or int_in(num_bins, 2))
        extra_ok = extra_ok and not (dequantize and num_bins is None)
    else:
        result, err = outcome(lambda: log_likelihood(eps_model, x, alphas_cumprod, **common), names)
        extra_ok = True
    clean = (
        extra_ok
        and model in ("exact", "half")
        and usable(x, FLOATS)
        and x.dim() >= 2
        and x.numel() > 0
        and schedule == "ddpm"
        and int_in(num_probes, 1)
        and real_in(tol, 0.0, 1.0)
        and method in ("dopri5", "bosh3")
        and real_in(t_eps, 0.0, 1.0)
    )
    must_succeed(clean, err)
    if err is None:
        assert result.shape == x.shape[:1] and result.dtype == torch.float64
        assert bool(torch.isfinite(result).all())


@fuzz_settings(15)
@given(valid=st.booleans(), data=st.data())
def test_fuzz_vp_schedule(valid, data):
    good = st.one_of(
        st.integers(2, 20).map(_ddpm),
        st.just([0.9, 0.5]),
        tensors((5,), valid=True, low=0.01, high=0.99).map(
            lambda t: t.clamp(0.01, 0.99).sort(descending=True).values
        ),
    )
    alphas_cumprod = (
        data.draw(good)
        if valid
        else data.draw(
            st.one_of(good, tensors(any_shape, valid=False), st.sampled_from(("abc", None)))
        )
    )
    schedule, err = outcome(lambda: VPSchedule(alphas_cumprod), ("alphas_cumprod",))
    ac = torch.as_tensor(alphas_cumprod) if isinstance(alphas_cumprod, list) else alphas_cumprod
    clean = isinstance(ac, torch.Tensor) and not ac.is_meta and ac.dim() == 1
    clean = clean and ac.numel() >= 2 and ac.is_floating_point()
    clean = clean and bool(((ac > 0) & (ac < 1)).all()) and bool((ac[1:] <= ac[:-1]).all())
    must_succeed(clean, err)
    if err is not None:
        return
    t = data.draw(
        st.one_of(
            tensors(shapes(valid, any_shape), valid=valid, low=-0.5, high=1.5), st.floats(0, 1)
        )
        if valid
        else st.one_of(tensors(any_shape, valid=False), st.sampled_from((math.nan, math.inf)))
    )
    t_shape = t.shape if isinstance(t, torch.Tensor) else ()
    clean_t = usable(t) if isinstance(t, torch.Tensor) else math.isfinite(t)
    for fn in (schedule.beta, schedule.log_alpha_cumprod, schedule.sigma):
        value, err = outcome(lambda fn=fn: fn(t), ("t",))
        must_succeed(clean_t, err)
        if err is None:
            assert value.shape == t_shape and value.dtype == torch.float64
            assert bool(torch.isfinite(value).all())
