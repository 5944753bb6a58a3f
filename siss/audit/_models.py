"""Calling the model under audit (private): wrapping, eval mode, schedules, prediction types.

A model is a diffusers model (called through ``siss.adapters.adapter_for(model).predict``), a
``siss.adapters.ModelAdapter``, or any callable ``(x_t (B, ...), t (B,), **conditioning) ->
prediction (B, ...)``. Its prediction is turned into a noise (or clean-sample) prediction with
the schedule's ``gamma`` and ``sigma`` by ``eps_from_prediction`` / ``x0_from_prediction``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from siss._optional import needs
from siss.schedule import NoiseSchedule
from siss.targets import PREDICTION_TYPES

Predictor = Callable[..., Tensor]


def predictor(model: object, name: str = "model") -> Predictor:
    """``predict(x_t, timesteps, **conditioning) -> (B, ...)`` for ``model``, output checked.

    A diffusers output with ``.sample`` or a ``(sample, ...)`` tuple is unwrapped; anything else
    that is not a tensor is a ``TypeError`` naming ``name``, a tensor not shaped like ``x_t`` a
    ``ValueError``.
    """
    if isinstance(model, type) or not callable(model):
        raise TypeError(
            f"`{name}` must be a diffusers model, a siss ModelAdapter or a callable "
            f"(x_t, t, **conditioning) -> prediction, got {type(model).__name__}"
        )
    call: Callable[..., Any] = model
    if isinstance(model, nn.Module):
        from siss.adapters.models import ModelAdapter, adapter_for

        if isinstance(model, ModelAdapter):
            call = model.predict
        else:
            try:
                call = adapter_for(model).predict
            except TypeError:
                call = model  # an nn.Module no adapter handles: called as model(x_t, t, **cond)

    def predict(x: Tensor, timesteps: Tensor, **conditioning: Any) -> Tensor:
        out = call(x, timesteps, **conditioning)
        if hasattr(out, "sample") and not isinstance(out, Tensor):
            out = out.sample
        elif isinstance(out, tuple | list) and out:
            out = out[0]
        if not isinstance(out, Tensor):
            raise TypeError(
                f"`{name}` must return a tensor (got {type(out).__name__}); wrap it as "
                "`lambda x, t, **kw: ...` returning the prediction"
            )
        if out.shape != x.shape:
            raise ValueError(
                f"`{name}` returned shape {tuple(out.shape)} for an input of {tuple(x.shape)}"
            )
        return out

    return predict


@contextmanager
def eval_mode(model: object) -> Iterator[None]:
    """``model.eval()`` for the block (an ``nn.Module``), its training mode restored after."""
    was_training = isinstance(model, nn.Module) and model.training
    if isinstance(model, nn.Module):
        model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


def progress_bar(total: int, desc: str, progress: bool) -> Any:
    """A tqdm bar (a no-op one when ``progress`` is off), usable as a context manager."""
    with needs("siss.audit._models"):
        from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not progress)


def model_device_dtype(
    model: object, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> tuple[torch.device, torch.dtype]:
    """Where and in which dtype to feed ``model``: its first floating parameter's, unless given;
    the CPU and float32 for a plain callable."""
    parameter = None
    if isinstance(model, nn.Module):
        parameter = next((p for p in model.parameters() if p.is_floating_point()), None)
    if device is None:
        device = parameter.device if parameter is not None else torch.device("cpu")
    if dtype is None:
        dtype = parameter.dtype if parameter is not None else torch.float32
    return torch.device(device), dtype


def sample_channels(model: object) -> int | None:
    """Channels of the model's samples ``(N, C, H, W)``: its config's ``in_channels``, a quarter
    of them for Flux's transformer (it packs 2x2 latent patches into channels; the adapter takes
    unpacked latents); ``None`` when the config does not say."""
    config = getattr(model, "config", None)
    channels = config.get("in_channels") if isinstance(config, Mapping) else None
    if not isinstance(channels, int):
        return None
    return channels // 4 if "Flux" in type(model).__name__ else channels


def config_sample_shape(model: object) -> tuple[int, ...] | None:
    """``(C, H, W)`` of one sample from the model's config (``sample_channels``,
    ``sample_size``), or ``None`` when the config does not say."""
    config = getattr(model, "config", None)
    if not isinstance(config, Mapping):
        return None
    size, channels = config.get("sample_size"), sample_channels(model)
    if isinstance(size, int) and isinstance(channels, int):
        return (channels, size, size)
    if isinstance(size, Sequence) and len(size) == 2 and isinstance(channels, int):
        return (channels, int(size[0]), int(size[1]))
    return None


def check_model_device(model: object, images: Tensor, name: str) -> None:
    """``images`` must be on the device of an ``nn.Module`` model's parameters."""
    device, _ = model_device_dtype(model)
    if isinstance(model, nn.Module) and images.device != device:
        raise ValueError(f"`{name}` is on {images.device} but `model` is on {device}")


def scheduler_kind(scheduler: Any) -> tuple[str, str]:
    """``(kind, prediction_type)``: ``("vp", "epsilon" | "v_prediction" | "sample")`` or
    ``("flow", "flow_prediction")``; a ``ValueError`` naming ``scheduler`` otherwise."""
    from siss.adapters import prediction_type_from_scheduler

    if scheduler is None or not hasattr(scheduler, "config"):
        raise TypeError(
            f"`scheduler` must be a diffusers scheduler instance, got {type(scheduler).__name__}"
        )
    prediction_type = prediction_type_from_scheduler(scheduler)
    return ("flow" if prediction_type == "flow_prediction" else "vp"), prediction_type


@dataclass(frozen=True)
class Schedule:
    gamma: Tensor  # (T,) float64 on the data's device
    sigma: Tensor
    timesteps: Tensor  # the model's timestep input per grid index
    prediction_type: str
    scheduler: Any  # the diffusers scheduler it came from, or None


def resolve_schedule(
    schedule: object, prediction_type: str | None, device: torch.device
) -> Schedule:
    """The forward process of a ``siss.NoiseSchedule`` or a diffusers scheduler (not modified),
    and what the model predicts (``prediction_type``, else the scheduler's, else epsilon)."""
    scheduler = None
    if isinstance(schedule, NoiseSchedule):
        kind = prediction_type or "epsilon"
    elif hasattr(schedule, "config") and hasattr(schedule, "set_timesteps"):
        from siss.adapters import prediction_type_from_scheduler, schedule_from_scheduler

        scheduler = schedule
        kind = prediction_type or prediction_type_from_scheduler(schedule)
        schedule = schedule_from_scheduler(schedule)
    else:
        raise TypeError(
            "`schedule` must be a siss.NoiseSchedule or a diffusers scheduler instance, got "
            f"{type(schedule).__name__}"
        )
    if kind not in PREDICTION_TYPES:
        raise ValueError(
            f"`prediction_type` must be one of {', '.join(PREDICTION_TYPES)}, got {kind!r}"
        )
    return Schedule(
        schedule.gamma.detach().to(device, torch.float64),
        schedule.sigma.detach().to(device, torch.float64),
        schedule.timesteps.detach().to(device),
        kind,
        scheduler,
    )
