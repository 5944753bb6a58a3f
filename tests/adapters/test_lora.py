"""LoRA checkpoints through accelerate: save_state writes the adapter only, load_state restores it
(and the optimizer) into a fresh model, other prepared models are untouched, mismatches raise."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_conditional_unet
from peft import LoraConfig
from safetensors.torch import load_file

from siss.adapters import LORA_CHECKPOINT_FILE, lora_state_dict, register_lora_checkpoint_hooks

pytestmark = pytest.mark.usefixtures("one_thread")

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture
def accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    def reset() -> None:  # accelerate's state is process-wide: start and leave none
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()

    reset()
    yield Accelerator(cpu=True)
    reset()


def lora_unet(rank: int = 2, seed: int = 0) -> torch.nn.Module:
    """The same base UNet every time (seed 0); the LoRA initialisation drawn after ``seed``."""
    unet = tiny_conditional_unet(seed=0)
    unet.requires_grad_(False)
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=rank, init_lora_weights="gaussian", target_modules=TARGETS))
    return unet


def train_one_step(unet, optimizer) -> None:
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    text = torch.randn(2, 3, 8, generator=generator)
    unet(
        sample, torch.tensor([10, 500]), encoder_hidden_states=text
    ).sample.square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def test_lora_state_dict_holds_the_adapter_only():
    unet = lora_unet()
    state = lora_state_dict(unet)
    trainable = {name for name, p in unet.named_parameters() if p.requires_grad}
    assert len(state) == len(trainable) > 0
    assert all("lora_A" in name or "lora_B" in name for name in state)
    assert all(v.device.type == "cpu" and not v.requires_grad for v in state.values())
    with pytest.raises(ValueError, match="`model` has no LoRA weights"):
        lora_state_dict(tiny_conditional_unet())


def test_save_state_writes_the_adapter_and_load_state_restores_it(accelerator, tmp_path):
    unet = lora_unet(seed=0)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    handles = register_lora_checkpoint_hooks(accelerator, unet)
    train_one_step(unet, optimizer)
    saved = lora_state_dict(unet)
    accelerator.save_state(str(tmp_path), safe_serialization=True)

    files = {p.name for p in tmp_path.iterdir()}
    assert LORA_CHECKPOINT_FILE in files
    assert not any(name.startswith("model") for name in files), files  # no full UNet
    assert not any(name.startswith(".") for name in files), files  # no temporary left behind
    on_disk = load_file(tmp_path / LORA_CHECKPOINT_FILE)
    assert on_disk.keys() == saved.keys()
    assert all(torch.equal(on_disk[k], saved[k]) for k in saved)
    exp_avg = [optimizer.state[p]["exp_avg"].clone() for p in params]
    for handle in handles:
        handle.remove()

    # a fresh model whose adapter starts elsewhere, and a fresh optimizer
    fresh = lora_unet(seed=5)
    assert any(not torch.equal(v, saved[k]) for k, v in lora_state_dict(fresh).items())
    base = {k: v.clone() for k, v in fresh.state_dict().items() if "lora" not in k}
    fresh_params = [p for p in fresh.parameters() if p.requires_grad]
    fresh_optimizer = torch.optim.AdamW(fresh_params, lr=1e-2)
    accelerator._models.clear()
    accelerator._optimizers.clear()
    fresh, fresh_optimizer = accelerator.prepare(fresh, fresh_optimizer)
    register_lora_checkpoint_hooks(accelerator, fresh)
    accelerator.load_state(str(tmp_path))

    restored = lora_state_dict(fresh)
    assert all(torch.equal(restored[k], saved[k]) for k in saved)
    after = fresh.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items())  # the base is untouched
    restored_avg = [fresh_optimizer.state[p]["exp_avg"] for p in fresh_params]
    assert all(torch.equal(a, b) for a, b in zip(restored_avg, exp_avg, strict=True))


def test_other_prepared_models_are_still_saved_and_loaded(accelerator, tmp_path):
    head = torch.nn.Linear(3, 2)
    unet = lora_unet()
    head, unet = accelerator.prepare(head, unet)  # the LoRA model second: indices shift
    register_lora_checkpoint_hooks(accelerator, unet)
    accelerator.save_state(str(tmp_path), safe_serialization=True)
    assert {p.name for p in tmp_path.iterdir()} >= {"model.safetensors", LORA_CHECKPOINT_FILE}
    assert not (tmp_path / "model_1.safetensors").exists()
    saved_head = {k: v.clone() for k, v in head.state_dict().items()}
    saved_lora = lora_state_dict(unet)
    with torch.no_grad():
        head.weight.add_(1.0)
        for name, parameter in unet.named_parameters():
            if "lora" in name:
                parameter.add_(1.0)
    accelerator.load_state(str(tmp_path))
    assert all(torch.equal(head.state_dict()[k], v) for k, v in saved_head.items())
    assert all(torch.equal(lora_state_dict(unet)[k], v) for k, v in saved_lora.items())


def test_a_checkpoint_of_another_adapter_raises(accelerator, tmp_path):
    unet = accelerator.prepare(lora_unet(rank=2))
    handles = register_lora_checkpoint_hooks(accelerator, unet)
    accelerator.save_state(str(tmp_path / "rank2"), safe_serialization=True)
    for handle in handles:
        handle.remove()
    accelerator._models.clear()
    other = accelerator.prepare(lora_unet(rank=4))
    register_lora_checkpoint_hooks(accelerator, other)
    with pytest.raises(ValueError, match="another LoRA rank"):
        accelerator.load_state(str(tmp_path / "rank2"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=LORA_CHECKPOINT_FILE):
        accelerator.load_state(str(tmp_path / "empty"))


def test_bad_arguments_raise_at_registration(accelerator):
    with pytest.raises(ValueError, match="`model` has no LoRA weights"):
        register_lora_checkpoint_hooks(accelerator, tiny_conditional_unet())
    with pytest.raises(ValueError, match="`filename`"):
        register_lora_checkpoint_hooks(accelerator, lora_unet(), filename="a/b.safetensors")
