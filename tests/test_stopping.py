"""``NonmemberStop`` on the exact denoiser of a finite training set, where membership is known.

The posterior-mean denoiser of the empirical distribution of a set ``S`` (Bayes-optimal for a model
trained to convergence on ``S``) predicts ``eps_hat = (x_t - gamma E[x_0 | x_t]) / sigma`` with
``E[x_0 | x_t]`` a softmax over ``S``. A forget image inside ``S`` is denoised almost perfectly at
small ``t`` (percentile ~0 among non-members); with ``S`` the training set *without* it
("retrained"), it is one more image the model never saw, exchangeable with the references drawn
from the same distribution, so its expected percentile is 1/2.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_unet
from diffusers import DDPMScheduler

from siss.stopping import (
    LEVEL_TIMESTEPS,
    TRACK_GAIN,
    TRACK_LIMIT,
    TRACK_TIMESTEPS,
    NonmemberCheck,
    NonmemberStop,
)

SHAPE = (1, 4, 4)


def exact_denoiser(training_set: torch.Tensor, scheduler: DDPMScheduler):
    alphas = scheduler.alphas_cumprod.double()

    def predict(noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        gamma = alphas[timesteps].sqrt().view(-1, 1, 1, 1)
        sigma = (1 - alphas[timesteps]).sqrt().view(-1, 1, 1, 1)
        x = noisy.double()
        distance = (x.unsqueeze(1) - gamma.unsqueeze(1) * training_set.double()).square()
        logits = -distance.flatten(2).sum(2) / (2 * sigma.view(-1, 1) ** 2)
        x0 = torch.einsum("bn,nchw->bchw", logits.softmax(1), training_set.double())
        return ((x - gamma * x0) / sigma).float()

    return predict


def draw(count: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(count, *SHAPE, generator=generator)


def test_a_member_ranks_below_every_non_member() -> None:
    generator = torch.Generator().manual_seed(0)
    scheduler = DDPMScheduler()
    training, references = draw(32, generator), draw(64, generator)
    stop = NonmemberStop(
        exact_denoiser(training, scheduler), scheduler, training[:1], references, noise_draws=4
    )
    check = stop.start()
    assert check.step == 0 and not check.entered
    assert check.percentile < 0.05, check


def test_after_retraining_the_forget_image_ranks_like_a_non_member() -> None:
    """Over 24 independent sets, the retrained model's percentile averages 1/2 within 4 standard
    errors (the per-set percentiles' own spread)."""
    scheduler = DDPMScheduler()
    percentiles = []
    for seed in range(24):
        generator = torch.Generator().manual_seed(seed)
        training, forget, references = draw(32, generator), draw(1, generator), draw(48, generator)
        stop = NonmemberStop(
            exact_denoiser(training, scheduler),
            scheduler,
            forget,
            references,
            noise_draws=4,
            seed=seed,
        )
        percentiles.append(stop.start().percentile)
    values = torch.tensor(percentiles, dtype=torch.float64)
    standard_error = values.std() / math.sqrt(len(values))
    assert abs(values.mean() - 0.5) < 4 * standard_error, (values.mean(), standard_error)
    assert values.std() > 0.05  # the statistic varies: not a constant that happens to be 1/2


def test_checks_every_few_steps_with_the_same_noise() -> None:
    generator = torch.Generator().manual_seed(1)
    scheduler = DDPMScheduler()
    training, references = draw(8, generator), draw(16, generator)
    stop = NonmemberStop(
        exact_denoiser(training, scheduler), scheduler, training[:2], references, every=5
    )
    first = stop.start()
    assert stop(4) is None
    again = stop(5)
    assert again is not None and again.step == 5
    assert again.percentile == first.percentile  # common random numbers: same model, same value
    assert [check.step for check in stop.history] == [0, 5]


def test_entered_follows_the_target() -> None:
    generator = torch.Generator().manual_seed(2)
    scheduler = DDPMScheduler()
    training, forget, references = draw(8, generator), draw(1, generator), draw(32, generator)
    predict = exact_denoiser(training, scheduler)
    value = NonmemberStop(predict, scheduler, forget, references).start().percentile
    assert 0 < value < 1
    below = NonmemberStop(predict, scheduler, forget, references, target=value / 2).start()
    above = NonmemberStop(predict, scheduler, forget, references, target=(1 + value) / 2).start()
    assert below.entered and not above.entered


def test_a_model_that_returns_nan_is_not_measured() -> None:
    scheduler = DDPMScheduler()
    references = draw(4, torch.Generator().manual_seed(3))

    def nan_on_forget(noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(noisy)
        out[(noisy.flatten(1).abs().sum(1) > 1e3)] = torch.nan
        return out

    forget = torch.full((1, *SHAPE), 1e4)
    check = NonmemberStop(nan_on_forget, scheduler, forget, references).start()
    assert math.isnan(check.percentile) and not check.entered


def test_references_the_model_cannot_score_are_an_error() -> None:
    scheduler = DDPMScheduler()
    stop = NonmemberStop(
        lambda noisy, timesteps: torch.full_like(noisy, torch.nan),
        scheduler,
        torch.zeros(1, *SHAPE),
        torch.zeros(3, *SHAPE),
    )
    with pytest.raises(ValueError, match="fewer than 2 references"):
        stop.start()


def test_conditioning_rows_reach_the_model() -> None:
    """One row shared by every image; k rows for k forget images; the references get the shared
    row unless told otherwise."""
    scheduler = DDPMScheduler()
    seen: list[torch.Tensor] = []

    def model(noisy: torch.Tensor, timesteps: torch.Tensor, *, label: torch.Tensor):
        seen.append(label)
        return torch.zeros_like(noisy)

    forget, references = torch.zeros(2, *SHAPE), torch.zeros(3, *SHAPE)
    stop = NonmemberStop(
        model,
        scheduler,
        forget,
        references,
        noise_draws=1,
        conditioning={"label": torch.tensor([[7.0]])},
    )
    stop.start()
    assert all((label == 7).all() for label in seen)
    seen.clear()
    rows = NonmemberStop(
        model,
        scheduler,
        forget,
        references,
        noise_draws=1,
        conditioning={"label": torch.tensor([[1.0], [2.0]])},
        reference_conditioning={"label": torch.tensor([[9.0]])},
    )
    rows.errors(forget, rows.conditioning)
    assert sorted(torch.cat(seen).flatten().unique().tolist()) == [1.0, 2.0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"references": torch.zeros(1, *SHAPE)}, ">= 2 references"),
        ({"references": torch.zeros(4, 1, 8, 8)}, "shaped like `forget`"),
        ({"target": 1.0}, "`target`"),
        ({"every": 0}, "`every`"),
        ({"noise_draws": 0}, "`noise_draws`"),
        ({"timesteps": (50, 1000)}, "`timesteps`"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, message: str) -> None:
    arguments = {"references": torch.zeros(4, *SHAPE)} | kwargs
    with pytest.raises(ValueError, match=message):
        NonmemberStop(
            lambda noisy, timesteps: noisy, DDPMScheduler(), torch.zeros(1, *SHAPE), **arguments
        )


def test_the_model_is_scored_in_eval_mode_and_left_training() -> None:
    unet = tiny_unet(sample_size=4).train()
    modes: list[bool] = []
    unet.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    NonmemberStop(unet, DDPMScheduler(), torch.zeros(1, *SHAPE), torch.randn(4, *SHAPE)).start()
    assert modes and not any(modes)
    assert unet.training


def test_a_bf16_model_scores_float32_images_in_its_own_dtype() -> None:
    """Images in float32 (a data loader's), weights in bf16: the noisy rows go in as bf16 (they
    went in as float32, which a bf16 convolution refuses) and every level is measured."""
    forget = torch.zeros(1, *SHAPE)
    references = torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(0))
    dtypes: list[torch.dtype] = []
    low = tiny_unet(sample_size=4).to(torch.bfloat16)
    low.register_forward_pre_hook(lambda module, args: dtypes.append(args[0].dtype))
    check = NonmemberStop(low, DDPMScheduler(), forget, references, noise_draws=2).start()
    assert set(dtypes) == {torch.bfloat16}
    assert math.isfinite(check.percentile) and len(check.per_timestep) > 1


def test_per_level_weights_follow_the_nearest_measured_level() -> None:
    """``forget_timestep_weights``: 0 at the grid indices whose nearest level (in log noise
    rank) has reached the target, 1 elsewhere; 1 everywhere before a check and at an unmeasured
    level."""
    scheduler = DDPMScheduler()  # ascending sigma: grid index = noise rank
    generator = torch.Generator().manual_seed(4)
    stop = NonmemberStop(
        exact_denoiser(draw(8, generator), scheduler),
        scheduler,
        draw(1, generator),
        draw(8, generator),
        rule="per_level",
    )
    assert torch.equal(stop.forget_timestep_weights(), torch.ones(1000))
    check = NonmemberCheck(3, 0.5, (0.2, 0.6, float("nan"), 0.7), False, (0.0,) * 4)
    weights = stop.forget_timestep_weights(check)
    assert weights.shape == (1000,)
    # levels 50, 100, 250, 500; log-rank midpoints at about 71, 158 and 354
    expected = {0: 1, 50: 1, 70: 1, 72: 0, 100: 0, 157: 0, 159: 1, 250: 1, 353: 1, 355: 0, 999: 0}
    assert {i: int(weights[i]) for i in expected} == expected


def test_per_level_enters_only_when_every_level_has() -> None:
    scheduler = DDPMScheduler()
    generator = torch.Generator().manual_seed(5)
    training, forget, references = draw(8, generator), draw(1, generator), draw(32, generator)
    predict = exact_denoiser(training, scheduler)
    levels = NonmemberStop(predict, scheduler, forget, references).start().per_timestep
    mean = sum(levels) / len(levels)
    assert min(levels) < mean  # the levels differ, so a target can sit between
    target = (min(levels) + mean) / 2
    by_mean = NonmemberStop(predict, scheduler, forget, references, target=target).start()
    per_level = NonmemberStop(
        predict, scheduler, forget, references, target=target, rule="per_level"
    ).start()
    assert by_mean.entered and not per_level.entered
    low = NonmemberStop(
        predict, scheduler, forget, references, target=min(levels) / 2, rule="per_level"
    ).start()
    assert low.entered


def test_the_forget_level_is_the_references_median_error_between_levels() -> None:
    """``forget_level``: at each measured level the references' median denoising error at the
    last check; between levels a log-log interpolation (so between its neighbours); flat beyond
    the least and most noisy; in the loss's own error (``eps_error_scale``) for v-prediction."""
    generator = torch.Generator().manual_seed(6)
    training, forget, references = draw(8, generator), draw(1, generator), draw(16, generator)
    scheduler = DDPMScheduler()
    stop = NonmemberStop(
        exact_denoiser(training, scheduler), scheduler, forget, references, noise_draws=2
    )
    with pytest.raises(ValueError, match="check first"):
        stop.forget_level()
    stop.start()
    level = stop.forget_level()
    median = stop.reference_errors.median(1).values.float()
    torch.testing.assert_close(level[[50, 100, 250, 500]], median)
    assert (level[:50] == level[50]).all() and (level[500:] == level[500]).all()
    low, high = sorted((median[0].item(), median[1].item()))
    assert low <= level[75].item() <= high
    v_scheduler = DDPMScheduler(prediction_type="v_prediction")
    v_stop = NonmemberStop(
        exact_denoiser(training, scheduler), v_scheduler, forget, references, noise_draws=2
    )
    v_stop.start()
    from siss.adapters import schedule_from_scheduler
    from siss.targets import eps_error_scale

    schedule = schedule_from_scheduler(v_scheduler)
    scale = eps_error_scale("v_prediction", schedule.gamma, schedule.sigma)
    torch.testing.assert_close(
        (v_stop.forget_level().double() * scale.double())[[50, 100, 250, 500]],
        v_stop.reference_errors.median(1).values,
        rtol=1e-5,
        atol=0,
    )
    # held flat in the loss's own units beyond the noisiest level, up to a zero terminal SNR,
    # where a noise error divided by the vanishing scale was 1e7 times the level at t = 500
    zero_snr = DDPMScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True)
    for held in (v_stop, NonmemberStop(exact_denoiser(training, scheduler), zero_snr, forget,
                                       references, noise_draws=2)):  # fmt: skip
        held.start()
        level = held.forget_level()
        assert torch.isfinite(level).all() and (level[500:] == level[500]).all()


class RecordingUnlearner:
    """Stands in for ``siss.Unlearner``: records what ``NonmemberStop.steer`` tells it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, torch.Tensor]] = []

    def restrict_forget(self, weights: torch.Tensor) -> None:
        self.calls.append(("restrict_forget", weights))

    def set_forget_level(self, level: torch.Tensor) -> None:
        self.calls.append(("set_forget_level", level))


def levels_and_stop(rule: str, target: float | None = None):
    """A member-free setup whose levels differ; ``target=None``: half the lowest level's, so that
    every level has reached it."""
    scheduler = DDPMScheduler()
    generator = torch.Generator().manual_seed(5)
    training, forget, references = draw(8, generator), draw(1, generator), draw(32, generator)
    predict = exact_denoiser(training, scheduler)
    levels = NonmemberStop(predict, scheduler, forget, references).start().per_timestep
    target = min(levels) / 2 if target is None else target
    stop = NonmemberStop(predict, scheduler, forget, references, target=target, rule=rule)
    return levels, stop


def test_steer_with_mean_touches_nothing_and_stops_once_entered() -> None:
    levels, stop = levels_and_stop("mean")
    unlearner = RecordingUnlearner()
    check = stop.start()
    assert check.entered and stop.steer(unlearner, check) and stop.stops()
    assert unlearner.calls == [] and not stop.per_level
    _, high = levels_and_stop("mean", target=(1 + max(levels)) / 2)
    assert not high.steer(unlearner, high.start()) and unlearner.calls == []


def test_steer_with_per_level_turns_the_forget_term_off_where_levels_arrived() -> None:
    levels, _ = levels_and_stop("mean")
    mean = sum(levels) / len(levels)
    _, stop = levels_and_stop("per_level", target=(min(levels) + mean) / 2)
    assert stop.per_level
    unlearner = RecordingUnlearner()
    check = stop.start()
    assert not stop.steer(unlearner, check)  # some levels are there, not all
    [(name, weights)] = unlearner.calls
    assert name == "restrict_forget"
    assert torch.equal(weights, stop.forget_timestep_weights(check))
    assert 0 < weights.sum() < len(weights)  # off at some noise levels, on at others
    _, low = levels_and_stop("per_level")
    unlearner = RecordingUnlearner()
    assert low.steer(unlearner, low.start())  # every level there: stop
    [(name, weights)] = unlearner.calls
    assert name == "restrict_forget" and not weights.any()


def test_steer_with_level_sets_the_forget_level_and_never_stops() -> None:
    _, stop = levels_and_stop("level")
    assert stop.timesteps == LEVEL_TIMESTEPS  # the level's default: more noise levels
    unlearner = RecordingUnlearner()
    check = stop.start()
    assert check.entered and not stop.steer(unlearner, check) and not stop.stops(check)
    [(name, level)] = unlearner.calls
    assert name == "set_forget_level"
    assert torch.equal(level, stop.forget_level())
    scheduler = DDPMScheduler()
    explicit = NonmemberStop(
        stop.model, scheduler, stop.forget, stop.references, rule="level", timesteps=(50, 100)
    )
    assert explicit.timesteps == (50, 100)


def test_steer_with_anneal_turns_the_forget_term_off_for_good_and_never_stops() -> None:
    levels, _ = levels_and_stop("mean")
    _, high = levels_and_stop("anneal", target=(1 + max(levels)) / 2)
    unlearner = RecordingUnlearner()
    check = high.start()
    assert not check.entered and not high.steer(unlearner, check) and not high.annealed
    assert high.annealed_at is None
    assert unlearner.calls == []  # below the target: the forget term as configured
    _, stop = levels_and_stop("anneal")
    check = stop.start()
    assert check.entered and not stop.steer(unlearner, check) and not stop.stops(check)
    [(name, weights)] = unlearner.calls
    assert name == "restrict_forget" and weights.shape == (1000,) and not weights.any()
    stop.target = (1 + max(levels)) / 2  # the forget set falls back below the target
    check = stop.check(10)
    assert not check.entered and stop.annealed and stop.annealed_at == 0
    assert not stop.steer(unlearner, check)
    assert len(unlearner.calls) == 2 and not unlearner.calls[1][1].any()  # still off


def test_track_weights_integrate_each_level_s_distance_from_the_target() -> None:
    """``rule="track"``: each level's weight starts at 1 and every check adds
    ``TRACK_GAIN * (target - percentile)``, clipped to [-1, 1]; an unmeasured level keeps its
    weight; replayed from the history up to the check asked about."""
    _, stop = levels_and_stop("track", target=0.5)
    assert stop.timesteps == TRACK_TIMESTEPS == LEVEL_TIMESTEPS[1:]
    assert TRACK_GAIN == 2.0 and TRACK_LIMIT == 1.0
    count = len(TRACK_TIMESTEPS)

    def check(step: int, values: list[float]) -> NonmemberCheck:
        return NonmemberCheck(step, 0.5, tuple(values), True, (0.0,) * count)

    stop.history = [
        check(0, [0.0] * count),  # below the target: clipped at 1
        check(10, [1.0] * (count - 1) + [math.nan]),  # past it: 1 + 2 * (0.5 - 1) = 0
        check(20, [0.75] * (count - 1) + [math.nan]),  # 0 + 2 * (0.5 - 0.75) = -0.5
        check(30, [1.0] * (count - 1) + [0.25]),  # -0.5 - 1 clipped at -1; 1 + 0.5 clipped at 1
    ]
    expected = [[1.0] * count, [0.0] * (count - 1) + [1.0], [-0.5] * (count - 1) + [1.0]]
    for past, weights in zip(stop.history, expected, strict=False):
        assert stop.tracking_weights(past).tolist() == weights
    assert stop.tracking_weights(stop.history[-1]).tolist() == [-1.0] * (count - 1) + [1.0]
    grid = stop.forget_timestep_weights(stop.history[2])
    assert grid.shape == (1000,) and set(grid.tolist()) == {-0.5, 1.0}
    assert grid[999] == 1.0 and grid[0] == -0.5  # the most noisy level is the last one


def test_steer_with_track_restricts_the_forget_term_signed_and_never_stops() -> None:
    _, stop = levels_and_stop("track")  # every level past the target at the start
    unlearner = RecordingUnlearner()
    check = stop.start()
    assert check.entered and not stop.steer(unlearner, check) and not stop.stops(check)
    [(name, weights)] = unlearner.calls
    assert name == "restrict_forget" and torch.equal(weights, stop.forget_timestep_weights(check))
    assert bool((weights < 1).all())  # past the target everywhere: every weight lowered


def test_a_bad_rule_is_named() -> None:
    forget, references = torch.zeros(1, *SHAPE), torch.randn(4, *SHAPE)
    with pytest.raises(ValueError, match="`rule` must be one of 'mean', 'per_level', 'level'"):
        NonmemberStop(lambda x, t: x, DDPMScheduler(), forget, references, rule="median")
