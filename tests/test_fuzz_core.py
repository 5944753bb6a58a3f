"""Fuzzing the core API: each input gives a finite answer of the documented shape, or a named error.

Hypothesis draws the arguments of ``make_loss`` (every method), ``loss_fn.sample`` /
``loss_fn.terms``, ``mixture_sample``, ``importance_weights``, ``NoiseSchedule`` and
``NormBalancer``: shapes (0-d, 1-D, empty batch, the documented ``(B, ...)``), dtypes (int64, bool,
float16, bfloat16, float32, float64), the meta device, special values (NaN, ±inf, 0, 1e30,
negatives) and Python / numpy scalars of the right and wrong type and range. The contract:

- a call returns values of the documented shape and dtype, finite; or
- it raises ``ValueError`` / ``TypeError`` whose message names an argument in backticks, never
  another exception from inside torch.

The one documented exception: with value checks off (the default, no host syncs), a NaN or inf
*value* in a tensor argument, or values so large that float32 squared errors overflow (|v| > 1e15
here), may give a non-finite loss. Every test also runs a share of its draws under
``siss.debug.set_validate_values(True)``, where that exception is gone: such inputs raise a named
error. Draws whose arguments are all plainly valid ("clean") must succeed, so a function that
rejected everything would fail here.

The default run is seeded (conftest's derandomized "siss" profile) and small (about 600 examples
in all, ~20 s). ``SISS_FUZZ_SCALE`` multiplies every test's example count; a nightly run::

    SISS_FUZZ_SCALE=40 HYPOTHESIS_PROFILE=default python -m pytest -q tests/test_fuzz_core.py
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from conftest import fuzz_settings
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from siss import METHODS, NoiseSchedule, NormBalancer, make_loss
from siss.debug import set_validate_values
from siss.functional import importance_weights, mixture_sample

NAMED = re.compile(r"`[A-Za-z_][A-Za-z0-9_.\[\]'\"]*`")
LARGE = 1e15  # beyond this, float32 squared errors may overflow (documented)


def outcome(call: Callable[[], Any]) -> tuple[bool, Any]:
    """``(True, result)`` or ``(False, error)`` for a named ValueError/TypeError; else re-raise."""
    try:
        return True, call()
    except (ValueError, TypeError) as error:
        assert NAMED.search(str(error)), f"error does not name an argument: {error!r}"
        return False, error


def betas_cumprod(steps: int = 50) -> torch.Tensor:
    betas = torch.linspace(1e-4, 0.2, steps, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


SCHEDULES = {
    "ddpm": lambda: betas_cumprod(),
    "ddpm-fp16": lambda: betas_cumprod().half(),
    "flow": lambda: NoiseSchedule.from_flow_sigmas(torch.linspace(0.02, 1.0, 50)),
}
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.bool)
FLOATS = DTYPES[:4]
SPECIALS = (math.nan, math.inf, -math.inf, 0.0, 1e30, -1e30, -3.0)


@st.composite
def shapes(draw: st.DrawFn) -> tuple[int, ...]:
    """Mostly ``(B, C, H, W)`` or ``(B, D)``; sometimes 0-d, 1-D or an empty batch."""
    kind = draw(st.sampled_from(["image", "image", "image", "vector", "scalar", "flat", "empty"]))
    batch = draw(st.integers(1, 4))
    if kind == "image":
        return (batch, draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    if kind == "vector":
        return (batch, draw(st.integers(1, 5)))
    if kind == "scalar":
        return ()
    if kind == "flat":
        return (batch,)
    return (0, 2)


@st.composite
def tensors(
    draw: st.DrawFn, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...] = DTYPES
) -> torch.Tensor:
    """A tensor of ``shape``: usually finite normal values, sometimes specials or odd dtypes."""
    dtype = draw(st.sampled_from(dtypes)) if draw(st.integers(0, 4)) == 0 else torch.float32
    seed = draw(st.integers(0, 2**16))
    values = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if draw(st.integers(0, 4)) == 0 and values.numel():
        special = draw(st.sampled_from(SPECIALS))
        if draw(st.booleans()):
            values.view(-1)[draw(st.integers(0, values.numel() - 1))] = special
        else:
            values = torch.full_like(values, special)
    if dtype == torch.bool:
        return values > 0
    if not dtype.is_floating_point:
        return values.nan_to_num(0.0, 0.0, 0.0).clamp(-100, 100).to(dtype)
    return values.to(dtype)


def clean_tensor(tensor: object) -> bool:
    """A documented input: a floating ``(B, ...)`` batch of finite, moderate values on the CPU."""
    return (
        isinstance(tensor, torch.Tensor)
        and tensor.is_floating_point()
        and tensor.ndim >= 2
        and tensor.shape[0] > 0
        and tensor.device.type == "cpu"
        and bool(torch.isfinite(tensor).all())
        and bool((tensor.abs() <= LARGE).all())
    )


def finite_values(tensor: object) -> bool:
    return not (isinstance(tensor, torch.Tensor) and tensor.is_floating_point()) or bool(
        torch.isfinite(tensor).all()
    )


def on_meta(draw: st.DrawFn, *tensors_: torch.Tensor) -> list[torch.Tensor]:
    if draw(st.integers(0, 9)) == 0:
        return [t.to("meta") if isinstance(t, torch.Tensor) else t for t in tensors_]
    return list(tensors_)


def lams() -> st.SearchStrategy:
    return st.one_of(
        st.sampled_from([0.5, 0.5, 0.1, 0.9, 0.0, 1.0]),
        st.sampled_from([-0.1, 1.5, math.nan, True, np.float32(0.3), np.float64(0.7), "0.5"]),
    )


def superfactors() -> st.SearchStrategy:
    return st.one_of(
        st.sampled_from([0.1, 0.1, 0.0, 2.0]),
        st.sampled_from([-1.0, math.inf, math.nan, None, np.float64(0.2), "0.1", False]),
    )


def set_sizes() -> st.SearchStrategy:
    return st.one_of(
        st.sampled_from([(None, None), (10, 2), (100, 1)]),
        st.sampled_from([(np.int64(8), np.int32(3)), (5, 5), (3, 0), (4, None), (4.0, 1.0)]),
    )


def timestep_specs(length: int = 50) -> st.SearchStrategy:
    return st.one_of(
        st.none(),
        st.integers(-2, length + 1),
        st.tuples(st.integers(-1, length), st.integers(-1, length + 1)),
        st.sampled_from([np.int64(3), (np.int64(1), np.int32(4)), 2.5, True, "10", (1, 2, 3)]),
        st.builds(
            lambda values, dtype: torch.tensor(values).to(dtype),
            st.lists(st.integers(-1, length), min_size=1, max_size=5),
            st.sampled_from([torch.int64, torch.int32, torch.float32, torch.bool]),
        ),
    )


@st.composite
def loss_problems(draw: st.DrawFn) -> dict[str, Any]:
    name = draw(st.sampled_from(METHODS))
    kwargs: dict[str, Any] = {"superfactor": draw(superfactors())}
    if name in ("siss", "siss-nois"):
        n, k = draw(set_sizes())
        kwargs.update(n=n, k=k, x_from=draw(st.sampled_from(["retain", "retain", "all", "x"])))
    if name == "siss":
        kwargs["lam"] = draw(lams())
    if draw(st.integers(0, 5)) == 0:
        kwargs["prediction_type"] = draw(
            st.sampled_from(["epsilon", "v_prediction", "sample", "flow_prediction", "score"])
        )
    if draw(st.integers(0, 5)) == 0:
        kwargs["reduction"] = draw(st.sampled_from(["mean", "sum", "none", "max"]))
    if draw(st.integers(0, 5)) == 0:
        kwargs["snr_gamma"] = draw(st.sampled_from([5.0, 1.0, 0.0, -1.0, math.nan]))
    if kwargs["superfactor"] is None:
        del kwargs["superfactor"]
    shape = draw(shapes())
    x0 = draw(tensors(shape))
    a_shape = (
        shape if draw(st.integers(0, 5)) else (draw(st.sampled_from([(1, *shape[1:]), (2, 7)])))
    )
    a0 = draw(tensors(a_shape))
    x0, a0 = on_meta(draw, x0, a0)
    if name == "naive" and draw(st.booleans()):
        a0 = None
    if name == "neggrad" and draw(st.booleans()):
        x0 = None
    return {
        "name": name,
        "schedule": draw(st.sampled_from(sorted(SCHEDULES))),
        "kwargs": kwargs,
        "x0": x0,
        "a0": a0,
        "timesteps": draw(timestep_specs()),
        "output": draw(st.sampled_from(["right", "right", "right", "values", "shape", "dtype"])),
        "output_seed": draw(st.integers(0, 2**16)),
        "weights": draw(st.sampled_from([None, None, None, "right", "wrong"])),
        "validate": draw(st.integers(0, 3)) == 0,
    }


def model_output(problem: dict[str, Any], noisy: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(problem["output_seed"])
    kind = problem["output"]
    if kind == "shape":
        return torch.randn(noisy.shape[0], 3, generator=g)
    if kind == "dtype":
        return torch.zeros(noisy.shape, dtype=torch.int64)
    out = torch.randn(noisy.shape, generator=g).to(noisy.device)
    if kind == "values":
        out.view(-1)[0] = math.nan
    return out.to(noisy.dtype if noisy.dtype.is_floating_point else torch.float32)


def expected_dtype(*tensors_: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors_) else torch.float32


@fuzz_settings(300)
@given(loss_problems())
def test_losses_sample_and_terms(problem):
    """make_loss -> sample -> terms, every method: a documented result or a named error."""
    with set_validate_values(problem["validate"]):
        built, loss_fn = outcome(
            lambda: make_loss(
                problem["name"], SCHEDULES[problem["schedule"]](), **problem["kwargs"]
            )
        )
        if not built:
            return
        if any(t is not None and t.device.type == "meta" for t in (problem["x0"], problem["a0"])):
            loss_fn = loss_fn.to("meta")
        sampled, draw = outcome(
            lambda: loss_fn.sample(
                problem["x0"],
                problem["a0"],
                timesteps=problem["timesteps"],
                generator=torch.Generator().manual_seed(0),
            )
        )
        inputs = [t for t in (problem["x0"], problem["a0"]) if t is not None]
        clean_inputs = all(clean_tensor(t) for t in inputs) and (
            problem["x0"] is None
            or problem["a0"] is None
            or problem["a0"].shape in (problem["x0"].shape, (1, *problem["x0"].shape[1:]))
        )
        if not sampled:
            assert not (clean_inputs and problem["timesteps"] is None), draw
            return
        noisy = draw.noisy
        batch = (problem["x0"] if problem["x0"] is not None else problem["a0"]).shape[0]
        assert noisy.shape[0] in (batch, 2 * batch) and noisy.dtype == inputs[0].dtype
        assert draw.timesteps.shape == (noisy.shape[0],)
        output = model_output(problem, noisy)
        weights = None
        if problem["weights"] == "right":
            weights = torch.rand(batch, generator=torch.Generator().manual_seed(1)).to(noisy.device)
        elif problem["weights"] == "wrong":
            weights = torch.ones(batch + 1)
        done, terms = outcome(lambda: loss_fn.terms(output, draw, weights=weights))
        clean_call = clean_inputs and problem["output"] == "right" and problem["weights"] != "wrong"
        if not done:
            assert not clean_call, terms
            return
    per_row = loss_fn.reduction == "none"
    for value in terms:
        assert value.shape == ((batch,) if per_row else ())
        assert value.dtype == expected_dtype(noisy, output)
    if noisy.device.type == "meta":
        return
    if problem["validate"] or (clean_inputs and problem["output"] != "values"):
        assert all(torch.isfinite(v).all() for v in terms), (problem, terms)


@st.composite
def weight_problems(draw: st.DrawFn) -> dict[str, Any]:
    shape = draw(shapes())
    batch = shape[0] if shape else 1
    noisy, x0, a0 = (draw(tensors(shape)) for _ in range(3))
    gamma = draw(tensors((batch,), (*FLOATS, torch.int64))).abs()
    sigma = draw(tensors((batch,), (*FLOATS, torch.int64))).abs()
    if draw(st.integers(0, 4)) == 0:
        sigma = -sigma
    if draw(st.integers(0, 6)) == 0:
        gamma = torch.ones(batch + 1)
    noisy, x0, a0, gamma, sigma = on_meta(draw, noisy, x0, a0, gamma, sigma)
    return {
        "noisy": noisy,
        "x0": x0,
        "a0": a0,
        "gamma": gamma,
        "sigma": sigma,
        "lam": draw(lams()),
        "max_weight": draw(st.sampled_from([1e4, 1e4, 1.0, 0.5, math.inf, np.float64(10.0)])),
        "validate": draw(st.integers(0, 3)) == 0,
    }


def _clean_rows(problem: dict[str, Any]) -> bool:
    tensors_ = [problem[k] for k in ("noisy", "x0", "a0", "gamma", "sigma")]
    return (
        all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in tensors_)
        and all(t.device.type == "cpu" and finite_values(t) for t in tensors_)
        and all(bool((t.abs() <= LARGE).all()) for t in tensors_)
        and len({t.dtype for t in tensors_[:3]}) == 1
        and tensors_[0].ndim >= 2
        and tensors_[0].shape[0] > 0
        and tensors_[3].shape == tensors_[0].shape[:1]
        and bool((tensors_[4] > 0).all())
    )


@fuzz_settings(150)
@given(weight_problems())
def test_importance_weights(problem):
    """Finite weights in [0, bound] for finite inputs of any size, or a named error."""
    kwargs = {k: v for k, v in problem.items() if k != "validate"}
    with set_validate_values(problem["validate"]):
        ok, result = outcome(lambda: importance_weights(**kwargs))
    clean = _clean_rows(problem) and type(problem["lam"]) is float and 0 <= problem["lam"] <= 1
    if not ok:
        assert not (clean and problem["max_weight"] == 1e4), result
        return
    w_x, w_a = result
    batch = problem["x0"].shape[0]
    assert w_x.shape == w_a.shape == (batch,)
    assert w_x.dtype == expected_dtype(problem["noisy"], problem["x0"], problem["a0"])
    if w_x.device.type == "meta":
        return
    if problem["validate"] or _clean_rows(problem):
        assert torch.isfinite(w_x).all() and torch.isfinite(w_a).all(), (problem, result)
        assert (w_x >= 0).all() and (w_a >= 0).all()


@fuzz_settings(100)
@given(weight_problems(), st.integers(0, 2**16))
def test_mixture_sample(problem, seed):
    kwargs = {k: problem[k] for k in ("x0", "a0", "gamma", "sigma", "lam")}
    with set_validate_values(problem["validate"]):
        ok, result = outcome(
            lambda: mixture_sample(**kwargs, generator=torch.Generator().manual_seed(seed))
        )
    if not ok:
        lam = problem["lam"]
        assert not (_clean_rows(problem) and type(lam) is float and 0 <= lam <= 1), result
        return
    noisy, from_forget = result
    assert noisy.shape == problem["x0"].shape and noisy.dtype == problem["x0"].dtype
    assert from_forget.shape == problem["x0"].shape[:1] and from_forget.dtype == torch.bool
    if noisy.device.type != "meta" and (problem["validate"] or _clean_rows(problem)):
        # finite inputs (1e30 included) give finite noisy points in float32/float64
        if problem["x0"].dtype in (torch.float32, torch.float64):
            assert torch.isfinite(noisy).all()


@fuzz_settings(80)
@given(
    st.sampled_from(["alphas_cumprod", "flow", "raw"]),
    st.sampled_from([(50,), (1,), (0,), (), (5, 2)]),
    st.sampled_from(DTYPES),
    st.sampled_from(["ok", "nan", "zero", "one", "negative", "big"]),
)
def test_noise_schedules(kind, shape, dtype, values):
    base = torch.linspace(0.99, 0.01, math.prod(shape)).reshape(shape)
    base = {
        "ok": base,
        "nan": base.clone().fill_(math.nan) if base.numel() else base,
        "zero": torch.zeros(shape),
        "one": torch.ones(shape),
        "negative": -base,
        "big": base * 1e30,
    }[values]
    base = base.to(dtype) if dtype != torch.bool else base > 0.5
    build = {
        "alphas_cumprod": lambda: NoiseSchedule.from_alphas_cumprod(base),
        "flow": lambda: NoiseSchedule.from_flow_sigmas(base),
        "raw": lambda: NoiseSchedule(base, base),
    }[kind]
    ok, schedule = outcome(build)
    if not ok:
        assert not (values == "ok" and shape == (50,) and dtype in FLOATS[:2]), schedule
        return
    assert schedule.gamma.dtype == schedule.sigma.dtype == torch.float32
    assert torch.isfinite(schedule.gamma).all() and (schedule.sigma > 0).all()


class TwoTerms(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 2)
        self.only_forget = nn.Parameter(torch.ones(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


@st.composite
def balancer_problems(draw: st.DrawFn) -> dict[str, Any]:
    mode = draw(st.sampled_from(["fix", "clip", "absolute", "bilevel", "norm"]))
    options: dict[str, Any] = {"mode": mode}
    if mode == "absolute" or draw(st.integers(0, 9)) == 0:
        options["target_norm"] = draw(st.sampled_from([0.5, 0.0, -1.0, math.nan, None]))
    for name, good, bad in (
        ("ratio", [0.1, np.float64(0.2)], [-1.0, math.inf, "0.1"]),
        ("every", [1, 3], [0, 2.5, True]),
        ("eps", [1e-12], [0.0, -1.0, math.nan]),
        ("floor", [1e-7, 0.0], [-1.0, math.inf]),
        ("eta", [0.1], [-0.5]),
    ):
        if draw(st.integers(0, 3)) == 0:
            options[name] = draw(st.sampled_from(good + bad))
    return {
        "params": draw(st.sampled_from(["list", "generator", "tensor", "mixed", "empty"])),
        "options": options,
        "keep": draw(st.sampled_from(["ok", "ok", "nan", "vector", "no-grad", "zero", "tiny"])),
        "forget": draw(st.sampled_from(["ok", "ok", "nan", "inf", "zero", "tiny", "huge"])),
        "steps": draw(st.integers(1, 4)),
        "seed": draw(st.integers(0, 2**16)),
    }


@fuzz_settings(150)
@given(balancer_problems())
def test_norm_balancer(problem):
    """Every step leaves .grad finite or None (skipped): no NaN ever reaches the optimizer."""
    torch.manual_seed(problem["seed"])
    model = TwoTerms()
    params = {
        "list": lambda: list(model.parameters()),
        "generator": model.parameters,
        "tensor": lambda: model.layer.weight,
        "mixed": lambda: [model.layer.weight, "bias"],
        "empty": lambda: [],
    }[problem["params"]]()
    ok, balancer = outcome(lambda: NormBalancer(params, **problem["options"]))
    if not ok:
        return
    x = torch.randn(4, 3)
    for _ in range(problem["steps"]):
        out = model(x)
        keep = {
            "ok": out.square().mean(),
            "nan": out.square().mean() * math.nan,
            "vector": out.square().mean(1),
            "no-grad": torch.tensor(1.0),
            "zero": out.sum() * 0,
            "tiny": out.square().mean() * 1e-30,
        }[problem["keep"]]
        forget_value = out.sin().mean() + model.only_forget.sum()
        forget = {
            "ok": forget_value,
            "nan": forget_value * math.nan,
            "inf": forget_value * math.inf,
            "zero": forget_value * 0,
            "tiny": forget_value * 1e-13,
            "huge": forget_value * 1e30,
        }[problem["forget"]]
        done, error = outcome(lambda keep=keep, forget=forget: balancer.backward(keep, forget))
        if not done:
            assert problem["keep"] in ("vector", "no-grad"), error
            return
        stats = balancer.step()
        assert isinstance(stats.skipped, bool) and isinstance(stats.measured, bool)
        for p in model.parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), (problem, stats)
        if stats.skipped:
            assert all(p.grad is None for p in model.parameters())
        else:
            assert torch.isfinite(stats.coefficient)
        held = balancer.coefficient
        assert held is None or torch.isfinite(held)
        model.zero_grad(set_to_none=True)
