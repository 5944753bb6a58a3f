"""benchmarks/memory.py (issue 25, section 4): the memory formula against a direct count.

On a tiny UNet materialised on the CPU, every term of the formula is compared with the bytes
the recipe's objects actually hold (weights, ``.grad``, AdamW's state, the balancer's forget
buffer on a refresh step, the teacher); the LoRA count with PEFT's own. The published models
are built on the meta device only (no memory) and their sizes checked against the published
figures.
"""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from benchmarks import memory
from benchmarks.workloads import SD15_SMOKE
from siss.balancer import NormBalancer
from siss.recipe import teacher_for

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = memory.Part("UNet", "UNet2DConditionModel", SD15_SMOKE)


def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def refresh_step(model, params):
    """One refresh step of the balancer and AdamW on ``params``; the forget buffer's bytes."""
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    balancer = NormBalancer(params, ratio=0.1)
    sample = torch.randn(2, 4, 8, 8)
    out = model(sample, torch.tensor([10, 500]), encoder_hidden_states=torch.randn(2, 8, 32))
    out = out.sample
    balancer.backward(out.square().mean(), out.mean())
    forget = nbytes(balancer._forget)  # the buffer, held from the forget backward to step()
    gradients = nbytes(p.grad for p in params)
    balancer.step()
    optimizer.step()
    adam = nbytes(v for state in optimizer.state.values() for k, v in state.items() if k != "step")
    return gradients, adam, forget


def test_full_model_terms_match_what_the_recipe_holds():
    model = memory.build(TINY, "cpu")
    w = memory.count(model)
    params = list(model.parameters())
    predicted = memory.memory("ddp", denoiser=w, trainable=w, encoders=0, gpus=1)
    assert nbytes(params) == predicted.weights == 4 * w
    gradients, adam, forget = refresh_step(model, params)
    assert gradients == predicted.gradients
    assert adam == predicted.adam
    assert forget == predicted.balancer
    teacher = teacher_for(model)
    assert teacher.model is not model
    assert nbytes(teacher.model.parameters()) == predicted.teacher
    assert predicted.buckets == 0
    assert memory.memory("ddp", denoiser=w, trainable=w, encoders=0, gpus=4).buckets == 4 * w

    # bf16 storage of the frozen parts: 2 bytes a weight
    frozen = memory.build(TINY, "cpu").to(torch.bfloat16)
    lora = memory.memory("lora", denoiser=w, trainable=0, encoders=w, frozen_bytes=2)
    assert nbytes(frozen.parameters()) == lora.weights == lora.encoders == 2 * w


def test_fsdp_divides_the_sharded_terms_only():
    kwargs = {"denoiser": 1000, "trainable": 1000, "encoders": 10}
    one = memory.memory("fsdp", gpus=1, **kwargs)
    ddp = memory.memory("ddp", gpus=1, **kwargs)
    assert one == ddp
    for n in (2, 4, 8):
        sharded = memory.memory("fsdp", gpus=n, **kwargs)
        for term in ("weights", "gradients", "adam", "balancer"):
            assert getattr(sharded, term) == getattr(one, term) / n
        assert sharded.teacher == one.teacher and sharded.encoders == one.encoders
        assert memory.memory("fsdp", gpus=n, teacher_sharded=True, **kwargs).teacher == (
            one.teacher / n
        )
    assert memory.memory("fsdp", gpus=2, teacher=False, **kwargs).teacher == 0
    with pytest.raises(ValueError, match="mode"):
        memory.memory("zero3", **kwargs)


def test_lora_count_and_terms_match_peft_and_the_recipe():
    targets = memory.UNET_TARGETS
    meta = memory.build(TINY)
    counted = memory.lora_parameters(meta, 4, targets)
    assert next(meta.parameters()).is_meta
    peft_model = get_peft_model(memory.build(TINY, "cpu"), LoraConfig(r=4, target_modules=targets))
    assert counted == peft_model.get_nb_trainable_parameters()[0]

    model = memory.build(TINY, "cpu")
    w = memory.count(model)
    assert memory.lora_parameters(model, 4, targets) == counted
    params = [p for p in model.parameters() if p.requires_grad]
    base = [p for p in model.parameters() if not p.requires_grad]
    assert sum(p.numel() for p in base) == w and sum(p.numel() for p in params) == counted
    predicted = memory.memory("lora", denoiser=w, trainable=counted, encoders=0, frozen_bytes=4)
    assert nbytes(model.parameters()) == predicted.weights
    # built before the first step, as the recipe builds it: the fresh LoRA disabled, no copy
    assert teacher_for(model).model is model and predicted.teacher == 0
    gradients, adam, forget = refresh_step(model, params)
    assert (gradients, adam, forget) == (predicted.gradients, predicted.adam, predicted.balancer)


@pytest.mark.parametrize("name", list(memory.FAMILIES))
def test_published_sizes_within_one_percent(name):
    family = memory.FAMILIES[name]
    denoiser = memory.build(family.denoiser)
    assert next(denoiser.parameters()).is_meta
    published, _ = family.published
    assert memory.count(denoiser) == pytest.approx(published, rel=0.01)
    for part in family.frozen:
        size = memory.count(memory.build(part))
        assert size == pytest.approx(memory.PUBLISHED_FROZEN[part.label], rel=0.01), part.label


def test_main_prints_the_tables(capsys):
    assert memory.main(["--models", "sd15", "--gpus", "1", "2"]) == 0
    printed = capsys.readouterr().out
    assert "COMPUTED, NOT MEASURED" in printed
    assert "| sd15 | 859.52M | 860M" in printed
    assert "| sd15 | LoRA, 1 GPU |" in printed and "| sd15 | full, FSDP N=2 |" in printed
    assert "FSDP N=4" not in printed
    # the SD 1.5 LoRA of rank 4 on the attention projections: 797,184 parameters
    assert "0.80M" in printed
