"""siss.recipe: the configuration's validation and rules, and the Unlearner's step, calibration,
teacher and checkpoint state (tiny diffusers models from config, CPU)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import tiny_unet

from siss import RULES, NormBalancer, Unlearner, UnlearningConfig, teacher_for
from siss.recipe import CALIBRATION_FLOOR

pytestmark = pytest.mark.usefixtures("one_thread")


def scheduler(prediction_type: str = "epsilon"):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)


def batches(count: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    forget = torch.ones(1, 1, 8, 8)
    return [(torch.rand(4, 1, 8, 8, generator=generator) * 2 - 1, forget) for _ in range(count)]


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# --- configuration -------------------------------------------------------------------------------


def test_defaults_follow_the_methods_rules():
    siss = UnlearningConfig()
    assert (siss.keep_target, siss.balance_mode, siss.balance_every) == ("teacher", "absolute", 10)
    assert siss.balancer == "absolute" and siss.calibrated
    noise = UnlearningConfig(keep_target="noise")
    assert (noise.balance_mode, noise.balance_every, noise.calibrated) == ("fix", 1, False)
    assert UnlearningConfig(method="naive").balancer is None
    assert UnlearningConfig(method="neggrad").balancer is None
    assert UnlearningConfig(method="erasediff").balancer == "bilevel"
    assert UnlearningConfig(superfactor=0.3).balancer is None
    assert UnlearningConfig(method="neggrad").loss_kwargs(None, None)["superfactor"] == 1.0
    assert UnlearningConfig(superfactor=0.3).loss_kwargs(10, 1)["superfactor"] == 0.3
    assert UnlearningConfig().loss_kwargs(10, 1) == {
        "superfactor": 0.0,
        "snr_gamma": None,
        "lam": 0.5,
        "n": 10,
        "k": 1,
        "x_from": "retain",
    }


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("method", "sis"),
        ("lam", 1.5),
        ("lam", float("nan")),
        ("keep_target", "teachr"),
        ("superfactor", -1.0),
        ("ratio", -0.1),
        ("balance_mode", "bilevel"),
        ("balance_every", 0),
        ("calibration_batches", 0),
        ("calibration_batches", 2.0),
        ("timesteps", (500, 10)),
        ("timesteps", -1),
        ("x_from", "retained"),
        ("snr_gamma", 0.0),
        ("learning_rate", 0.0),
        ("lr_scheduler", "cosin"),
        ("lr_warmup_steps", -1),
        ("max_train_steps", -5),
        ("max_train_steps", True),
        ("ema_decay", 1.0),
        ("ema_power", 0.0),
        ("max_grad_norm", -1.0),
        ("seed", -1),
    ],
)
def test_each_bad_value_is_named_by_its_field(field, value):
    with pytest.raises(ValueError, match=rf"^UnlearningConfig\.{field}: .*{value!r}"[:60]):
        UnlearningConfig(**{field: value})


def test_timesteps_given_as_a_list_are_held_as_the_losses_take_them():
    config = UnlearningConfig(timesteps=[10, 500], keep_target="noise")
    assert config.timesteps == (10, 500) and config.to_dict()["timesteps"] == [10, 500]
    assert UnlearningConfig(timesteps=[999], keep_target="noise").timesteps == 999


def test_a_teacher_needs_siss_and_erasediff_refuses_flow():
    for method in RULES:
        if not RULES[method].teacher:
            with pytest.raises(ValueError, match="keep_target: 'teacher' needs SISS's keep term"):
                UnlearningConfig(method=method, keep_target="teacher")
    for prediction_type in ("flow_prediction", "v_prediction", "sample"):  # EraseDiffLoss's too
        with pytest.raises(ValueError, match=r"UnlearningConfig\.method: 'erasediff' cannot"):
            UnlearningConfig(method="erasediff").check_prediction_type(prediction_type)
    UnlearningConfig(method="erasediff").check_prediction_type("epsilon")


@pytest.mark.parametrize("lam", [0.0, 1.0, 0, 1])
def test_the_teacher_is_refused_at_the_lambda_extremes(lam):
    """Issue 23 §5: at λ = 0 the unbounded w_a enters the teacher's keep term (at λ = 1, w_x),
    which biases it (tests/test_losses.py::test_teacher_keep_term_is_biased_at_the_extremes).
    Left at its default the keep target is the noise one there; asked for, the teacher is
    refused, not silently swapped."""
    config = UnlearningConfig(lam=lam)
    assert (config.keep_target, config.balance_mode, config.balance_every) == ("noise", "fix", 1)
    weight = "w_a" if lam == 0 else "w_x"
    with pytest.raises(
        ValueError,
        match=rf"^UnlearningConfig\.keep_target: 'teacher' is biased at lam={lam:g}: "
        rf"the unbounded importance weight {weight}",
    ):
        UnlearningConfig(lam=lam, keep_target="teacher")
    assert UnlearningConfig(lam=0.01).keep_target == "teacher"  # inside (0, 1): the default
    # other methods do not read lam
    assert UnlearningConfig(method="naive", lam=lam).keep_target == "noise"


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"timesteps": 999}, "timesteps=999"),
        ({"timesteps": (0, 250)}, r"timesteps=\(0, 250\)"),
        ({"snr_gamma": 5.0}, "snr_gamma=5.0"),
        ({"timesteps": 10, "snr_gamma": 5.0, "keep_target": "teacher"}, "timesteps=10 and"),
    ],
)
def test_a_teacher_under_another_timestep_weighting_warns(fields, named):
    """Issue 23 §5: the teacher is unbiased where it is stationary for L_X under unlearning's
    own timestep distribution and weighting (tests/test_losses.py::
    test_teacher_bias_at_its_weights_is_the_gradient_of_l_x); a window, a fixed t or min-SNR
    weighting that pretraining did not use breaks that. The warning says why and what to do."""
    with pytest.warns(UserWarning, match=rf"keep_target='teacher' with {named}") as record:
        config = UnlearningConfig(**fields)
    assert config.keep_target == "teacher"
    message = str(record[0].message)
    assert "stationary" in message and "keep_target='noise'" in message
    assert record[0].filename == __file__  # points at the caller's line
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        UnlearningConfig(**{**fields, "keep_target": "noise"})  # the noise target: no warning
        UnlearningConfig()  # uniform timesteps, no weighting: no warning


# --- teacher -------------------------------------------------------------------------------------


def test_teacher_is_a_frozen_copy_of_a_plain_model():
    unet = tiny_unet()
    teacher = teacher_for(unet)
    assert teacher.model is not unet and not teacher.model.training
    assert not any(p.requires_grad for p in teacher.model.parameters())
    assert all(p.is_contiguous() for p in teacher.model.parameters())  # FSDP can shard it
    noisy, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 500])
    torch.testing.assert_close(teacher.predict(noisy, t), unet(noisy, t).sample, rtol=0, atol=0)


def test_the_unlearners_own_teacher_on_the_cpu_is_a_channels_last_copy():
    unet = tiny_unet()
    teacher = Unlearner(unet, scheduler(), UnlearningConfig(), n=101, k=1).teacher
    convolutions = 0
    for (name, copied), original in zip(
        teacher.model.named_parameters(), unet.parameters(), strict=True
    ):
        assert torch.equal(copied, original), name
        if copied.ndim == 4 and copied.shape[1] > 1 and copied.shape[-1] > 1:  # layouts differ
            assert copied.is_contiguous(memory_format=torch.channels_last), name
            assert not copied.is_contiguous(), name
            convolutions += 1
    assert convolutions > 0
    noisy, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 500])
    # the same weights in another layout: the same prediction up to float32 rounding
    torch.testing.assert_close(teacher.predict(noisy, t), unet(noisy, t).sample)


def _train_lora(lora_model) -> None:
    with torch.no_grad():  # LoRA starts as the identity (B = 0): what training changes
        for name, param in lora_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)


def _check_base_model_teacher(model, call, lora_model) -> None:
    teacher = teacher_for(lora_model)  # before the first step: the LoRA is still the identity
    assert teacher.model is lora_model  # no copy
    _train_lora(lora_model)
    base = call(model).detach()
    assert not torch.equal(call(lora_model), base)  # the adapter changes the output...
    torch.testing.assert_close(call(teacher), base, rtol=0, atol=0)  # ...not the teacher's
    assert not torch.equal(call(lora_model), base)  # and is enabled again

    # A LoRA that already changes the output (trained, or loaded with load_lora_weights) is part
    # of the model before unlearning: the teacher is a frozen copy with it, not the base model.
    before = call(lora_model).detach()
    teacher = teacher_for(lora_model)
    assert teacher.model is not lora_model and not teacher.model.training
    _train_lora(lora_model)  # unlearning moves the LoRA on
    assert not torch.equal(call(lora_model), before)
    torch.testing.assert_close(call(teacher), before, rtol=0, atol=0)


def test_teacher_of_a_diffusers_lora_is_the_model_before_unlearning():
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    noisy, t, text = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 3, 8)
    base = copy.deepcopy(unet)
    unet.add_adapter(
        LoraConfig(r=2, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v"])
    )

    def call(model):
        if hasattr(model, "predict"):
            return model.predict(noisy, t, encoder_hidden_states=text)
        return model(noisy, t, encoder_hidden_states=text).sample

    _check_base_model_teacher(base, call, unet)


def test_teacher_of_a_peft_model_is_the_model_before_unlearning():
    from peft import LoraConfig, get_peft_model

    unet = tiny_unet()
    base = copy.deepcopy(unet)
    lora = get_peft_model(
        unet, LoraConfig(r=2, init_lora_weights="gaussian", target_modules=["conv1", "conv2"])
    )
    noisy, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 500])

    def call(model):
        return model.predict(noisy, t) if hasattr(model, "predict") else model(noisy, t).sample

    _check_base_model_teacher(base, call, lora)


# --- the step ------------------------------------------------------------------------------------


def test_calibration_measures_without_training_then_the_balancer_is_held():
    unet = tiny_unet()
    config = UnlearningConfig(calibration_batches=3, balance_every=2, max_train_steps=4)
    unlearner = Unlearner(unet, scheduler(), config, n=101, k=1)
    start = flat(unet)
    for x0, a0 in batches(3):
        result = unlearner.step(x0, a0)
        assert result.calibrating and not result.optimizer_step
        assert torch.equal(flat(unet), start), "a calibration batch moved the weights"
        assert all(p.grad is None for p in unet.parameters())
    assert unlearner.scale is not None and unlearner.scale > 0
    assert unlearner.balancer.target_norm == pytest.approx(0.1 * unlearner.scale)
    refreshed = []
    for x0, a0 in batches(4, seed=2):
        result = unlearner.step(x0, a0)
        assert result.optimizer_step and not result.calibrating and not result.skipped
        refreshed.append(result.stats.refreshed)
    assert refreshed == [True, False, True, False]
    assert not torch.equal(flat(unet), start)
    assert unlearner.optimizer_steps == 4 and unlearner.draws == 7


def test_back_off_scales_the_forget_weight_and_resumes_with_it():
    """``back_off(f)``: the calibrated absolute target (or a fixed superfactor) times ``f`` from
    the next step on, saved and restored with the recipe's state; refused where the forget
    weight is the method's own rule."""
    unet = tiny_unet()
    config = UnlearningConfig(calibration_batches=2, max_train_steps=4)
    unlearner = Unlearner(unet, scheduler(), config, n=101, k=1)
    for x0, a0 in batches(2):
        unlearner.step(x0, a0)
    full = unlearner.balancer.target_norm
    unlearner.back_off(0.5)
    unlearner.back_off(0.5)
    assert unlearner.forget_weight == 0.25
    assert unlearner.balancer.target_norm == pytest.approx(full / 4)
    again = Unlearner(tiny_unet(), scheduler(), config, n=101, k=1)
    again.load_state_dict(unlearner.state_dict())
    assert again.forget_weight == 0.25 and again.balancer.target_norm == pytest.approx(full / 4)
    fixed = Unlearner(tiny_unet(), scheduler(), UnlearningConfig(superfactor=2.0), n=101, k=1)
    fixed.back_off(0.5)
    assert fixed.loss_fn.superfactor == 1.0
    with pytest.raises(ValueError, match="factor"):
        fixed.back_off(0.0)
    naive = UnlearningConfig(method="naive")
    with pytest.raises(ValueError, match="no forget weight"):
        Unlearner(tiny_unet(), scheduler(), naive, n=101, k=1).back_off(0.5)


def test_restrict_and_cap_forget_reach_the_loss_and_resume_with_it():
    """``restrict_forget``/``set_forget_level``: the loss's per-timestep forget weights and level
    from the next step on, saved and restored with the recipe's state; refused for a method
    without SISS's forget term."""
    weights = (torch.arange(1000) < 300).float()
    unlearner = Unlearner(tiny_unet(), scheduler(), UnlearningConfig(), n=101, k=1)
    unlearner.restrict_forget(weights)
    assert torch.equal(unlearner.loss_fn.forget_timestep_weights, weights)
    again = Unlearner(tiny_unet(), scheduler(), UnlearningConfig(), n=101, k=1)
    again.load_state_dict(json.loads(json.dumps(unlearner.state_dict(), default=str)) | {
        "balancer": None, "ema": None})  # fmt: skip
    assert torch.equal(again.loss_fn.forget_timestep_weights, weights)
    unlearner.restrict_forget(None)
    unlearner.set_forget_level(weights + 0.5)
    again.load_state_dict(unlearner.state_dict())
    assert again.loss_fn.forget_timestep_weights is None
    assert torch.equal(again.loss_fn.forget_level, weights + 0.5)
    naive = Unlearner(tiny_unet(), scheduler(), UnlearningConfig(method="naive"), n=101, k=1)
    with pytest.raises(ValueError, match="SISS only"):
        naive.restrict_forget(weights)
    with pytest.raises(ValueError, match="SISS only"):
        naive.set_forget_level(weights + 0.5)


def test_calibrated_scale_is_the_median_naive_deletion_gradient_norm():
    """The scale equals ``siss.functional.median_gradient_norm`` of the same draws'
    noise-target keep terms."""
    from siss.adapters import adapter_for
    from siss.functional import median_gradient_norm

    unet = tiny_unet()
    reference = copy.deepcopy(unet)
    unlearner = Unlearner(unet, scheduler(), UnlearningConfig(calibration_batches=3), n=101, k=1)
    data = batches(3)
    generators = [torch.Generator().manual_seed(i) for i in range(3)]
    for (x0, a0), generator in zip(data, generators, strict=True):
        unlearner.step(x0, a0, generator=generator)
    adapter, loss_fn = adapter_for(reference), unlearner.loss_fn
    losses = (
        adapter.loss(x0, a0, loss_fn, generator=torch.Generator().manual_seed(i)).keep
        for i, (x0, a0) in enumerate(data)
    )
    assert unlearner.scale == median_gradient_norm(list(reference.parameters()), losses)


def test_the_step_gives_the_loss_the_teachers_prediction_without_a_graph():
    """At the starting weights the teacher (a frozen copy in the model's layout) predicts what
    the model does, taken under inference mode; the keep term is then ``teacher_siss_terms``'
    with zero distillation. (The Unlearner's own copy runs channels-last on the CPU, equal up to
    float32 rounding: test_the_unlearners_own_teacher_on_the_cpu_is_a_channels_last_copy.)"""
    unet = tiny_unet()
    config = UnlearningConfig(superfactor=0.1)
    unlearner = Unlearner(unet, scheduler(), config, n=101, k=1, teacher=teacher_for(unet))
    seen = {}
    terms = unlearner.loss_fn.terms

    def spy(prediction, draw, weights=None, teacher_output=None):
        seen.update(prediction=prediction.detach(), teacher=teacher_output, draw=draw)
        return terms(prediction, draw, weights=weights, teacher_output=teacher_output)

    unlearner.loss_fn.terms = spy
    x0, a0 = batches(1)[0]
    result = unlearner.step(x0, a0)
    assert result.optimizer_step and result.stats is None  # a fixed superfactor: no balancer
    assert seen["teacher"].is_inference() and not seen["teacher"].requires_grad
    torch.testing.assert_close(seen["teacher"], seen["prediction"], rtol=0, atol=0)
    plain = terms(seen["prediction"], seen["draw"])  # the noise target, same draw
    assert plain.keep.item() > 0 and result.terms.keep.item() < plain.keep.item()


@pytest.mark.parametrize(
    "settings",
    [
        {"keep_target": "noise"},  # the balancer skips
        # no balancer: a fixed superfactor (clipped, or not), a method with nothing to balance
        {"superfactor": 0.1, "keep_target": "noise"},
        {"superfactor": 0.1, "max_grad_norm": 0.0},
        {"method": "naive"},
        {"method": "neggrad"},
    ],
)
def test_non_finite_gradients_skip_the_step(settings):
    """A NaN in one batch moves nothing, with a balancer or without (without, it made every
    weight and the EMA NaN for the rest of the run, and said ``skipped=False``)."""
    unet = tiny_unet()
    config = UnlearningConfig(ema_decay=0.9, **settings)
    unlearner = Unlearner(unet, scheduler(), config, n=101, k=1)
    while unlearner.calibrating:
        unlearner.step(*batches(1)[0])
    start = flat(unet)
    x0, a0 = batches(1)[0]
    if config.method == "neggrad":
        x0, a0 = None, a0 * float("nan")
    else:
        x0 = x0 * float("nan")
    result = unlearner.step(x0, a0)
    assert result.skipped and result.optimizer_step
    assert torch.equal(flat(unet), start)
    assert all(p.grad is None for p in unet.parameters())
    assert all(not state for state in unlearner.optimizer.state.values())
    assert all(torch.isfinite(p).all() for p in unlearner.ema.shadow_params)
    result = unlearner.step(*batches(2)[1])  # and the run goes on
    assert not result.skipped and torch.isfinite(flat(unet)).all()


@pytest.mark.parametrize(
    "method", ["siss", "siss-nois", "naive", "neggrad", "erasediff", "retrack"]
)
def test_every_method_trains(method):
    unet = tiny_unet()
    config = UnlearningConfig(method=method, calibration_batches=1)
    unlearner = Unlearner(unet, scheduler(), config, n=101, k=1)
    start = flat(unet)
    for x0, a0 in batches(3):
        result = unlearner.step(None if method == "neggrad" else x0, a0)
    assert result.optimizer_step and not result.skipped
    assert torch.isfinite(flat(unet)).all() and not torch.equal(flat(unet), start)


def test_the_teacher_target_without_n_and_k_is_refused_when_built():
    """Not at the first step after the calibration (the loss's error, about `teacher_output`)."""
    with pytest.raises(ValueError, match=r"`n` and `k` \(\|X\| and \|A\|\) are needed"):
        Unlearner(tiny_unet(), scheduler(), UnlearningConfig(), k=1)
    Unlearner(tiny_unet(), scheduler(), UnlearningConfig(keep_target="noise"))  # needs neither


def test_erasediff_is_refused_for_a_flow_or_v_prediction_model():
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    for noise_scheduler in (
        FlowMatchEulerDiscreteScheduler(),
        DDPMScheduler(prediction_type="v_prediction"),
    ):
        with pytest.raises(ValueError, match=r"UnlearningConfig\.method: 'erasediff' cannot"):
            Unlearner(tiny_unet(), noise_scheduler, UnlearningConfig("erasediff"))


def test_ema_weights_are_averaged_and_restored():
    unet = tiny_unet()
    config = UnlearningConfig(keep_target="noise", ema_decay=0.9, learning_rate=1e-3)
    unlearner = Unlearner(unet, scheduler(), config, n=101, k=1)
    for x0, a0 in batches(3):
        unlearner.step(x0, a0)
    trained = flat(unet)
    with unlearner.averaged_weights():
        averaged = flat(unet)
    assert not torch.equal(averaged, trained) and torch.equal(flat(unet), trained)


# --- resume --------------------------------------------------------------------------------------


def _accelerated_run(tmp_path, stop: int | None, resume: bool, steps: int = 8):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True, mixed_precision="bf16", gradient_accumulation_steps=2)
    unet = accelerator.prepare(tiny_unet())
    config = UnlearningConfig(calibration_batches=2, balance_every=3, max_train_steps=steps)
    unlearner = Unlearner(unet, scheduler(), config, n=101, k=1, accelerator=accelerator)
    data = batches(2 * (2 + steps))
    start = 0
    if resume:
        accelerator.load_state(str(tmp_path / "state"))
        start = unlearner.draws
    for index in range(start, len(data)):
        unlearner.step(*data[index])
        if stop is not None and index + 1 == stop:
            accelerator.save_state(str(tmp_path / "state"))
            break
    weights = flat(accelerator.unwrap_model(unet))
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return weights, unlearner


def test_resume_is_bit_identical(tmp_path):
    """Stop in the middle (after calibration, between balancer refreshes), save with accelerate,
    resume in new objects: the weights equal an uninterrupted run's, bf16 and accumulation 2."""
    whole, _ = _accelerated_run(tmp_path, stop=None, resume=False)
    _, stopped = _accelerated_run(tmp_path, stop=10, resume=False)
    assert stopped.optimizer_steps == 3 and stopped.scale is not None
    resumed, unlearner = _accelerated_run(tmp_path, stop=None, resume=True)
    assert unlearner.optimizer_steps == 8
    assert torch.equal(whole, resumed)


def test_a_save_between_micro_batches_is_refused_naming_when_to_save(tmp_path):
    """Accumulation 2: after 9 micro-batches (2 optimizer steps and half of the third) the
    accumulated gradient is in no checkpoint, so the save is refused rather than resumed wrong."""
    from accelerate.state import AcceleratorState, GradientState

    try:
        with pytest.raises(RuntimeError, match="between the micro-batches of one optimizer step"):
            _accelerated_run(tmp_path, stop=9, resume=False)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def test_resume_refuses_other_settings(tmp_path):
    unet = tiny_unet()
    unlearner = Unlearner(unet, scheduler(), UnlearningConfig(), n=101, k=1)
    state = unlearner.state_dict()
    other = Unlearner(tiny_unet(), scheduler(), UnlearningConfig(lam=0.3, ratio=0.2), n=101, k=1)
    with pytest.raises(ValueError, match=r"lam: saved 0\.5, now 0\.3; ratio: saved 0\.1, now 0\.2"):
        other.load_state_dict(state)


def test_balancer_state_round_trips():
    model = torch.nn.Linear(3, 1)
    balancer = NormBalancer(model.parameters(), every=3)
    out = model(torch.randn(5, 3))
    balancer.backward(out.square().mean(), out.mean())
    balancer.step()
    state = balancer.state_dict()
    again = NormBalancer(model.parameters(), every=3)
    again.load_state_dict(state)
    assert torch.equal(again.coefficient, balancer.coefficient)
    assert again.state_dict()["since_refresh"] == 1


# --- fp16 loss scaling -------------------------------------------------------------------------


class _ScalingAccelerator:
    """What ``Unlearner`` uses of an fp16 ``accelerate.Accelerator``, around torch's own
    ``GradScaler`` (accelerate gives none on the CPU): the scaled backward, and an optimizer
    whose ``step`` is the scaler's step and update, as ``AcceleratedOptimizer``'s is."""

    num_processes = 1
    sync_gradients = True

    def __init__(self, scale: float) -> None:
        self.scaler = torch.amp.GradScaler("cpu", init_scale=scale)

    def backward(self, loss, **kwargs):
        self.scaler.scale(loss).backward(**kwargs)

    def accumulate(self, model):
        import contextlib

        return contextlib.nullcontext()

    def autocast(self):
        import contextlib

        return contextlib.nullcontext()

    def clip_grad_norm_(self, params, max_norm):
        self.scaler.unscale_(self.optimizer.inner)
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def prepare(self, optimizer):
        scaler = self.scaler

        class Stepping:
            inner = optimizer
            state = optimizer.state
            param_groups = optimizer.param_groups

            def step(self):
                scaler.step(optimizer)
                scaler.update()

            def zero_grad(self, set_to_none=True):
                optimizer.zero_grad(set_to_none=set_to_none)

        self.optimizer = Stepping()
        return self.optimizer

    def register_for_checkpointing(self, obj):
        pass


def test_fp16_loss_scaling_leaves_the_calibrated_update_unchanged_and_skips_overflows():
    """The absolute rule's target carries the loss scale, so a scaled run hands the optimizer
    the gradient an unscaled one does; a step with non-finite gradients moves nothing, keeps the
    optimizer state, and lowers the scale by the backoff factor, as GradScaler does on an
    overflow."""
    config = UnlearningConfig(
        calibration_batches=2, balance_every=1, learning_rate=1e-3, lr_scheduler="constant"
    )
    data = batches(4)
    generators = [torch.Generator().manual_seed(i) for i in range(4)]
    plain_model, scaled_model = tiny_unet(), tiny_unet()
    plain = Unlearner(plain_model, scheduler(), config, n=101, k=1)
    accelerator = _ScalingAccelerator(scale=2.0**10)
    inner = torch.optim.AdamW(scaled_model.parameters(), lr=1e-3, weight_decay=0.0)
    scaled = Unlearner(
        scaled_model,
        scheduler(),
        config,
        n=101,
        k=1,
        accelerator=accelerator,
        optimizer=accelerator.prepare(inner),
        lr_scheduler=torch.optim.lr_scheduler.LambdaLR(inner, lambda _: 1.0),
    )
    handed = {"plain": [], "scaled": []}  # the gradient each optimizer step is given
    for name, optimizer in (("plain", plain.optimizer), ("scaled", inner)):
        optimizer.register_step_pre_hook(
            lambda opt, *_, name=name: handed[name].append(
                torch.cat([p.grad.flatten() for g in opt.param_groups for p in g["params"]])
            )
        )
    for index, ((x0, a0), generator) in enumerate(zip(data, generators, strict=True)):
        plain.step(x0, a0, generator=generator)
        scaled.step(x0, a0, generator=torch.Generator().manual_seed(index))
        assert scaled.scale == pytest.approx(plain.scale, rel=1e-6)
    # after the calibration steps, each update's unscaled gradient is the plain run's to float32
    # rounding (the weights are not compared: Adam divides near-zero components by their own
    # root mean square, which can amplify that rounding far past float32's)
    assert len(handed["plain"]) == len(handed["scaled"]) == len(data) - 2
    for scaled_gradient, gradient in zip(handed["scaled"], handed["plain"], strict=True):
        atol = 1e-6 * float(gradient.abs().max())
        torch.testing.assert_close(scaled_gradient, gradient, rtol=1e-5, atol=atol)

    before, state = flat(scaled_model), copy.deepcopy(scaled.optimizer.inner.state_dict())
    scale = accelerator.scaler.get_scale()
    x0, a0 = data[0]
    result = scaled.step(x0 * float("nan"), a0)
    assert result.skipped and result.optimizer_step
    assert torch.equal(flat(scaled_model), before)
    assert accelerator.scaler.get_scale() == scale * accelerator.scaler.get_backoff_factor()
    after = scaled.optimizer.inner.state_dict()["state"]
    assert all(torch.equal(after[i]["exp_avg"], state["state"][i]["exp_avg"]) for i in after)
    result = scaled.step(x0, a0)
    assert not result.skipped and not torch.equal(flat(scaled_model), before)


def test_the_forget_window_reaches_the_loss_and_is_siss_only():
    config = UnlearningConfig(forget_timesteps=[0, 300])
    assert config.forget_timesteps == (0, 300)
    assert config.loss_kwargs(10, 1)["forget_timesteps"] == (0, 300)
    assert config.to_dict()["forget_timesteps"] == [0, 300]
    with pytest.raises(ValueError, match=r"forget_timesteps.*SISS's"):
        UnlearningConfig(method="naive", forget_timesteps=(0, 300))
    with pytest.raises(ValueError, match=r"forget_timesteps.*low > high"):
        UnlearningConfig(forget_timesteps=(300, 0))


def test_float16_weights_are_refused_for_the_unlearner_s_own_optimizer():
    """Its AdamW in float16 wrote inf into every weight at the first step (eps=1e-8 is 0 in
    float16), and every later step was skipped; with the caller's own optimizer it is theirs."""
    unet = tiny_unet().half()
    with pytest.raises(ValueError, match=r"float16 trainable parameters.*mixed precision"):
        Unlearner(unet, scheduler(), UnlearningConfig(), n=101, k=1)
    optimizer = torch.optim.SGD(unet.parameters(), lr=1e-3)
    assert Unlearner(unet, scheduler(), UnlearningConfig(), n=101, k=1, optimizer=optimizer)


def one_row_run(seed: int, steps: int) -> tuple[Unlearner, list[float], list[float]]:
    """SISS with the teacher at one row a step (3x16x16, n = 1001, k = 1): the run, its
    calibration norms and each optimizer step's gradient norm before clipping."""
    unet = tiny_unet(in_channels=3, out_channels=3, sample_size=16)
    config = UnlearningConfig(seed=seed, max_train_steps=steps)
    unlearner = Unlearner(unet, scheduler(), config, n=1001, k=1)
    calibration, before_clipping = [], []
    finish, clip = unlearner._finish_calibration, unlearner._clip

    def recorded_finish():
        calibration[:] = [norm.item() for norm in unlearner._norms]
        finish()

    def recorded_clip():
        grads = [p.grad for p in unlearner.params if p.grad is not None]
        before_clipping.append(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])))
        return clip()

    unlearner._finish_calibration, unlearner._clip = recorded_finish, recorded_clip
    generator = torch.Generator().manual_seed(100 + seed)
    forget = torch.rand(1, 3, 16, 16, generator=generator) * 2 - 1
    while unlearner.calibrating or unlearner.optimizer_steps < steps:
        unlearner.step(torch.rand(1, 3, 16, 16, generator=generator) * 2 - 1, forget)
    return unlearner, calibration, [norm.item() for norm in before_clipping]


@pytest.mark.parametrize("seed", range(6))
def test_one_row_a_step_calibrates_on_the_batches_that_measured_the_gradient(seed):
    """A row that drew the forget point has ``w_x ≈ 0``: its keep gradient is ~0, and the median
    of 8 one-row norms was ~0 in 4 runs of 16, which scaled the forget term to 0 for the whole
    run; here 4 of these 6 seeds took the median over unmeasured batches too. Now those are
    measured again."""
    unlearner, calibration, _ = one_row_run(seed, steps=1)
    assert len(calibration) >= 8
    measured = [n for n in calibration if n > CALIBRATION_FLOOR * max(calibration)]
    assert len(measured) >= 8
    assert unlearner.scale == pytest.approx(torch.tensor(measured).median().item())


@pytest.mark.parametrize("seed", [0, 2])
def test_one_row_a_step_holds_no_coefficient_from_a_batch_without_forget_rows(seed):
    """A refresh whose row drew the keep point has ``||g_forget||`` 1e-6 to 1e-8 of its usual
    size; its coefficient (1e5 to 1e7 times the usual) was held for 9 steps, whose gradients then
    were 2,000 to 150,000 times the target before clipping (seeds 0 and 2, steps 41-59)."""
    unlearner, _, before_clipping = one_row_run(seed, steps=60)
    target = unlearner.balancer.target_norm
    assert max(before_clipping) < 100 * target, (max(before_clipping), target)


def test_back_off_holds_after_the_next_step():
    """The calibrated target was set again from ``ratio x scale`` at every step, so a
    ``back_off`` lasted until the next step only."""
    unlearner = Unlearner(
        tiny_unet(), scheduler(), UnlearningConfig(calibration_batches=2), n=101, k=1
    )
    for x0, a0 in batches(3):
        unlearner.step(x0, a0)
    full = unlearner.balancer.target_norm
    unlearner.back_off(0.25)
    result = unlearner.step(*batches(4)[3])
    assert unlearner.balancer.target_norm == pytest.approx(full / 4)
    assert result.stats.refreshed
    achieved = (result.stats.coefficient * result.stats.forget_norm).item()
    assert achieved == pytest.approx(full / 4, rel=1e-5)
