"""The digits examples' models: the tiny ``UNet2DModel``, its DDPM and rectified-flow
schedulers, a checkpoint's process, sampling, atomic saving and the outlier's exact NLL."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    UNet2DModel,
)
from tqdm.auto import tqdm

from siss._digits import DEFAULT_SAMPLER, FLOW_SAMPLERS, PRECISIONS, SAMPLERS, VP_SAMPLERS
from siss._files import atomic_folder
from siss.metrics import bits_per_dim, flow_bits_per_dim


def build_unet(
    size: int = 16, channels: int = 1, widths: tuple[int, int, int] = (32, 64, 64)
) -> UNet2DModel:
    """The tiny UNet of ``(channels, size, size)`` images: 3 resolutions of ``widths`` channels,
    one ResNet block each, attention only in the middle block; about 1.06M parameters at 16x16x1
    with the default widths (``examples/audit_digits.py``'s membership model: (16, 32, 32),
    0.27M parameters, so that it overfits 128 images within minutes on a CPU)."""
    return UNet2DModel(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=widths,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )


def build_scheduler() -> DDPMScheduler:
    """DDPM, 1000 steps, linear betas 1e-4..0.02, epsilon prediction (as in the paper)."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        prediction_type="epsilon",
    )


def build_flow_scheduler(shift: float = 1.0) -> FlowMatchEulerDiscreteScheduler:
    """Rectified flow, 1000 training grid points, ``shift`` 1 (``s`` uniform on the grid)."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


_SCHEDULER_CLASSES = {"DDPMScheduler": "ddpm", "FlowMatchEulerDiscreteScheduler": "flow"}


def process_of(scheduler: object) -> str:
    """``"flow"`` for a ``FlowMatchEulerDiscreteScheduler``, ``"ddpm"`` for a ``DDPMScheduler``."""
    name = type(scheduler).__name__
    if name not in _SCHEDULER_CLASSES:
        raise ValueError(
            f"unsupported scheduler {name}: the digits examples train and unlearn "
            f"{' and '.join(_SCHEDULER_CLASSES)} checkpoints"
        )
    return _SCHEDULER_CLASSES[name]


def checkpoint_process(folder: Path) -> str:
    """The process of a checkpoint folder, read from its ``scheduler_config.json`` (cheap: no
    weights are loaded); ``ValueError`` naming the folder when it has none or an unknown one."""
    path = Path(folder) / "scheduler_config.json"
    if not path.is_file():
        raise ValueError(f"{folder} holds no scheduler_config.json: not a digits checkpoint")
    name = json.loads(path.read_text()).get("_class_name")
    if name not in _SCHEDULER_CLASSES:
        raise ValueError(
            f"{path} names the scheduler {name!r}; the digits examples support "
            f"{' and '.join(_SCHEDULER_CLASSES)}"
        )
    return _SCHEDULER_CLASSES[name]


def load_scheduler(folder: Path) -> DDPMScheduler | FlowMatchEulerDiscreteScheduler:
    """The training scheduler saved with a checkpoint: DDPM or rectified flow."""
    if checkpoint_process(folder) == "flow":
        return FlowMatchEulerDiscreteScheduler.from_pretrained(folder)
    return DDPMScheduler.from_pretrained(folder)


def check_sampler(process: str, sampler: str | None, flag: str = "--sampler") -> str:
    """The sampler for ``process`` (its default for ``None``); ``ValueError`` naming ``flag``
    for a sampler of the other process."""
    if sampler is None:
        return DEFAULT_SAMPLER[process]
    allowed = FLOW_SAMPLERS if process == "flow" else VP_SAMPLERS
    if sampler not in allowed:
        kind = "rectified-flow (FlowMatchEulerDiscreteScheduler)" if process == "flow" else "DDPM"
        raise ValueError(
            f"{flag} {sampler} does not apply to a {kind} model; use one of {', '.join(allowed)}"
        )
    return sampler


def inference_scheduler(scheduler_config: dict, sampler: str = "ddpm"):
    """A fresh sampling scheduler from a training config: for DDPM ``"ddpm"`` (ancestral),
    ``"ddim"`` (eta 0) or ``"dpm"`` (DPM-Solver++ 2M, diffusers' ``DPMSolverMultistepScheduler``);
    for rectified flow ``"euler"`` (``FlowMatchEulerDiscreteScheduler``'s own Euler steps)."""
    # A FlowMatchEulerDiscreteScheduler config has no betas: the two must not be mixed up.
    is_flow = "beta_start" not in scheduler_config
    if is_flow != (sampler in FLOW_SAMPLERS) and sampler in SAMPLERS:
        process = "flow" if is_flow else "ddpm"
        allowed = FLOW_SAMPLERS if is_flow else VP_SAMPLERS
        raise ValueError(
            f"`sampler` {sampler!r} does not apply to a {process} scheduler config; use one of "
            f"{', '.join(allowed)}"
        )
    if sampler == "euler":
        return FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    if sampler == "ddpm":
        return DDPMScheduler.from_config(scheduler_config)
    if sampler == "ddim":
        return DDIMScheduler.from_config(scheduler_config)
    if sampler == "dpm":
        return DPMSolverMultistepScheduler.from_config(
            scheduler_config, algorithm_type="dpmsolver++", solver_order=2
        )
    raise ValueError(f"`sampler` must be one of {SAMPLERS}, got {sampler!r}")


def sample_images(
    unet: UNet2DModel,
    scheduler_config: dict,
    num_samples: int,
    *,
    sampler: str = "ddpm",
    num_inference_steps: int = 50,
    batch_size: int = 500,
    generator: torch.Generator | None = None,
    progress: bool = True,
    precision: str = "fp32",
) -> torch.Tensor:
    """Draws ``(num_samples, C, H, W)`` images in ``[-1, 1]`` (see :func:`inference_scheduler`).

    Runs under ``torch.inference_mode``; ``generator`` draws the initial noise of each batch and
    the DDPM noise of every step, so a seed and a batch size give the same samples. The flow
    sampler's Euler steps are deterministic given the initial noise. ``precision="bf16"`` runs
    the network under ``torch.autocast`` in bfloat16 (2.3x faster on a CPU with AMX) while the
    scheduler's update stays in float32; its samples are not bit-identical to fp32's (the
    study's rate check compares the two on the same noise, docs/results.md)."""
    if precision not in PRECISIONS:
        raise ValueError(f"`precision` must be one of {PRECISIONS}, got {precision!r}")
    scheduler = inference_scheduler(scheduler_config, sampler)
    unet.eval()
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    device = getattr(unet, "device", torch.device("cpu"))  # a ModelMixin knows its device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    out = []
    bar = tqdm(total=num_samples, desc=f"sampling ({sampler})", disable=not progress)
    with torch.inference_mode():
        for start in range(0, num_samples, batch_size):
            n = min(batch_size, num_samples - start)
            scheduler.set_timesteps(num_inference_steps)  # resets the multistep solver's state
            x = torch.randn((n, *shape), generator=generator).to(device)
            for t in scheduler.timesteps:
                with autocast:  # eps (DDPM) or the velocity eps - x_0 (flow)
                    prediction = unet(x, t).sample.float()
                x = scheduler.step(prediction, t, x, generator=generator).prev_sample
            out.append(x.clamp(-1, 1).cpu())
            bar.update(n)
    bar.close()
    return torch.cat(out)


def flow_training_batch(
    schedule, x0: torch.Tensor, index: torch.Tensor, eps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rectified-flow training inputs: ``x_s = (1 - s) x0 + s eps`` ``(B, C, H, W)``, the model
    timesteps ``s * T`` ``(B,)`` and the velocity target ``eps - x0``, with ``s`` the noise level
    of grid ``index`` ``(B,)`` in ``schedule`` (``siss.adapters.schedule_from_scheduler``'s, the
    unlearning losses' own: index 0 is pure noise)."""
    s = schedule.sigma[index].view(-1, *([1] * (x0.dim() - 1)))
    return (1 - s) * x0 + s * eps, schedule.timesteps[index], eps - x0


def save_model(
    folder: Path, unet: UNet2DModel, scheduler: Any | None = None, info: dict | None = None
) -> None:
    """Writes ``unet`` (``save_pretrained``, safetensors), with ``scheduler`` its
    ``scheduler_config.json`` and with ``info`` a ``training_info.json``, into a temporary
    sibling of ``folder``, then swaps it into place (``siss._files.atomic_folder``)."""
    with atomic_folder(folder) as tmp:
        unet.save_pretrained(tmp, safe_serialization=True)
        if scheduler is not None:
            scheduler.save_pretrained(tmp)
        if info is not None:
            (tmp / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")


def outlier_nll(
    unet: UNet2DModel,
    scheduler: Any,
    images: torch.Tensor,
    *,
    tolerance: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """``(B,)`` bits/dim of ``images`` ``(B, C, H, W)``, one Hutchinson probe each, along the
    process's probability-flow ODE: the VP ODE of ``siss.metrics.bits_per_dim`` for DDPM, the
    rectified-flow ODE ``dx/ds = v`` of ``siss.metrics.flow_bits_per_dim`` for flow. The two
    integrate different ODEs: their bits/dim compare within a process only."""
    model = lambda x, t: unet(x, t).sample  # noqa: E731
    if process_of(scheduler) == "flow":
        steps = scheduler.config.num_train_timesteps
        return flow_bits_per_dim(
            model, images, num_train_timesteps=steps, rtol=tolerance, atol=tolerance,
            generator=generator,
        )  # fmt: skip
    return bits_per_dim(
        model, images, scheduler.alphas_cumprod, rtol=tolerance, atol=tolerance,
        generator=generator,
    )  # fmt: skip
