"""Hypothesis fuzz of the adapters' entry points: results keeping their promises, or named errors.

Contract, for ``schedule_from_scheduler``, ``prediction_type_from_scheduler``,
``loss_from_scheduler``, ``adapter_for``, ``trainable_parameters``, ``ModelAdapter.loss`` (tiny
``UNet2DModel`` and ``UNet2DConditionModel``) and ``encode_latents``: every call either returns
finite values with the documented shapes and dtypes, or raises ``ValueError``/``TypeError`` whose
message names an argument that was actually bad (never an ``IndexError``, ``AttributeError`` or
``RuntimeError`` from inside torch or diffusers, never a silent NaN from finite inputs).

Each strategy draws a value together with whether it is bad, so a call with only good arguments
must succeed and a call with bad ones must name one of them. Non-finite input VALUES (NaN, inf)
and finite ones large enough to overflow float32 inside the model (1e30) may propagate to a NaN
loss by design; they are asserted only under ``siss.debug.set_validate_values(True)``, which
must turn them into a named ``ValueError``.

Core defects found by this fuzz (fixed in ``siss/``) are pinned at the end (``CORE_FINDS``): each
calls the core directly and must get a named error.

The tiny models are built once per module; the whole file runs in ~10-20 s on 2 cores.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass, field
from typing import Any

import diffusers
import numpy as np
import pytest
import torch
from conftest import fuzz_settings, tiny_conditional_unet, tiny_unet
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
    UNet2DConditionModel,
    UNet2DModel,
)
from hypothesis import assume, event, given
from hypothesis import strategies as st

import siss
from siss import NegGradLoss, NoiseSchedule, SISSLoss, UnlearningLoss
from siss.adapters import (
    UNet2DAdapter,
    UNet2DConditionAdapter,
    adapter_for,
    encode_latents,
    loss_from_scheduler,
    prediction_type_from_scheduler,
    schedule_from_scheduler,
    trainable_parameters,
)
from siss.adapters.schedulers import FLOW_SCHEDULERS, VP_SCHEDULERS
from siss.functional import PREDICTION_TYPES

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]

NAMED = (ValueError, TypeError)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models on 2 busy cores: two OpenMP threads spin-wait (100x slower), one does not."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _named(error: BaseException, names: set[str]) -> None:
    """``error`` is a ValueError/TypeError whose message names one of ``names``."""
    assert isinstance(error, NAMED), f"{type(error).__name__}: {error}"
    message = str(error)
    assert any(name in message for name in names), (
        f"{type(error).__name__} names none of {sorted(names)}: {message}"
    )


def _call(fn, bad: set[str]):
    """Run ``fn``: it must succeed when nothing is ``bad``, else raise an error naming a bad one."""
    try:
        result = fn()
    except NAMED as error:
        assert bad, f"good arguments raised {type(error).__name__}: {error}"
        _named(error, bad)
        event(f"{type(error).__name__} naming one of {sorted(bad)}")
        return None
    assert not bad, f"bad {sorted(bad)} accepted, returned {type(result).__name__}"
    event("returned")
    return result


def _finite(*tensors: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


# --------------------------------------------------------------------------------- schedulers


@dataclass
class SchedulerCase:
    scheduler: Any
    kind: str  # "vp" or "flow"
    bad: set[str] = field(default_factory=set)  # {"scheduler"} when its training grid is invalid
    edited: bool = False  # config edited after construction


FLOATS = [1e-4, 0.0, -0.1, 0.02, 0.5, 1.0, 2.0, math.nan, math.inf, 1e-30]


def _vp_bad(betas: torch.Tensor) -> bool:
    b = betas.double()
    if not (torch.isfinite(b).all() and (b > 0).all() and (b <= 1).all()):
        return True
    return not bool(torch.cumprod(1 - b, 0)[0] < 1)


@st.composite
def scheduler_cases(draw) -> SchedulerCase:
    name = draw(st.sampled_from(VP_SCHEDULERS + FLOW_SCHEDULERS))
    cls = getattr(diffusers, name)
    params = inspect.signature(cls.__init__).parameters
    steps = draw(st.sampled_from([1000, 1, 2, 17]))
    kwargs: dict[str, Any] = {"num_train_timesteps": steps}
    if name in FLOW_SCHEDULERS:
        kwargs["shift"] = draw(st.sampled_from([1.0, 3.0, 0.5, 0.0, -1.0, math.nan, math.inf]))
        kwargs["shift"] = draw(st.sampled_from([kwargs["shift"], 1e-30, 1e30, np.float32(2.5)]))
        kwargs["use_dynamic_shifting"] = draw(st.booleans())
    else:
        kwargs["beta_start"] = draw(st.sampled_from(FLOATS))
        kwargs["beta_end"] = draw(st.sampled_from(FLOATS))
        kwargs["beta_schedule"] = draw(
            st.sampled_from(["linear", "scaled_linear", "squaredcos_cap_v2"])
        )
        kwargs["prediction_type"] = draw(
            st.sampled_from(
                ["epsilon", "v_prediction", "sample", "original_sample", "flow_prediction", "x"]
            )
        )
        if "rescale_betas_zero_snr" in params:
            kwargs["rescale_betas_zero_snr"] = draw(st.booleans())
    try:
        scheduler = cls(**kwargs)
    except Exception:  # diffusers' own constructor: not ours to test
        assume(False)
    bad: set[str] = set()
    if name in FLOW_SCHEDULERS:
        sigmas = scheduler.sigmas
        if not (torch.isfinite(sigmas).all() and (sigmas > 0).all() and (sigmas <= 1).all()):
            bad.add("scheduler")
    elif _vp_bad(scheduler.betas):
        bad.add("scheduler")
    # A config edited after construction (register_to_config): T that disagrees with the betas.
    # A flow grid is computed from the config alone, so T + 1 is a valid (if odd) edit there.
    edit = draw(st.sampled_from([None, None, None, 0, -3, 2.5, "10", True, steps + 1]))
    if edit is not None:
        scheduler.register_to_config(num_train_timesteps=edit)
        if not (edit == steps + 1 and name in FLOW_SCHEDULERS):
            bad.add("scheduler")
    case = SchedulerCase(scheduler, "flow" if name in FLOW_SCHEDULERS else "vp", bad)
    case.edited = edit is not None
    return case


@fuzz_settings(150)
@given(case=scheduler_cases())
def test_schedule_from_scheduler_returns_a_valid_grid_or_names_the_scheduler(case):
    schedule = _call(lambda: schedule_from_scheduler(case.scheduler), case.bad)
    if schedule is None:
        return
    steps = case.scheduler.config.num_train_timesteps
    assert isinstance(schedule, NoiseSchedule) and len(schedule) == steps
    assert _finite(schedule.gamma, schedule.sigma, schedule.timesteps)
    assert bool((schedule.sigma > 0).all()) and bool((schedule.gamma >= 0).all())
    if case.kind == "flow":
        torch.testing.assert_close(schedule.gamma + schedule.sigma, torch.ones(steps))
        if not case.edited:
            assert torch.equal(schedule.sigma, case.scheduler.sigmas)  # index i is diffusers' i
            assert torch.equal(schedule.timesteps, case.scheduler.timesteps)
    else:
        torch.testing.assert_close(
            schedule.gamma.square() + schedule.sigma.square(), torch.ones(steps)
        )


@fuzz_settings(60)
@given(case=scheduler_cases())
def test_prediction_type_from_scheduler_is_supported_or_named(case):
    try:
        prediction_type = prediction_type_from_scheduler(case.scheduler)
    except NAMED as error:
        _named(error, {"prediction_type", "scheduler"})
        return
    assert prediction_type in PREDICTION_TYPES
    if case.kind == "flow":
        assert prediction_type == "flow_prediction"


BAD_SCHEDULERS = [None, 5, "DDPMScheduler", object(), DDPMScheduler, torch.nn.Linear(2, 2)]


@fuzz_settings(12)
@given(scheduler=st.sampled_from(BAD_SCHEDULERS))
def test_non_schedulers_are_named(scheduler):
    for fn in (schedule_from_scheduler, prediction_type_from_scheduler):
        with pytest.raises(NAMED) as info:
            fn(scheduler)
        _named(info.value, {"scheduler"})
    with pytest.raises(NAMED) as info:
        loss_from_scheduler("siss", scheduler, superfactor=0.1)
    _named(info.value, {"scheduler"})


# ----------------------------------------------------------------------- loss_from_scheduler

METHOD_NAMES = ["siss", "siss-nois", "naive", "neggrad", "erasediff", "retrack"]
FLOW_SCHEDULER = FlowMatchEulerDiscreteScheduler(num_train_timesteps=50, shift=3.0)
# Keyword arguments each method takes (beyond prediction_type / reduction / superfactor).
TAKES = {
    "siss": {"lam", "n", "k", "x_from", "max_weight"},
    "siss-nois": {"n", "k", "x_from"},
    "naive": set(),
    "neggrad": set(),
    "erasediff": set(),
    "retrack": {"num_neighbors"},
}
KWARG_VALUES: dict[str, list[tuple[Any, bool]]] = {
    # (value, good)
    "lam": [
        (0.5, True),
        (0.0, True),
        (1.0, True),
        (-0.1, False),
        (1.5, False),
        (math.nan, False),
        ("0.5", False),
        (True, False),
    ],
    "superfactor": [
        (0.1, True),
        (0.0, True),
        (2, True),
        (-1.0, False),
        (math.nan, False),
        (math.inf, False),
        (None, False),
        (True, False),
    ],
    "x_from": [("retain", True), ("all", True), ("foo", False), (None, False)],
    "reduction": [("mean", True), ("sum", True), ("none", True), ("avg", False)],
    "prediction_type": [
        ("epsilon", True),
        ("v_prediction", True),
        ("sample", True),
        ("flow_prediction", True),
        ("eps", False),
        (None, False),
        (["epsilon"], False),
    ],
    "max_weight": [(1e4, True), (1.0, True), (0.5, False), (math.inf, False), (math.nan, False)],
    "num_neighbors": [(3, True), (1, True), (0, False), (2.5, False), (True, False)],
    "foo": [(1, False)],
}
N_K = [
    ((None, None), True),
    ((10, 2), True),
    ((2, 1), True),
    ((10, None), False),
    ((2, 2), False),
    ((0, 0), False),
    ((-1, 1), False),
    ((2.5, 1), False),
]


BAD_METHODS = ["SISS", "", 5, None, torch.nn.MSELoss, ["siss"], str, object()]


@fuzz_settings(200)
@given(data=st.data())
def test_loss_from_scheduler_builds_a_working_loss_or_names_the_argument(data):
    """At most one bad argument (the method, a keyword, or a missing required one) per call."""
    draw = data.draw
    name = draw(st.sampled_from(METHOD_NAMES), "method name")
    takes = TAKES[name] | {"prediction_type", "reduction", "superfactor"}
    target = draw(st.sampled_from([None] * 6 + ["method", "kwarg", "n, k", "unexpected"]), "bad")
    method: Any = {"siss": SISSLoss, "neggrad": NegGradLoss}.get(name, name)
    method = draw(st.sampled_from([name, method]), "method")
    if target == "method":
        method = draw(st.sampled_from(BAD_METHODS), "bad method")
    scheduler = draw(st.sampled_from([DDPMScheduler(num_train_timesteps=50), FLOW_SCHEDULER]))
    kwargs: dict[str, Any] = {}
    for key in sorted(takes - {"n", "k"}):
        good = [value for value, ok in KWARG_VALUES[key] if ok]
        if draw(st.booleans(), f"give {key}"):
            kwargs[key] = draw(st.sampled_from(good), key)
    if "n" in takes and draw(st.booleans(), "give n, k"):
        kwargs["n"], kwargs["k"] = draw(st.sampled_from([nk for nk, ok in N_K if ok]), "n, k")
    if name in ("siss", "siss-nois"):
        kwargs.setdefault("superfactor", 0.1)  # required there (tested below)
    if kwargs.get("x_from") == "all" and kwargs.get("n") is None:
        kwargs["n"], kwargs["k"] = 10, 2  # Eq. 8's keep weight n/(n-k) needs them
    if name == "erasediff":  # uniform noise targets: epsilon prediction only (tested below)
        kwargs["prediction_type"] = "epsilon"
    bad: set[str] = {"method"} if target == "method" else set()
    if target == "kwarg":
        key = draw(st.sampled_from(sorted(takes - {"n", "k"})), "bad key")
        kwargs[key] = draw(st.sampled_from([v for v, ok in KWARG_VALUES[key] if not ok]), key)
        bad.add(key)
    elif target == "n, k" and "n" in takes:
        kwargs["n"], kwargs["k"] = draw(st.sampled_from([nk for nk, ok in N_K if not ok]))
        bad |= {"n", "k"}
        if draw(st.booleans(), "x_from='all' without n, k"):
            kwargs.update(x_from="all", n=None, k=None)
    elif target == "unexpected":
        key = draw(st.sampled_from([*sorted(set(KWARG_VALUES) - takes), "n"]), "unexpected")
        if key == "n" and "n" in takes:
            if name in ("siss", "siss-nois"):  # a missing required argument instead
                key = "superfactor"
                kwargs.pop("superfactor")
            else:
                return
        elif key == "n":
            kwargs["n"], kwargs["k"] = 10, 2
            bad.add("k")
        else:
            kwargs[key] = KWARG_VALUES[key][0][0]
        bad.add(key)
    if name == "erasediff" and target is None and draw(st.booleans(), "erasediff on flow"):
        kwargs.pop("prediction_type")
        if prediction_type_from_scheduler(scheduler) != "epsilon":
            bad.add("prediction_type")

    loss_fn = _call(lambda: loss_from_scheduler(method, scheduler, **kwargs), bad)
    if loss_fn is None:
        return
    assert isinstance(loss_fn, UnlearningLoss)
    expected = kwargs.get("prediction_type", prediction_type_from_scheduler(scheduler))
    assert loss_fn.prediction_type == expected
    g = torch.Generator().manual_seed(0)
    x0, a0 = torch.randn(3, 2, 2, 2, generator=g), torch.randn(1, 2, 2, 2, generator=g)
    drawn = (
        loss_fn.sample(None, x0, generator=g)
        if name == "neggrad"
        else loss_fn.sample(x0, a0, generator=g)
    )
    output = torch.randn(drawn.noisy.shape, generator=g, requires_grad=True)
    terms = loss_fn.terms(output, drawn)
    shape = (3,) if kwargs.get("reduction") == "none" else ()
    for value in terms:
        assert value.shape == shape and value.dtype == torch.float32 and _finite(value)
    terms.loss.sum().backward()
    assert _finite(output.grad)


# --------------------------------------------------------- adapter_for / trainable_parameters


@functools.cache
def _unet() -> UNet2DModel:
    return tiny_unet(
        in_channels=3,
        out_channels=3,
        attention_head_dim=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )


@functools.cache
def _unet_condition() -> UNet2DConditionModel:
    return tiny_conditional_unet(cross_attention_dim=16)


@functools.cache
def _vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8, 16),
        norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        sample_size=16,
        scaling_factor=1.5,
        shift_factor=0.25,
    )


def _models() -> list[tuple[Any, type | None]]:
    """``(object, adapter class)``; ``None``: not a model, must be named."""
    return [
        (_unet(), UNet2DAdapter),
        (_unet_condition(), UNet2DConditionAdapter),
        (torch.nn.DataParallel(_unet()), UNet2DAdapter),
        (None, None),
        (5, None),
        ("unet", None),
        (object(), None),
        (UNet2DModel, None),
        (torch.randn(2), None),
        ([_unet()], None),
        (DDPMScheduler(), None),
        (torch.nn.Linear(2, 2), None),
    ]


@fuzz_settings(30)
@given(index=st.integers(0, 11))
def test_adapter_for_and_trainable_parameters(index):
    model, adapter = _models()[index]
    bad = {"model"} if adapter is None else set()
    result = _call(lambda: adapter_for(model), bad)
    if result is not None:
        assert type(result) is adapter and result.model is model
    if isinstance(model, torch.nn.Module):
        params = trainable_parameters(model)
        assert all(isinstance(p, torch.nn.Parameter) and p.requires_grad for p in params)
        assert len({id(p) for p in params}) == len(params)
    else:
        with pytest.raises(TypeError) as info:
            trainable_parameters(model)
        _named(info.value, {"model"})


# ----------------------------------------------------------------------------- adapter.loss
#
# Each example makes at most ONE argument bad (or, with all of them good, gives one input
# non-finite or huge values), so a good call must return and a bad one must name that argument.

SPECIALS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "huge": 1e30}


@dataclass
class Arg:
    value: Any
    bad: bool = False


def _tensor(shape, dtype=torch.float32, device="cpu", values="normal", g=None) -> torch.Tensor:
    if dtype in (torch.int64, torch.int32, torch.bool):
        return torch.randint(0, 2, shape, generator=g).to(dtype).to(device)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    if values == "zeros":
        base = torch.zeros(shape, dtype=torch.float64)
    elif values == "negative":
        base = -3 * base.abs() - 1
    elif values in SPECIALS and base.numel():
        base.view(-1)[:: max(1, base.numel() // 3)] = SPECIALS[values]
    return base.to(dtype).to(device)


GOOD_VALUES = ["normal", "normal", "zeros", "negative"]


@st.composite
def batches(
    draw, channels: int, multiple: int, bad: str | None, g, method: str
) -> tuple[Arg, Arg, int]:
    """``(x0, a0, B)`` for a model of ``channels`` input channels whose height and width must be
    multiples of ``multiple``; ``bad`` is ``"x0"``, ``"a0"`` or ``None``."""
    batch = draw(st.sampled_from([1, 2, 3]))
    sizes = [(8, 8), (4, 8), (2, 2)] + ([(7, 6), (1, 1), (3, 5)] if multiple == 1 else [])
    size = draw(st.sampled_from(sizes))
    shape: tuple[int, ...] = (batch, channels, *size)
    dtype, device = torch.float32, "cpu"
    if bad == "x0":
        what = draw(
            st.sampled_from(
                [
                    "empty",
                    "1d",
                    "2d",
                    "3d",
                    "5d",
                    "channels",
                    "float64",
                    "float16",
                    "bfloat16",
                    "int64",
                    "bool",
                    "meta",
                ]
                + (["odd", "tiny"] if multiple > 1 else [])
                + (["none"] if method != "neggrad" else [])  # NegGrad takes x0=None
            )
        )
        shape = {
            "empty": (0, *shape[1:]),
            "1d": (batch,),
            "2d": (batch, channels),
            "3d": (batch, channels, 8),
            "5d": (*shape, 1),
            "channels": (batch, channels + 1, *size),
            "odd": (batch, channels, 7, 6),
            "tiny": (batch, channels, 1, 1),
        }.get(what, shape)
        dtype = {
            "float64": torch.float64,
            "float16": torch.float16,
            "bfloat16": torch.bfloat16,
            "int64": torch.int64,
            "bool": torch.bool,
        }.get(what, dtype)
        device = "meta" if what == "meta" else "cpu"
        if what == "none":
            x0 = Arg(None, True)
        else:
            x0 = Arg(_tensor(shape, dtype, device, "normal", g), True)
        a0 = Arg(_tensor((1, *shape[1:]) if len(shape) > 1 else (1,), g=g))
        return x0, a0, batch
    x0 = Arg(_tensor(shape, values=draw(st.sampled_from(GOOD_VALUES)), g=g))
    rows = draw(st.sampled_from([1, batch]))
    a_dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.float64, torch.float16]))
    a_shape, a_device = (rows, *shape[1:]), "cpu"
    if bad == "a0":
        what = draw(st.sampled_from(["rows", "channels", "size", "3d", "int64", "bool", "meta"]))
        a_shape = {
            "rows": (batch + 1, *shape[1:]),
            "channels": (rows, channels + 1, *size),
            "size": (rows, channels, size[0] * 2, size[1]),
            "3d": (rows, channels, size[0]),
        }.get(what, a_shape)
        a_dtype = {"int64": torch.int64, "bool": torch.bool}.get(what, a_dtype)
        a_device = "meta" if what == "meta" else "cpu"
    values = draw(st.sampled_from(GOOD_VALUES))
    return x0, Arg(_tensor(a_shape, a_dtype, a_device, values, g), bad == "a0"), batch


@st.composite
def timestep_specs(draw, batch: int, bad: bool) -> Arg:
    if not bad:
        kind = draw(st.sampled_from(["none", "none", "int", "window", "tensor", "scalar"]))
        if kind == "int":
            return Arg(draw(st.sampled_from([0, 999, 500])))
        if kind == "window":
            return Arg(draw(st.sampled_from([(0, 999), (900, 999), (5, 5)])))
        if kind in ("tensor", "scalar"):
            dtype = draw(st.sampled_from([torch.int64, torch.int32, torch.uint8]))
            shape = (batch,) if kind == "tensor" else ()
            return Arg(torch.randint(0, 256 if dtype == torch.uint8 else 1000, shape).to(dtype))
        return Arg(None)
    value = draw(
        st.sampled_from(
            [
                -1,
                1000,
                (10, 3),
                (-1, 5),
                (0, 1000),
                (0, 1, 2),
                5.0,
                "999",
                [1, 2],
                True,
                torch.full((batch,), 1000),
                torch.full((batch,), -1),
                torch.zeros(batch + 1).long(),
                torch.zeros(batch),
                torch.zeros(batch, dtype=torch.bool),
                torch.zeros(batch, 1).long(),
            ]
        )
    )
    return Arg(value, True)


@st.composite
def generators(draw, bad: bool) -> Arg:
    if bad:
        return Arg(
            draw(st.sampled_from([5, "seed", np.random.default_rng(0), torch.randn(1)])), True
        )
    if draw(st.booleans()):
        return Arg(None)
    return Arg(torch.Generator().manual_seed(draw(st.integers(0, 2**16))))


@functools.cache
def _loss(method: str) -> UnlearningLoss:
    return loss_from_scheduler(method, DDPMScheduler(), superfactor=0.1)


def _run_loss(adapter, method: str, args: dict[str, Arg], special: tuple[str, str] | None) -> None:
    """One ``adapter.loss`` call against the contract (and, for non-finite or huge values, again
    under ``siss.debug.set_validate_values(True)``)."""
    bad = {name for name, arg in args.items() if arg.bad}
    conditioning = {
        name: arg.value
        for name, arg in args.items()
        if name not in ("x0", "a0", "timesteps", "generator") and arg.value is not None
    }

    def call():
        return adapter.loss(
            args["x0"].value,
            args["a0"].value,
            _loss(method),
            timesteps=args["timesteps"].value,
            generator=args["generator"].value,
            **conditioning,
        )

    if special is None:
        terms = _call(call, bad)
        if terms is not None:
            for value in terms:
                assert isinstance(value, torch.Tensor) and value.shape == ()
                assert value.dtype == torch.float32
            assert _finite(*terms), f"finite inputs gave {terms}"
            terms.loss.backward()
        return
    # Non-finite or huge values: no crash without value checks, and with them a finite loss or
    # a ValueError naming the input (the model's overflow on huge values names x0 and a0).
    try:
        call()
    except NAMED as error:
        _named(error, set(args))
    kind, name = special
    event(f"{kind} values in {name}")
    with siss.debug.set_validate_values(True):
        try:
            terms = call()
        except ValueError as error:
            _named(error, {name, "x0", "a0"} if kind == "huge" else {name})
        else:
            assert _finite(*terms), "value checks on, yet a non-finite loss"


def _special(draw, names: list[str], g, args: dict[str, Arg]) -> tuple[str, str] | None:
    """Maybe replace one good input by a copy with NaN, inf or huge values: ``(kind, name)``."""
    kind = draw(st.sampled_from([None] * 8 + list(SPECIALS)))
    if kind is None:
        return None
    name = draw(st.sampled_from([n for n in names if isinstance(args[n].value, torch.Tensor)]))
    value = args[name].value
    args[name] = Arg(_tensor(tuple(value.shape), value.dtype, "cpu", kind, g))
    return kind, name


@fuzz_settings(250)
@given(data=st.data())
def test_unet2d_adapter_loss(data):
    draw = data.draw
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16), "seed"))
    adapter = UNet2DAdapter(_unet())
    bad = draw(st.sampled_from([None] * 5 + ["x0", "a0", "timesteps", "generator", "class_labels"]))
    method = draw(st.sampled_from(METHOD_NAMES), "method")
    x0, a0, batch = draw(batches(3, 2, bad, g, method), "x0, a0")
    if method == "neggrad" and bad not in ("x0", "a0") and draw(st.booleans(), "no x0"):
        x0 = Arg(None)  # NegGrad needs no keep points: a0 sets the batch, in the model's dtype
        a0 = Arg(a0.value.float())
        batch = a0.value.shape[0]
    args = {
        "x0": x0,
        "a0": a0,
        "timesteps": draw(timestep_specs(batch, bad == "timesteps"), "timesteps"),
        "generator": draw(generators(bad == "generator"), "generator"),
    }
    if bad == "class_labels":  # this UNet2DModel has no class embedding
        args["class_labels"] = Arg(torch.zeros(batch, dtype=torch.long), True)
    special = _special(draw, ["x0", "a0"], g, args) if bad is None else None
    _run_loss(adapter, method, args, special)


@st.composite
def prompt_embeds(draw, batch: int, bad: bool, g) -> Arg:
    rows = draw(st.sampled_from([batch, 1]))
    tokens = draw(st.sampled_from([5, 1, 3]))
    if not bad:
        return Arg(_tensor((rows, tokens, 16), values=draw(st.sampled_from(GOOD_VALUES)), g=g))
    what = draw(
        st.sampled_from(
            [
                "rows",
                "zero rows",
                "width",
                "2d",
                "0d",
                "4d",
                "list",
                "str",
                "float64",
                "float16",
                "int64",
                "meta",
                "missing",
            ]
        )
    )
    shape = {
        "rows": (batch + 1, tokens, 16),
        "zero rows": (0, tokens, 16),
        "width": (rows, tokens, 8),
        "2d": (rows, 16),
        "0d": (),
        "4d": (rows, tokens, 16, 1),
    }.get(what, (rows, tokens, 16))
    dtype = {"float64": torch.float64, "float16": torch.float16, "int64": torch.int64}.get(
        what, torch.float32
    )
    value: Any = _tensor(shape, dtype, "meta" if what == "meta" else "cpu", g=g)
    value = {"list": [value], "str": "a photo of a cat", "missing": None}.get(what, value)
    return Arg(value, True)


@fuzz_settings(250)
@given(data=st.data())
def test_unet2d_condition_adapter_loss(data):
    draw = data.draw
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16), "seed"))
    adapter = UNet2DConditionAdapter(_unet_condition())
    bad = draw(
        st.sampled_from(
            [None] * 5 + ["x0", "a0", "timesteps", "generator"] + ["encoder_hidden_states"] * 3
        )
    )
    method = draw(st.sampled_from(METHOD_NAMES), "method")
    x0, a0, batch = draw(batches(4, 1, bad, g, method), "x0, a0")
    args = {
        "x0": x0,
        "a0": a0,
        "timesteps": draw(timestep_specs(batch, bad == "timesteps"), "timesteps"),
        "generator": draw(generators(bad == "generator"), "generator"),
        "encoder_hidden_states": draw(
            prompt_embeds(batch, bad == "encoder_hidden_states", g), "encoder_hidden_states"
        ),
    }
    names = ["x0", "a0", "encoder_hidden_states"]
    special = _special(draw, names, g, args) if bad is None else None
    _run_loss(adapter, method, args, special)


# ---------------------------------------------------------------------------- encode_latents


@fuzz_settings(80)
@given(data=st.data())
def test_encode_latents(data):
    draw = data.draw
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16), "seed"))
    bad = draw(st.sampled_from([None] * 4 + ["vae", "images", "images", "generator"]))
    vae: Any = _vae()
    if bad == "vae":
        vae = draw(st.sampled_from([None, torch.nn.Linear(2, 2), _unet(), AutoencoderKL, "vae"]))
    batch = draw(st.sampled_from([1, 2]))
    size = draw(st.sampled_from([(16, 16), (8, 16), (2, 2)]))
    shape, dtype, device = (
        (batch, 3, *size),
        draw(st.sampled_from([torch.float32, torch.float64])),
        "cpu",
    )
    if bad == "images":
        what = draw(
            st.sampled_from(
                [
                    "empty",
                    "3d",
                    "5d",
                    "channels",
                    "odd",
                    "tiny",
                    "int64",
                    "int32",
                    "bool",
                    "meta",
                    "list",
                ]
            )
        )
        shape = {
            "empty": (0, 3, 16, 16),
            "3d": (batch, 3, 16),
            "5d": (batch, 3, 16, 16, 1),
            "channels": (batch, 1, 16, 16),
            "odd": (batch, 3, 15, 16),
            "tiny": (batch, 3, 1, 1),
        }.get(what, shape)
        dtype = {"int64": torch.int64, "int32": torch.int32, "bool": torch.bool}.get(what, dtype)
        device = "meta" if what == "meta" else device
    images: Any = _tensor(shape, dtype, device, draw(st.sampled_from(GOOD_VALUES)), g)
    if bad == "images" and what == "list":
        images = [images]
    generator = draw(generators(bad == "generator"))
    special = draw(st.sampled_from([None] * 6 + list(SPECIALS))) if bad is None else None
    if special:
        images = _tensor(shape, dtype, device, special, g)

    def call():
        return encode_latents(vae, images, generator=generator.value)

    if special:
        try:
            call()
        except NAMED as error:
            _named(error, {"images"})
        event(f"{special} values")
        if special != "huge":
            with siss.debug.set_validate_values(True), pytest.raises(ValueError, match="images"):
                call()
        return
    latents = _call(call, {bad} - {None})
    if latents is not None:
        assert latents.shape == (batch, 4, shape[2] // 2, shape[3] // 2)
        assert latents.dtype == torch.float32 and not latents.requires_grad
        assert _finite(latents)


# ---------------------------------------------------------------------- core finds
#
# Found while fuzzing; the adapters also reject these inputs before the core sees them, so the
# strategies above no longer reach them. Each case calls the CORE directly and expects the
# contract (a ValueError/TypeError naming the argument).


def _core_loss(method: str = "siss") -> UnlearningLoss:
    return siss.make_loss(method, DDPMScheduler().alphas_cumprod, superfactor=0.1)


def _pair(*shape: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(shape), torch.randn(shape)


CORE_FINDS: dict[str, tuple[str | tuple[str, ...], Any, str]] = {
    # name: (argument(s) the error must name, the call, what it did before the core fix)
    "generator-int": (
        "generator",
        lambda: _core_loss().sample(*_pair(2, 1, 2, 2), generator=5),
        "AttributeError: 'int' object has no attribute 'device' (siss/_random.py _draw_device); "
        "every method's sample",
    ),
    "generator-numpy": (
        "generator",
        lambda: _core_loss("naive").sample(*_pair(2, 1, 2, 2), generator=np.random.default_rng(0)),
        "AttributeError: 'numpy.random._generator.Generator' object has no attribute 'device'",
    ),
    "timesteps-on-meta": (
        "timesteps",
        lambda: _core_loss().sample(*_pair(2, 1, 2, 2), timesteps=torch.zeros(2, dtype=torch.long,
                                                                            device="meta")),
        "NotImplementedError: Cannot copy out of meta tensor (schedule.py sample_indices)",
    ),
    "empty-rows-siss": (
        "x0",
        lambda: _core_loss().sample(*_pair(2, 1, 0, 3)),
        "IndexError: amax(): Expected reduction dim 1 to have non-zero size (weights.py "
        "log_density_ratio)",
    ),
    "empty-rows-naive": (
        "x0",
        lambda: _core_loss("naive")(torch.zeros(2, 0), _core_loss("naive").sample(*_pair(2, 0))),
        "returns a NaN loss (mean over zero elements) from finite, empty rows",
    ),
    "empty-schedule": (
        ("gamma", "sigma"),
        lambda: NoiseSchedule(torch.zeros(0), torch.zeros(0)),
        "accepted; any sample then raises RuntimeError: random_ expects 'from' to be less than "
        "'to' (also from_alphas_cumprod / from_flow_sigmas of an empty tensor)",
    ),
    "nan-model-timesteps": (
        "timesteps",
        lambda: NoiseSchedule(torch.ones(3), torch.ones(3), torch.tensor([0.0, math.nan, 1.0])),
        "accepted: the model then receives a NaN timestep",
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(CORE_FINDS))
def test_core_finds_of_this_fuzz_are_named_errors(name):
    """Core defects this fuzz found, each fixed in siss/ (the third field: what it did before)."""
    argument, call, before = CORE_FINDS[name]
    try:
        result = call()
    except NAMED as error:
        if any(
            name in str(error) for name in ((argument,) if isinstance(argument, str) else argument)
        ):
            return
        pytest.fail(f"core names the wrong argument: {error}")
    except Exception as error:
        pytest.fail(f"core raises {type(error).__name__}: {error} (before the fix: {before})")
    else:
        if isinstance(result, torch.Tensor) and _finite(result):
            return
        pytest.fail(f"core accepts it (before the fix: {before})")
