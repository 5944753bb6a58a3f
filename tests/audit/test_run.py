"""audit(): every requested statistic present with its n and interval (or a stated reason),
seeds reproduce, errors name the argument before any model call."""

import json
import math

import pytest
import torch
from conftest import tiny_conditional_unet
from diffusers import DDPMScheduler

from siss.audit import AuditReport, audit
from siss.audit.run import ALL_CHECKS, DEFAULT_CHECKS, check_options, check_seed, parse_options

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {
    "num_samples": 8,
    "num_inference_steps": 5,
    "likelihood": {"repeats": 2, "rtol": 1e-3, "atol": 1e-3},
    "reconstruction": {"noise_draws": 2},
    "reconstruction_sweep": {"ts": (100, 400), "noise_draws": 2},
    "membership": {"noise_draws": 2, "bootstrap": 100},
    "progress": False,
}


@pytest.fixture
def setup(audit_models):
    model = audit_models.tiny_unet()
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    g = torch.Generator().manual_seed(0)
    forget = torch.rand(2, 1, 8, 8, generator=g) * 2 - 1
    reference = torch.rand(6, 1, 8, 8, generator=g) * 2 - 1
    return model, scheduler, forget, reference


def _numbers(report):
    """Every statistic as a comparable tuple (NaN written as a string, so NaN == NaN)."""

    def number(v):
        return "nan" if math.isnan(v) else v

    return [
        (r.check, r.image, name, number(e.value), number(e.low), number(e.high), e.n, e.status)
        for r in report.results
        for name, e in r.statistics.items()
    ]


def test_every_statistic_has_n_and_interval_or_a_reason(setup):
    model, scheduler, forget, reference = setup
    report = audit(model, scheduler, forget, reference, **SMALL)
    assert isinstance(report, AuditReport)
    assert {r.check for r in report.results} == set(DEFAULT_CHECKS)
    for check in ("generation", "likelihood", "reconstruction", "reconstruction_sweep"):
        assert [r.image for r in report.results if r.check == check] == [0, 1]
    assert [r.image for r in report.results if r.check == "membership"] == [0, 1, None]
    for result in report.results:
        assert result.reason, result
        for name, estimate in result.statistics.items():
            if estimate.measured:
                assert estimate.n >= 1, (result.check, name)
                assert math.isfinite(estimate.value)
                # an interval, or a note saying why there is none
                has_interval = math.isfinite(estimate.low) and math.isfinite(estimate.high)
                assert has_interval or estimate.note, (result.check, name)
                if has_interval:
                    assert estimate.low <= estimate.value + 1e-12
                    assert estimate.value <= estimate.high + 1e-12
            else:
                assert math.isnan(estimate.value) and estimate.note, (result.check, name)
    # 6 reference images are too few to say "held" at 5% (the percentile's interval cannot
    # lie below 5%, the conformal p-value cannot reach it): never held, membership undecided
    assert report.result("likelihood", 0).held is not True
    assert report.result("reconstruction", 0).held is not True
    assert report.result("membership", 0).held is None
    # the set-level AUC uses the 2 forget images as members
    assert report.result("membership", None).statistics["auc"].measured
    tpr = report.result("membership", None).statistics["tpr_at_fpr"]
    assert not tpr.measured and "non-members" in tpr.note
    # the reference images' own values ride along for the figure's histograms: one float per
    # reference image, the same for every forget image, and the forget statistic untouched
    for check in ("likelihood", "reconstruction", "membership"):
        values = [report.result(check, i).details["reference_values"] for i in (0, 1)]
        assert values[0] == values[1] and len(values[0]) == 6, check
        assert all(isinstance(v, float) for v in values[0]), check
    membership_values = torch.tensor(report.result("membership", 0).details["reference_values"])
    assert report.result("membership", 0).details["reference_quantile"] == pytest.approx(
        float(torch.quantile(membership_values.double(), 0.05)), rel=1e-6
    )
    # gallery images ride along for the figure, and the report is JSON
    gallery = report.result("generation", 0).details["gallery_images"]
    assert len(gallery) == len(report.result("generation", 0).details["gallery"]) > 0
    text = json.dumps(report.to_dict())
    again = AuditReport.from_dict(json.loads(text))
    assert _numbers(again) == _numbers(report)
    config = report.config
    assert config["seed"] == 0 and config["num_samples"] == 8 and config["reference_n"] == 6
    assert config["options"]["likelihood"]["repeats"] == 2
    assert set(config["check_seeds"]) == set(DEFAULT_CHECKS)
    assert "total" in config["seconds"]


def test_seeds_reproduce_and_checks_are_independent(setup):
    model, scheduler, forget, reference = setup
    small = {**SMALL, "checks": ("generation", "membership")}
    first = audit(model, scheduler, forget, reference, seed=3, **small)
    second = audit(model, scheduler, forget, reference, seed=3, **small)
    assert _numbers(first) == _numbers(second)
    other = audit(model, scheduler, forget, reference, seed=4, **small)
    assert _numbers(other) != _numbers(first)
    # a check's numbers do not depend on which other checks run
    alone = audit(
        model, scheduler, forget, reference, seed=3, **{**small, "checks": ["membership"]}
    )
    assert _numbers(alone) == [row for row in _numbers(first) if row[0] == "membership"]
    assert check_seed(3, "generation") != check_seed(3, "membership")


def test_membership_auc_without_members_is_not_measured_with_the_reason(setup):
    model, scheduler, forget, reference = setup
    report = audit(
        model,
        scheduler,
        forget[:1],
        reference,
        checks=["membership"],
        **{k: v for k, v in SMALL.items() if k in ("membership", "progress")},
    )
    auc = report.result("membership", None).statistics["auc"]
    assert auc.status == "not measured" and "members" in auc.note
    with_members = audit(
        model,
        scheduler,
        forget[:1],
        reference,
        members=forget,
        checks=["membership"],
        membership={"noise_draws": 2, "bootstrap": 100},
        progress=False,
    )
    assert with_members.result("membership", None).statistics["auc"].measured


def test_no_reference_is_not_measured_never_zero(setup):
    model, scheduler, forget, _ = setup
    report = audit(
        model,
        scheduler,
        forget,
        None,
        checks=["reconstruction", "membership"],
        **{k: v for k, v in SMALL.items() if k in ("reconstruction", "membership", "progress")},
    )
    for result in report.results:
        if "percentile" in result.statistics:
            assert result.statistics["percentile"].status == "not measured"
            assert result.held is None


def _explode(*args, **kwargs):
    raise AssertionError("the model was called")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"checks": ["generaton"]}, ValueError, "checks"),
        ({"checks": "generation"}, ValueError, "checks"),
        ({"num_samples": 0}, ValueError, "num_samples"),
        ({"seed": 1.5}, TypeError, "seed"),
        ({"likelihood": {"repeets": 2}}, TypeError, "repeets"),
        ({"likelihod": {"repeats": 2}}, TypeError, "likelihod"),
        ({"generation": {"generator": None}}, ValueError, "generator"),
        ({"data_range": (1, -1)}, ValueError, "data_range"),
        ({"checks": ["memorization"]}, ValueError, "conditioning"),
        ({"conditioning": [1]}, TypeError, "conditioning"),
    ],
)
def test_errors_name_the_argument_before_any_model_call(setup, kwargs, error, match):
    model, scheduler, forget, reference = setup
    model.forward = _explode
    with pytest.raises(error, match=match):
        audit(model, scheduler, forget, reference, progress=False, **kwargs)


@pytest.mark.parametrize(
    ("forget", "reference", "match"),
    [
        (torch.zeros(1, 1, 4, 4), None, "forget"),
        (torch.zeros(1, 1, 8, 8, dtype=torch.long), None, "forget"),
        (torch.full((1, 1, 8, 8), math.nan), None, "forget"),
        (torch.full((1, 1, 8, 8), 2.0), None, "data range"),
        (torch.zeros(1, 1, 8, 8), torch.zeros(3, 1, 4, 4), "reference"),
        (torch.zeros(1, 1, 8, 8), torch.full((3, 1, 8, 8), 255.0), "reference"),
    ],
)
def test_image_errors_are_named(setup, forget, reference, match):
    model, scheduler, _, _ = setup
    model.forward = _explode
    with pytest.raises((TypeError, ValueError), match=match):
        audit(model, scheduler, forget, reference, progress=False)


def test_one_image_without_batch_dimension(setup):
    model, scheduler, forget, reference = setup
    report = audit(
        model,
        scheduler,
        forget[0],
        reference,
        checks=["generation"],
        num_samples=4,
        num_inference_steps=2,
        progress=False,
    )
    assert [r.image for r in report.results] == [0]
    assert report.config["forget_n"] == 1


def test_all_checks_listed():
    assert set(DEFAULT_CHECKS) < set(ALL_CHECKS) and "memorization" in ALL_CHECKS


def test_memorization_scores_every_step_of_a_short_run():
    """``num_inference_steps`` below the check's own default of 50: every step is scored."""
    model = tiny_conditional_unet()
    scheduler = DDPMScheduler(num_train_timesteps=100, clip_sample=False)
    g = torch.Generator().manual_seed(0)
    forget = torch.rand(1, 4, 8, 8, generator=g) * 2 - 1
    prompt = {"encoder_hidden_states": torch.randn(1, 3, 8, generator=g)}
    null = {"encoder_hidden_states": torch.zeros(1, 3, 8)}
    report = audit(
        model,
        scheduler,
        forget,
        None,
        conditioning=prompt,
        null_conditioning=null,
        checks=["memorization"],
        num_inference_steps=3,
        progress=False,
    )
    result = report.result("memorization", None)
    assert result.details["num_steps"] == result.details["num_inference_steps"] == 3
    assert report.config["resolved_defaults"]["memorization"] == {"num_steps": 3}
    estimate = result.statistics["noise_magnitude"]
    assert estimate.measured and estimate.n == 4 and estimate.low <= estimate.value <= estimate.high


@pytest.mark.parametrize(
    "item, match",
    [
        ("likelihood", "CHECK.KEY=VALUE"),
        ("likelyhood.repeats=2", "likelyhood"),
        ("membership.noise_draw=2", "noise_draw"),
        ("membership.members=1", "set by audit"),
    ],
)
def test_parse_options_refuses_what_audit_would_refuse_naming_the_flag(item, match):
    """A command's options fail when parsed, before any model is loaded or trained."""
    with pytest.raises(ValueError, match=match) as error:
        parse_options([item], "--audit-option")
    assert str(error.value).startswith("--audit-option")
    assert parse_options(["membership.score=pia"]) == {"membership": {"score": "pia"}}
    assert check_options({"membership": {"score": "pia"}}) == {"membership": {"score": "pia"}}


def test_every_check_has_exactly_one_runner():
    """The dispatch table runs every check ``audit`` knows, and no other."""
    from siss.audit.run import _INPUT_CHECKS, _RUNNERS

    assert sorted(_RUNNERS) == sorted(ALL_CHECKS) and len(_RUNNERS) == len(ALL_CHECKS)
    assert set(_INPUT_CHECKS) <= set(_RUNNERS)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"generation": {"threshold": -1}}, "`generation.threshold` must be finite and > 0"),
        ({"generation": {"percentile": 1.5}}, "`generation.percentile` must be a finite number"),
        ({"likelihood": {"repeats": 0}}, "`likelihood.repeats` must be >= 1, got 0"),
        ({"membership": {"bootstrap": 50}}, "`membership.bootstrap` must be >= 100, got 50"),
        ({"membership": {"score": "foo"}}, "`membership.score` must be 'loss' or 'pia'"),
        ({"reconstruction": {"t": 1000}}, r"`reconstruction.t` must be in \[1, 999\]"),
        ({"reconstruction_sweep": {"ts": ()}}, "`reconstruction_sweep.ts` must be a non-empty"),
        ({"reconstruction_sweep": {"ts": (50, 5000)}}, r"`reconstruction_sweep.ts` must be in"),
    ],
)
def test_option_values_are_refused_before_any_check_runs(setup, monkeypatch, options, message):
    """Each value by its check's own rule, naming ``check.option``, before the model is called
    (it was refused when its check came, after the checks before it had run)."""
    from siss.audit.run import check_option_values

    model, scheduler, forget, reference = setup
    with pytest.raises(ValueError, match=message):
        check_option_values(options, scheduler)
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    with pytest.raises(ValueError, match=message):
        audit(model, scheduler, forget, reference, **{**SMALL, **options})
    assert not calls
    check_option_values({"reconstruction": {"t": 999}, "likelihood": {"repeats": 1}}, scheduler)
