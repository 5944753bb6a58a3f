"""Model adapters on tiny diffusers models built from config: one call, gradients, conditioning.

Every model has a few hundred thousand parameters at most and runs on 8x8 inputs, so each test
takes well under a second on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from conftest import tiny_conditional_unet, tiny_unet
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DiTTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    Transformer2DModel,
    UNet2DConditionModel,
    UNet2DModel,
)
from peft import LoraConfig, inject_adapter_in_model

from siss import SISSLoss
from siss.adapters import (
    DiTAdapter,
    ModelAdapter,
    SD3TransformerAdapter,
    UNet2DAdapter,
    UNet2DConditionAdapter,
    adapter_for,
    encode_latents,
    loss_from_scheduler,
    trainable_parameters,
)

pytestmark = pytest.mark.usefixtures("one_thread")


BATCH = 2
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _unet2d() -> UNet2DModel:
    return tiny_unet(
        in_channels=3,
        out_channels=3,
        attention_head_dim=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )


def _unet_condition(sdxl: bool = False) -> UNet2DConditionModel:
    extra: dict[str, Any] = {}
    if sdxl:
        extra = {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 4,
            "projection_class_embeddings_input_dim": 6 * 4 + 8,  # time_ids + text_embeds (8)
            "use_linear_projection": True,
        }
    return tiny_conditional_unet(cross_attention_dim=16, **extra)


def _dit() -> DiTTransformer2DModel:
    # out_channels = 2 * in_channels: a learned-variance head, as DiT-XL/2 has.
    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=1,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
    )


def _transformer2d() -> Transformer2DModel:
    return Transformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        num_layers=1,
        sample_size=8,
        patch_size=2,
        norm_type="ada_norm_zero",
        num_embeds_ada_norm=10,
    )


def _sd3() -> SD3Transformer2DModel:
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=8,
        pos_embed_max_size=8,
    )


def _text(g: torch.Generator, rows: int = BATCH) -> dict[str, Any]:
    return {"encoder_hidden_states": torch.randn(rows, 5, 16, generator=g)}


def _sdxl(g: torch.Generator, rows: int = BATCH) -> dict[str, Any]:
    return {
        "encoder_hidden_states": torch.randn(rows, 5, 16, generator=g),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(rows, 8, generator=g),
            "time_ids": torch.tensor([[8.0, 8.0, 0.0, 0.0, 8.0, 8.0]]).repeat(rows, 1),
        },
    }


def _labels(g: torch.Generator, rows: int = BATCH) -> dict[str, Any]:
    return {"class_labels": torch.randint(0, 10, (rows,), generator=g)}


def _sd3_cond(g: torch.Generator, rows: int = BATCH) -> dict[str, Any]:
    return {
        "encoder_hidden_states": torch.randn(rows, 5, 16, generator=g),
        "pooled_projections": torch.randn(rows, 8, generator=g),
    }


@dataclass
class Case:
    build: Callable[[], torch.nn.Module]
    adapter: type[ModelAdapter]
    scheduler: Callable[[], Any]
    conditioning: Callable[..., dict[str, Any]]
    channels: int
    peft_mixin: bool  # model.add_adapter (diffusers' PEFT integration) vs peft.inject_adapter


CASES = {
    "unet2d": Case(_unet2d, UNet2DAdapter, DDPMScheduler, lambda g, rows=BATCH: {}, 3, False),
    "unet2d-condition": Case(
        _unet_condition,
        UNet2DConditionAdapter,
        lambda: DDPMScheduler(beta_schedule="scaled_linear"),
        _text,
        4,
        True,
    ),
    "unet2d-condition-sdxl": Case(
        lambda: _unet_condition(sdxl=True),
        UNet2DConditionAdapter,
        lambda: DDIMScheduler(prediction_type="v_prediction"),
        _sdxl,
        4,
        True,
    ),
    "dit": Case(_dit, DiTAdapter, DDPMScheduler, _labels, 4, False),
    "transformer2d": Case(_transformer2d, DiTAdapter, DDPMScheduler, _labels, 4, False),
    "sd3": Case(
        _sd3,
        SD3TransformerAdapter,
        lambda: FlowMatchEulerDiscreteScheduler(shift=3.0),
        _sd3_cond,
        4,
        True,
    ),
}


def _model(case: Case, lora: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = case.build()
    if lora:
        # init_lora_weights=False: random B, so that lora_A receives a non-zero gradient too.
        config = LoraConfig(r=2, lora_alpha=2, target_modules=LORA_TARGETS, init_lora_weights=False)
        if case.peft_mixin:
            model.add_adapter(config)
        else:
            inject_adapter_in_model(config, model)
    return model


def _inputs(case: Case, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(BATCH, case.channels, 8, 8, generator=g)
    a0 = torch.randn(1, case.channels, 8, 8, generator=g)
    return x0, a0, case.conditioning(g)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("name", list(CASES))
def test_forward_backward_reaches_exactly_the_trainable_parameters(name, lora):
    case = CASES[name]
    model = _model(case, lora)
    assert sum(p.numel() for p in model.parameters()) < 400_000
    loss_fn = loss_from_scheduler(SISSLoss, case.scheduler(), lam=0.5, superfactor=0.1)
    x0, a0, conditioning = _inputs(case)
    adapter = case.adapter(model)

    terms = adapter.loss(
        x0, a0, loss_fn, generator=torch.Generator().manual_seed(1), **conditioning
    )
    assert terms.loss.shape == () and torch.isfinite(terms.loss)
    terms.loss.backward()

    trainable = {id(p) for p in trainable_parameters(model)}
    assert trainable
    for param_name, param in model.named_parameters():
        if id(param) in trainable:
            assert param.grad is not None, param_name
            assert torch.isfinite(param.grad).all(), param_name
        else:
            assert param.grad is None, param_name
    if lora:
        assert all("lora_" in n for n, p in model.named_parameters() if id(p) in trainable)
        assert any(p.grad.abs().sum() > 0 for p in trainable_parameters(model))
    else:
        assert len(trainable) == len(list(model.parameters()))


@pytest.mark.parametrize("name", list(CASES))
def test_adapter_for_picks_the_model_family(name):
    case = CASES[name]
    model = case.build()
    assert type(adapter_for(model)) is case.adapter
    assert adapter_for(model).model is model


def test_adapter_looks_through_wrappers_and_rejects_other_models():
    model = _unet2d()
    assert isinstance(adapter_for(torch.nn.DataParallel(model)), UNet2DAdapter)
    with pytest.raises(TypeError, match="UNet2DConditionAdapter wraps UNet2DConditionModel"):
        UNet2DConditionAdapter(model)
    with pytest.raises(
        TypeError, match=r"no adapter for Linear \(`model`\); supported: UNet2DModel"
    ):
        adapter_for(torch.nn.Linear(2, 2))


def test_one_model_call_on_the_draw():
    case = CASES["unet2d-condition"]
    model = _model(case, lora=False)
    loss_fn = loss_from_scheduler(SISSLoss, case.scheduler(), lam=0.5, superfactor=0.1)
    x0, a0, conditioning = _inputs(case)
    calls = []
    model.register_forward_hook(lambda module, args, output: calls.append(args[0].shape))

    terms = UNet2DConditionAdapter(model).loss(
        x0, a0, loss_fn, generator=torch.Generator().manual_seed(3), **conditioning
    )
    assert calls == [x0.shape]
    draw = loss_fn.sample(x0, a0, generator=torch.Generator().manual_seed(3))
    output = model(draw.noisy, draw.timesteps, **conditioning).sample
    torch.testing.assert_close(terms.loss, loss_fn(output, draw))


@pytest.mark.parametrize("name", ["unet2d-condition-sdxl", "dit", "sd3"])
def test_two_block_draws_duplicate_every_conditioning_tensor(name):
    case = CASES[name]
    model = _model(case, lora=False).eval()  # no class dropout: the two calls must agree
    scheduler = case.scheduler()
    loss_fn = loss_from_scheduler("siss-nois", scheduler, superfactor=0.5)
    x0, a0, conditioning = _inputs(case)
    adapter = case.adapter(model)
    seen: list[dict[str, Any]] = []
    predict = adapter.predict

    def spy(noisy, timesteps, **kwargs):
        seen.append(kwargs)
        return predict(noisy, timesteps, **kwargs)

    adapter.predict = spy
    terms = adapter.loss(
        x0, a0, loss_fn, generator=torch.Generator().manual_seed(4), **conditioning
    )

    draw = loss_fn.sample(x0, a0, generator=torch.Generator().manual_seed(4))
    assert draw.noisy.shape[0] == 2 * BATCH

    def doubled(value):
        if isinstance(value, dict):
            return {k: doubled(v) for k, v in value.items()}
        return torch.cat([value, value])

    expected = {k: doubled(v) for k, v in conditioning.items()}
    torch.testing.assert_close(seen[0], expected)
    output = predict(draw.noisy, draw.timesteps, **expected)
    torch.testing.assert_close(terms.loss, loss_fn(output, draw))


def test_neggrad_without_keep_points_takes_the_forget_batch():
    case = CASES["dit"]
    model = _model(case, lora=False)
    loss_fn = loss_from_scheduler("neggrad", case.scheduler())
    _, _, conditioning = _inputs(case)
    a0 = torch.randn(BATCH, 4, 8, 8)
    terms = DiTAdapter(model).loss(None, a0, loss_fn, **conditioning)
    assert torch.isfinite(terms.loss)


def test_conditioning_of_one_row_is_shared_by_every_row():
    case = CASES["unet2d-condition"]
    model = _model(case, lora=False)
    loss_fn = loss_from_scheduler(SISSLoss, case.scheduler(), lam=0.5, superfactor=0.1)
    x0, a0, _ = _inputs(case)
    prompt = torch.randn(1, 5, 16)
    adapter = UNet2DConditionAdapter(model)
    shared = adapter.loss(
        x0, a0, loss_fn, generator=torch.Generator().manual_seed(5), encoder_hidden_states=prompt
    )
    repeated = adapter.loss(
        x0,
        a0,
        loss_fn,
        generator=torch.Generator().manual_seed(5),
        encoder_hidden_states=prompt.repeat(BATCH, 1, 1),
    )
    torch.testing.assert_close(shared.loss, repeated.loss)


def test_mismatched_rows_raise_clear_errors():
    case = CASES["unet2d-condition"]
    model = _model(case, lora=False)
    loss_fn = loss_from_scheduler(SISSLoss, case.scheduler(), lam=0.5, superfactor=0.1)
    x0, a0, _ = _inputs(case)
    adapter = UNet2DConditionAdapter(model)
    with pytest.raises(ValueError, match=r"`encoder_hidden_states` has 3 rows; expected 2"):
        adapter.loss(x0, a0, loss_fn, encoder_hidden_states=torch.randn(3, 5, 16))
    with pytest.raises(ValueError, match="needs `encoder_hidden_states`"):
        adapter.loss(x0, a0, loss_fn)

    class TripleLoss(SISSLoss):
        def sample(self, x0, a0, timesteps=None, generator=None):
            return SimpleNamespace(noisy=torch.cat([x0] * 3), timesteps=torch.zeros(3 * len(x0)))

    with pytest.raises(ValueError, match="has 6 rows for a batch of 2; adapters support 2"):
        adapter.loss(
            x0, a0, TripleLoss(DDPMScheduler().alphas_cumprod, superfactor=0.1), **_text(None)
        )


def test_mixed_precision_under_autocast_reduces_in_float32():
    case = CASES["unet2d-condition-sdxl"]
    model = _model(case, lora=True)
    loss_fn = loss_from_scheduler(SISSLoss, case.scheduler(), lam=0.5, superfactor=0.1)
    x0, a0, conditioning = _inputs(case)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = UNet2DConditionAdapter(model).loss(x0, a0, loss_fn, **conditioning)
    assert terms.loss.dtype == torch.float32 and torch.isfinite(terms.loss)
    terms.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in trainable_parameters(model))


def test_flow_matching_three_lines():
    torch.manual_seed(0)
    transformer = _sd3()
    latents_x, latents_a = torch.randn(2, 4, 8, 8), torch.randn(1, 4, 8, 8)
    embeds, pooled = torch.randn(2, 5, 16), torch.randn(2, 8)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    # README: flow matching (SD3).
    loss_fn = loss_from_scheduler(SISSLoss, scheduler, lam=0.5, superfactor=0.1)
    adapter = adapter_for(transformer)
    adapter.loss(
        latents_x, latents_a, loss_fn, encoder_hidden_states=embeds, pooled_projections=pooled
    ).loss.backward()
    assert all(p.grad is not None for p in transformer.parameters())


def test_encode_latents_applies_shift_and_scaling_factor():
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        sample_size=16,
        scaling_factor=1.5,
        shift_factor=0.25,
    )
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    latents = encode_latents(vae, images, generator=torch.Generator().manual_seed(0))
    raw = vae.encode(images).latent_dist.sample(torch.Generator().manual_seed(0))
    assert latents.shape == (2, 4, 8, 8) and not latents.requires_grad
    torch.testing.assert_close(latents, (raw - 0.25) * 1.5)

    vae.register_to_config(shift_factor=None)
    unshifted = encode_latents(vae, images, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(unshifted, raw * 1.5)


@pytest.mark.parametrize("method", ["siss", "siss-nois", "erasediff", "retrack"])
def test_loss_passes_row_weights_and_draw_dependent_weights(method):
    """Per-row weights through the adapter: a tensor, or a callable of the draw (its timesteps).
    On a 2B-row draw the documented ``lambda draw: compute_snr(scheduler, draw.timesteps)``
    returns one weight a row; pair j's two rows share timestep j, so pair j takes row j's."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    from siss.adapters import adapter_for, loss_from_scheduler

    unet, scheduler = tiny_unet(), DDPMScheduler()
    loss_fn = loss_from_scheduler(method, scheduler, superfactor=0.1, reduction="none")
    adapter = adapter_for(unet)
    x0, a0 = torch.randn(4, 1, 8, 8), torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        plain = adapter.loss(x0, a0, loss_fn, generator=torch.Generator().manual_seed(1))
        draw = loss_fn.sample(x0, a0, generator=torch.Generator().manual_seed(1))
        rows = draw.timesteps.shape[0]
        assert rows == 4 or torch.equal(draw.timesteps[:4], draw.timesteps[4:])
        weighted = adapter.loss(
            x0, a0, loss_fn, generator=torch.Generator().manual_seed(1),
            weights=lambda d: compute_snr(scheduler, d.timesteps),
        )  # fmt: skip
        fixed = adapter.loss(
            x0, a0, loss_fn, generator=torch.Generator().manual_seed(1),
            weights=torch.full((4,), 2.0),
        )  # fmt: skip
        with pytest.raises(ValueError, match="`weights` must have shape \\(4,\\)"):
            adapter.loss(x0, a0, loss_fn, weights=lambda d: torch.ones(3))
    pair_weights = compute_snr(scheduler, draw.timesteps[:4])
    torch.testing.assert_close(weighted.loss, pair_weights * plain.loss)
    torch.testing.assert_close(fixed.loss, 2 * plain.loss)


# --- DiT: classifier-free guidance's label dropout, square inputs, configurations ---------------


def test_dit_label_dropout_is_drawn_by_the_generator_and_seen_by_the_teacher():
    """diffusers' DiT drops 10% of the labels in train mode with the global generator, in each
    block on its own; the adapter draws the drop with the loss's generator instead (the same
    draw, the same loss) and gives the dropped labels to the teacher too, which in eval mode
    would drop none: at the starting weights the teacher's prediction is the model's."""
    from siss.recipe import teacher_for

    torch.manual_seed(0)
    dit = _dit().train()
    adapter = DiTAdapter(dit)
    labels = torch.full((4000,), 3)
    seeded = [
        adapter.training_conditioning({"class_labels": labels}, torch.Generator().manual_seed(1))
        for _ in range(2)
    ]
    torch.testing.assert_close(seeded[0], seeded[1])
    dropped = seeded[0]["class_labels"] == 10  # the null class: num_embeds_ada_norm
    assert torch.equal(seeded[0]["class_labels"][~dropped], labels[~dropped])
    assert abs(dropped.float().mean().item() - 0.1) < 4 * (0.1 * 0.9 / 4000) ** 0.5
    dit.eval()
    assert adapter.training_conditioning({"class_labels": labels}, None)["class_labels"] is labels
    dit.train()

    noisy, t = torch.randn(64, 4, 8, 8), torch.full((64,), 500)
    null_and_three = torch.tensor([10, 3]).repeat(32)
    with torch.no_grad():  # predict drops none in train mode, the null class is a label
        first = adapter.predict(noisy, t, class_labels=null_and_three)
        torch.testing.assert_close(adapter.predict(noisy, t, class_labels=null_and_three), first)
        dit.eval()
        torch.testing.assert_close(adapter.predict(noisy, t, class_labels=null_and_three), first)
        dit.train()
    assert all(module.training for module in dit.modules())

    teacher = teacher_for(dit)  # a frozen copy in eval mode, which would drop no label
    with torch.no_grad():  # at the starting weights the model predicts what its teacher does
        torch.testing.assert_close(
            adapter.predict(noisy, t, class_labels=null_and_three),
            teacher.predict(noisy, t, class_labels=null_and_three),
        )
    seen = {}

    class Recording:  # the teacher, recording the labels it is given
        def predict(self, noisy, timesteps, **conditioning):
            seen["teacher"] = conditioning["class_labels"]
            return teacher.predict(noisy, timesteps, **conditioning)

    def record(module, args, kwargs):
        seen["model"] = kwargs["class_labels"]

    handle = dit.register_forward_pre_hook(record, with_kwargs=True)
    loss_fn = loss_from_scheduler(SISSLoss, DDPMScheduler(), superfactor=0.1, n=101, k=1)
    x0, a0 = torch.randn(64, 4, 8, 8), torch.randn(1, 4, 8, 8)
    losses = []
    for _ in range(2):
        with torch.no_grad():
            terms = adapter.loss(
                x0, a0, loss_fn, generator=torch.Generator().manual_seed(0), teacher=Recording(),
                class_labels=torch.full((64,), 3),
            )  # fmt: skip
        losses.append(terms.loss)
        assert torch.equal(seen["teacher"], seen["model"]) and (seen["model"] == 10).any()
    handle.remove()
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)  # the draw fixes the loss


def test_dit_takes_square_inputs_and_its_own_configuration_only():
    adapter = DiTAdapter(_dit())
    loss_fn = loss_from_scheduler(SISSLoss, DDPMScheduler(), superfactor=0.1)
    x0, a0 = torch.randn(2, 4, 8, 16), torch.randn(1, 4, 8, 16)
    with pytest.raises(ValueError, match="`x0` has spatial size 8x16; a DiT takes square"):
        adapter.loss(x0, a0, loss_fn, class_labels=torch.tensor([3]))
    with pytest.raises(ValueError, match=r"`class_labels` must lie in \[0, 10\]"):
        adapter.predict(torch.randn(1, 4, 8, 8), torch.tensor([5]), class_labels=torch.tensor([11]))
    pixart = Transformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=1, sample_size=8,
        patch_size=2, norm_type="ada_norm_single", cross_attention_dim=8,
    )  # fmt: skip
    continuous = Transformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=1, norm_num_groups=2
    )
    for model, norm_type in ((pixart, "ada_norm_single"), (continuous, "layer_norm")):
        with pytest.raises(TypeError, match=f"got norm_type='{norm_type}'"):
            adapter_for(model)


def test_a_loss_class_instead_of_an_instance_is_named():
    adapter = adapter_for(_unet2d())
    x0, a0 = torch.randn(2, 3, 8, 8), torch.randn(1, 3, 8, 8)
    for loss_fn in (SISSLoss, object()):
        with pytest.raises(TypeError, match="`loss_fn` must be an unlearning loss"):
            adapter.loss(x0, a0, loss_fn)
    with pytest.raises(TypeError, match=r"got the class SISSLoss \(pass an instance\)"):
        adapter.loss(x0, a0, SISSLoss)
