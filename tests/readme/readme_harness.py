"""Run README.md's marked code blocks as written, with tiny real objects bound to their names.

A block is marked by ``<!-- test: NAME -->`` on the line before its opening ```` ```python ````
fence. ``run_block`` compiles it with README.md's own line numbers, so a traceback points into the
README. The namespaces mimic diffusers' ``train_unconditional.py`` and
``train_text_to_image_lora.py`` at the point where the blocks go (after ``accelerator.prepare``),
with the scripts' names: ``accelerator``, ``noise_scheduler``, ``weight_dtype``,
``train_dataloader``, ``optimizer``, ``lr_scheduler``, ``args``, ``model`` / ``unet``, ``vae``,
``text_encoder``, plus ``forget_set`` (one image).

Used by ``tests/test_readme.py`` in-process and by ``two_ranks.py`` under ``torchrun``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

README = Path(__file__).resolve().parents[2] / "README.md"
_MARKED = re.compile(r"^<!-- test: ([\w-]+) -->\n```python\n(.*?)^```$", re.M | re.S)

KEEP_BATCHES = 20  # unconditional: 80 keep images in batches of 4
LORA_KEEP_BATCHES = 10
BATCH = 4


def readme_blocks(path: Path = README) -> dict[str, tuple[int, str]]:
    """``{name: (first code line, code)}`` of every marked block, in README order."""
    text = path.read_text(encoding="utf-8")
    blocks: dict[str, tuple[int, str]] = {}
    for match in _MARKED.finditer(text):
        first_line = text.count("\n", 0, match.start(2)) + 1
        if match.group(1) in blocks:
            raise ValueError(f"README.md marks two blocks `{match.group(1)}`")
        blocks[match.group(1)] = (first_line, match.group(2))
    return blocks


def run_block(name: str, namespace: dict[str, Any], path: Path = README) -> None:
    """``exec`` the block as written, with README.md's file name and line numbers."""
    blocks = readme_blocks(path)
    if name not in blocks:
        raise KeyError(f"README.md has no block marked `<!-- test: {name} -->`: {sorted(blocks)}")
    first_line, code = blocks[name]
    exec(compile("\n" * (first_line - 1) + code, str(path), "exec"), namespace)


def run_loop(namespace: dict[str, Any], recorder: StepRecorder, loop: str) -> None:
    """The setup block, then ``loop`` (``"readme-loop"`` or ``"readme-lora"``); the recipe's
    block (``"readme-recipe"``) alone."""
    with recorder.watching_balancer():
        if loop != "readme-recipe":
            run_block("readme-setup", namespace)
        run_block(loop, namespace)


RECIPE_KEEP_BATCHES = 48  # 8 calibration steps of 2 micro-batches, then training, on 2 ranks too


def weight_dtype_of(accelerator: Any) -> torch.dtype:
    """The scripts' ``weight_dtype``."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        accelerator.mixed_precision, torch.float32
    )


def expected_syncs(micro_batches: int, accumulation: int = 2) -> list[bool]:
    """accelerate's ``sync_gradients`` per micro-batch: every ``accumulation``-th, and the last
    of the (prepared) keep loader."""
    return [(i + 1) % accumulation == 0 or i == micro_batches - 1 for i in range(micro_batches)]


def flat(params: list[nn.Parameter]) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten() for p in params])


@dataclass
class StepRecorder:
    """Per micro-batch, at the model call: ``sync_gradients``, the timesteps, the parameters.

    A forward pre-hook on the bare model (under DDP it still fires, from the wrapper's call).
    """

    accelerator: Any
    params: list[nn.Parameter]
    syncs: list[bool] = field(default_factory=list)
    timesteps: list[torch.Tensor] = field(default_factory=list)
    snapshots: list[torch.Tensor] = field(default_factory=list)

    backward_calls: int = 0
    balancer_steps: list[bool] = field(default_factory=list)

    def attach(self, model: nn.Module) -> StepRecorder:
        """Hook ``model`` and count ``accelerator.backward`` calls (still the real one)."""
        model.register_forward_pre_hook(self._hook)
        backward = self.accelerator.backward

        def counted_backward(*args: Any, **kwargs: Any) -> Any:
            self.backward_calls += 1
            return backward(*args, **kwargs)

        self.accelerator.backward = counted_backward
        return self

    @contextmanager
    def watching_balancer(self) -> Iterator[None]:
        """Record ``sync_gradients`` at each ``NormBalancer.step`` call (the real one runs)."""
        from siss import NormBalancer

        step = NormBalancer.step

        def recorded_step(balancer: NormBalancer) -> Any:
            self.balancer_steps.append(bool(self.accelerator.sync_gradients))
            return step(balancer)

        NormBalancer.step = recorded_step  # type: ignore[method-assign]
        try:
            yield
        finally:
            NormBalancer.step = step  # type: ignore[method-assign]

    def _hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if torch.is_inference_mode_enabled():  # a teacher's prediction, not a training call
            return
        self.syncs.append(bool(self.accelerator.sync_gradients))
        self.timesteps.append(args[1].detach().clone())
        self.snapshots.append(flat(self.params))

    def changed(self) -> list[bool]:
        """Whether micro-batch ``i`` moved the parameters (the next snapshot, or the end)."""
        after = [*self.snapshots[1:], flat(self.params)]
        return [not torch.equal(a, b) for a, b in zip(self.snapshots, after, strict=True)]


def tiny_unet() -> nn.Module:
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )


def _constant_lr(optimizer: torch.optim.Optimizer) -> Any:
    from diffusers.optimization import get_scheduler

    return get_scheduler("constant", optimizer=optimizer)


def unconditional_namespace(
    accelerator: Any, prediction_type: str = "v_prediction"
) -> tuple[dict[str, Any], StepRecorder]:
    """``train_unconditional.py`` after ``accelerator.prepare``: a 1x8x8 ``UNet2DModel``."""
    from diffusers import DDPMScheduler

    torch.manual_seed(0)  # the same initial model and data on every rank
    model = tiny_unet()
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    keep = [{"input": torch.rand(1, 8, 8) * 2 - 1} for _ in range(KEEP_BATCHES * BATCH)]
    forget_set = [{"input": torch.ones(1, 8, 8)}]  # fp32, as a dataset yields it
    train_dataloader = torch.utils.data.DataLoader(keep, batch_size=BATCH, shuffle=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    lr_scheduler = _constant_lr(optimizer)
    recorder = StepRecorder(accelerator, list(model.parameters())).attach(model)
    model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, lr_scheduler
    )
    namespace = {
        "torch": torch,
        "accelerator": accelerator,
        "args": SimpleNamespace(prediction_type=None),  # the script has no --snr_gamma
        "model": model,
        "noise_scheduler": noise_scheduler,
        "optimizer": optimizer,
        "lr_scheduler": lr_scheduler,
        "train_dataloader": train_dataloader,
        "weight_dtype": weight_dtype_of(accelerator),
        "forget_set": forget_set,
    }
    return namespace, recorder


def lora_namespace(
    accelerator: Any, keep_batches: int = LORA_KEEP_BATCHES
) -> tuple[dict[str, Any], StepRecorder]:
    """``train_text_to_image_lora.py`` after ``accelerator.prepare``: a tiny SD with LoRA.

    As in the script: every model in ``weight_dtype``, frozen, a PEFT LoRA on the UNet's
    attention, ``lora_layers`` a ``filter`` the optimizer has consumed, the scheduler epsilon and
    ``--prediction_type v_prediction`` given, ``--snr_gamma 5``.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from transformers import CLIPTextConfig, CLIPTextModel

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
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8),
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=16,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=64,
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=8,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    )
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000)
    weight_dtype = weight_dtype_of(accelerator)
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
        module.to(accelerator.device, dtype=weight_dtype)
    unet.add_adapter(
        LoraConfig(
            r=4,
            lora_alpha=4,
            init_lora_weights="gaussian",
            target_modules=["to_k", "to_q", "to_v", "to_out.0"],
        )
    )
    lora_layers = filter(lambda p: p.requires_grad, unet.parameters())
    optimizer = torch.optim.AdamW(lora_layers, lr=1e-3)

    def item() -> dict[str, torch.Tensor]:
        return {
            "pixel_values": torch.rand(3, 16, 16) * 2 - 1,
            "input_ids": torch.randint(0, 64, (8,)),
        }

    keep = [item() for _ in range(keep_batches * BATCH)]
    forget_set = [item()]
    train_dataloader = torch.utils.data.DataLoader(keep, batch_size=BATCH, shuffle=True)
    lr_scheduler = _constant_lr(optimizer)
    trainable = [p for p in unet.parameters() if p.requires_grad]
    recorder = StepRecorder(accelerator, trainable).attach(unet)
    unet, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        unet, optimizer, train_dataloader, lr_scheduler
    )
    namespace = {
        "torch": torch,
        "accelerator": accelerator,
        "args": SimpleNamespace(
            prediction_type="v_prediction",
            snr_gamma=5.0,
            max_grad_norm=1.0,
            max_train_steps=keep_batches,
            seed=0,
        ),
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "noise_scheduler": noise_scheduler,
        "optimizer": optimizer,
        "lr_scheduler": lr_scheduler,
        "train_dataloader": train_dataloader,
        "lora_layers": lora_layers,
        "weight_dtype": weight_dtype,
        "forget_set": forget_set,
    }
    return namespace, recorder


def check_recipe_loop(namespace: dict[str, Any], recorder: StepRecorder) -> None:
    """What the recipe's README block must do on each rank: calibrate without moving a weight,
    then train on sync steps only, with the LoRA's base model as the teacher."""
    from siss.recipe import _AdaptersDisabled, _Autocast

    unlearner = namespace["unlearner"]
    micro = len(recorder.syncs)
    assert micro == len(namespace["train_dataloader"]), f"ran {micro} micro-batches"
    assert recorder.syncs == expected_syncs(micro)
    calibration = 2 * unlearner.config.calibration_batches  # accumulation 2
    changed = recorder.changed()
    assert not any(changed[:calibration]), "a calibration batch moved the weights"
    assert changed[calibration:] == recorder.syncs[calibration:], "weights moved without a sync"
    assert unlearner.scale is not None and unlearner.scale > 0
    assert unlearner.optimizer_steps == micro // 2 - unlearner.config.calibration_batches > 0
    assert recorder.balancer_steps == [True] * unlearner.optimizer_steps
    assert isinstance(unlearner.teacher, _Autocast)
    assert isinstance(unlearner.teacher.teacher, _AdaptersDisabled)  # the base model, no copy
    loss_fn = unlearner.loss_fn
    assert (loss_fn.prediction_type, loss_fn.snr_gamma) == ("v_prediction", 5.0)
    assert (loss_fn.n, loss_fn.k) == (RECIPE_KEEP_BATCHES * BATCH + 1, 1)
    final = flat(recorder.params)
    assert torch.isfinite(final).all() and not torch.equal(recorder.snapshots[0], final)
