"""Sampling for the audit: DDIM (VP schedules) or Euler (flow matching) with diffusers schedulers.

``generate`` draws samples from a diffusion model through a *copy* of its scheduler built
with ``from_config`` (the user's scheduler is never stepped or modified):

* variance-preserving schedulers (``DDPMScheduler``, ``DDIMScheduler``, ... see
  ``siss.adapters.SUPPORTED_SCHEDULERS``): ``DDIMScheduler`` with ``eta = 0`` (deterministic given
  the initial noise), ``num_inference_steps`` steps, the scheduler's own ``prediction_type``;
* ``FlowMatchEulerDiscreteScheduler`` (SD3-style rectified flow): its own Euler steps
  (``use_dynamic_shifting``, Flux's per-resolution shift, needs ``mu`` and is refused).

The model is either a diffusers model (called through ``siss.adapters.adapter_for(model)
.predict``, so every family the adapters support works, conditioning included) or a plain
callable ``model(x_t, timesteps, **conditioning) -> prediction`` returning the scheduler's
``prediction_type`` (``"epsilon"``, ``"v_prediction"``, ``"sample"``, or the velocity
``eps - x_0`` for flow matching). ``prediction_fn`` is that wrapper; the likelihood and
reconstruction checks use it too.

Data range: samples come back in the model's data space (``[-1, 1]`` for the digits models,
latents for a latent model: decode them yourself). Nothing is clamped here. A DDIM copy of a
scheduler whose config has ``clip_sample=True`` (diffusers' default for DDPM/DDIM, and the
digits models') clips its *predicted* ``x_0`` to ``[-clip_sample_range, clip_sample_range]``
at every step as diffusers' own pipelines do, so the final sample lies in that range; pass
``clip_sample=False`` to see the model's unclipped output (a diverging model then shows as
large or non-finite values rather than being clipped into range).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from numbers import Integral
from typing import Any

import torch
from torch import Tensor

from siss._optional import needs
from siss.adapters.schedulers import model_timesteps
from siss.audit._inputs import (
    broadcast_rows,
    check_conditioning,
    check_generator,
    check_int,
    take_rows,
)
from siss.audit._models import (
    config_sample_shape,
    eval_mode,
    model_device_dtype,
    predictor,
    progress_bar,
    scheduler_kind,
)
from siss.targets import eps_from_prediction

__all__ = ["PredictionFn", "generate", "prediction_fn", "to_epsilon"]

PredictionFn = Callable[[Tensor, Tensor], Tensor]


def prediction_fn(
    model: object, conditioning: Mapping[str, Any] | None = None, scheduler: Any = None
) -> PredictionFn:
    """``fn(x_t, timesteps) -> prediction`` for a diffusers model or a plain callable, with
    ``timesteps`` grid indices of ``scheduler`` (fractional ones too, for the likelihood ODE).

    Args:
        model: a diffusers model that ``siss.adapters.adapter_for`` handles (``UNet2DModel``,
            ``UNet2DConditionModel``, DiT, SD3), called through the adapter's ``predict``; a
            ``siss.adapters.ModelAdapter``; or any callable ``model(x_t, timesteps,
            **conditioning)`` returning a tensor shaped like ``x_t`` (an ``nn.Module`` no adapter
            handles is called this way too; a diffusers output's ``.sample`` is taken).
        conditioning: keyword inputs of the model (``class_labels``, ``encoder_hidden_states``,
            ...), each with the batch's rows or 1 row (broadcast), passed on every call.
        scheduler: the model's diffusers scheduler: a model that takes other timesteps than the
            grid indices (an ``EulerDiscreteScheduler`` with ``timestep_type="continuous"``,
            ``siss.adapters.model_timesteps``) gets those; ``None``: the indices as they are.

    Returns:
        A callable ``(x_t (B, *S), timesteps (B,)) -> (B, *S)`` that checks the output's type
        and shape (a ``TypeError`` / ``ValueError`` naming ``model``).
    """
    conditioning = dict(conditioning or {})
    predict = predictor(model)
    to_model = None if scheduler is None else model_timesteps(scheduler)

    def fn(x: Tensor, timesteps: Tensor) -> Tensor:
        if to_model is not None:
            timesteps = to_model(timesteps).to(x.device)
        return predict(x, timesteps, **broadcast_rows(conditioning, x.shape[0], "conditioning"))

    return fn


def to_epsilon(
    prediction: Tensor, x_t: Tensor, gamma: Tensor, sigma: Tensor, prediction_type: str
) -> Tensor:
    """The noise prediction ``eps`` implied by a model output, for ``x_t = gamma x_0 + sigma eps``:
    ``siss.audit.membership.eps_from_prediction`` (the same function, under this module's
    argument names).

    Args:
        prediction: ``(B, *S)`` the model's output.
        x_t: ``(B, *S)`` its input.
        gamma, sigma: signal and noise scales, ``(B,)`` or broadcastable to ``x_t`` (e.g.
            ``(B, 1, 1, 1)``).
        prediction_type: ``"epsilon"``, ``"v_prediction"`` (``v = gamma eps - sigma x_0``),
            ``"sample"`` or ``"flow_prediction"`` (velocity ``v = eps - x_0``).

    Returns:
        ``(B, *S)`` eps, in float32 (float64 if an input is float64).
    """
    return eps_from_prediction(prediction, x_t, gamma, sigma, prediction_type)


def _sample_shape(model: object, sample_shape: Sequence[int] | None) -> tuple[int, ...]:
    if sample_shape is None:
        shape = config_sample_shape(model)
        if shape is not None:
            return shape
        raise ValueError(
            "`sample_shape` is needed: the model has no `in_channels` / `sample_size` config to "
            "read it from; pass e.g. sample_shape=(1, 16, 16)"
        )
    if isinstance(sample_shape, (str, bytes)) or not isinstance(sample_shape, Sequence):
        raise TypeError(f"`sample_shape` must be a tuple of ints, got {sample_shape!r}")
    if not sample_shape or any(
        isinstance(s, bool) or not isinstance(s, Integral) or s < 1 for s in sample_shape
    ):
        raise ValueError(
            f"`sample_shape` must be a non-empty tuple of ints >= 1, got {sample_shape!r}"
        )
    return tuple(int(s) for s in sample_shape)


def initial_noise(
    seeds: Tensor, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype
) -> Tensor:
    """``(len(seeds), *shape)`` standard normal noise, row ``i`` drawn on the CPU from
    ``seeds[i]`` alone: the same sample for a seed whatever the batch size or device."""
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(rows).to(device, dtype)


def sample_seeds(count: int, generator: torch.Generator | None) -> Tensor:
    """``(count,)`` int64 seeds drawn from ``generator`` (on the CPU)."""
    if generator is not None and generator.device.type != "cpu":
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**62, (count,), generator=generator)


def sampler_for(
    scheduler: Any, num_inference_steps: int, clip_sample: bool | None, device: torch.device
) -> tuple[Any, str, str]:
    """A fresh inference scheduler (never the user's), its timesteps set: ``DDIMScheduler`` for a
    VP scheduler, ``FlowMatchEulerDiscreteScheduler`` for flow matching. Returns
    ``(sampler, kind, prediction_type)``."""
    with needs("siss.audit.sampling"):
        from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    kind, prediction_type = scheduler_kind(scheduler)
    config = dict(scheduler.config)
    if kind == "flow":
        if config.get("use_dynamic_shifting", False):
            raise ValueError(
                f"`scheduler` ({type(scheduler).__name__}) uses dynamic shifting (Flux): its "
                "inference sigmas depend on the resolution (`mu`), which the audit does not set; "
                "pass a scheduler with use_dynamic_shifting=False and the shift you sample with"
            )
        sampler = FlowMatchEulerDiscreteScheduler.from_config(config)
    else:
        if clip_sample is not None:
            config["clip_sample"] = bool(clip_sample)
        config["prediction_type"] = prediction_type
        sampler = DDIMScheduler.from_config(config)
    sampler.set_timesteps(num_inference_steps, device=device)
    return sampler, kind, prediction_type


def generate(
    model: object,
    scheduler: Any,
    num_samples: int,
    *,
    sample_shape: Sequence[int] | None = None,
    num_inference_steps: int = 50,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
    conditioning: Mapping[str, Any] | None = None,
    clip_sample: bool | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> Tensor:
    """Draw ``num_samples`` samples with deterministic DDIM (``eta = 0``) or flow-matching Euler.

    Each sample ``i`` starts from noise drawn from its own seed, the ``i``-th of ``num_samples``
    seeds drawn from ``generator``: a seed gives the same samples for every ``batch_size`` and
    device (up to the device's arithmetic). Runs in ``torch.inference_mode`` with the model in
    eval mode (its mode is restored afterwards). No classifier-free guidance.

    Args:
        model: a diffusers model (through ``siss.adapters.adapter_for``) or a callable
            ``model(x_t, timesteps, **conditioning) -> prediction`` (see ``prediction_fn``),
            predicting the scheduler's ``prediction_type``.
        scheduler: the model's diffusers scheduler (read through ``from_config``; not modified).
        num_samples: ``N >= 1``.
        sample_shape: the shape ``S`` of one sample, e.g. ``(1, 16, 16)``; read from a
            ``UNet2DModel``-style config (``in_channels``, ``sample_size``) when ``None``.
        num_inference_steps: sampler steps, ``>= 1``.
        batch_size: samples per model call, ``>= 1``.
        generator: source of the seeds (a CPU generator, or one on the model's device).
        conditioning: model inputs such as ``{"class_labels": (N,) or (1,)}`` or
            ``{"encoder_hidden_states": (1, L, D)}``: one row per sample or one shared row.
        clip_sample: override the scheduler config's ``clip_sample`` (VP only; ``None`` keeps
            it; see the module docstring on the data range).
        device, dtype: where and in which dtype to sample; default: the model's parameters'
            (CPU and float32 for a plain callable).
        progress: show a tqdm bar over the samples.

    Returns:
        ``(N, *S)`` samples on ``device`` in ``dtype``, in the model's data space. NaN or inf
        values (a diverged model) are returned as they are.

    Raises:
        ValueError, TypeError: naming the argument, before any model call.
    """
    num_samples = check_int(num_samples, "num_samples")
    num_inference_steps = check_int(num_inference_steps, "num_inference_steps")
    batch_size = check_int(batch_size, "batch_size")
    check_generator(generator)
    if clip_sample is not None and not isinstance(clip_sample, bool):
        raise TypeError(f"`clip_sample` must be a bool or None, got {clip_sample!r}")
    conditioning = check_conditioning(conditioning, "conditioning", num_samples, per="sample")
    shape = _sample_shape(model, sample_shape)
    device, dtype = model_device_dtype(model, device, dtype)
    sampler, kind, _ = sampler_for(scheduler, num_inference_steps, clip_sample, device)
    seeds = sample_seeds(num_samples, generator)
    desc = f"sampling ({'ddim' if kind == 'vp' else 'flow euler'})"
    out = []
    with eval_mode(model), torch.inference_mode(), progress_bar(num_samples, desc, progress) as bar:
        for start in range(0, num_samples, batch_size):
            stop = min(start + batch_size, num_samples)
            cond = take_rows(conditioning, torch.arange(start, stop))
            x = initial_noise(seeds[start:stop], shape, device, dtype)
            out.append(_denoise(prediction_fn(model, cond, scheduler), sampler, x, kind))
            bar.update(stop - start)
    return torch.cat(out)


def _denoise(predict: PredictionFn, sampler: Any, x: Tensor, kind: str) -> Tensor:
    """Run ``sampler``'s whole timestep grid on ``x`` (pure noise) and return the sample."""
    if kind == "flow":
        sampler.set_timesteps(sampler.num_inference_steps, device=x.device)  # reset step index
    rows = x.shape[0]
    for t in sampler.timesteps:
        timesteps = t.to(x.device).expand(rows)
        prediction = predict(x, timesteps)
        x = sampler.step(prediction, t, x).prev_sample.to(x.dtype)
    return x


def ddim_denoise_from(predict: PredictionFn, sampler: Any, x_t: Tensor, t: int) -> Tensor:
    """Denoise ``x_t`` at training timestep ``t`` to ``t = 0`` with DDIM (``eta = 0``).

    The steps are ``t, t - r, t - 2r, ... > 0`` with DDIM's stride ``r = T //
    sampler.num_inference_steps`` (the same discretisation ``generate`` uses over the whole
    schedule); the last step lands on ``x_0`` (``final_alpha_cumprod``).
    """
    stride = sampler.config.num_train_timesteps // sampler.num_inference_steps
    rows = x_t.shape[0]
    x = x_t
    for step in range(t, 0, -stride):
        timestep = torch.tensor(step, device=x.device)
        prediction = predict(x, timestep.expand(rows))
        x = sampler.step(prediction, step, x).prev_sample.to(x.dtype)
    return x


def flow_denoise_from(
    predict: PredictionFn, scheduler: Any, x_t: Tensor, sigma: float, num_steps: int
) -> Tensor:
    """Denoise a flow-matching ``x_t = (1 - sigma) x_0 + sigma eps`` to ``sigma = 0`` with the
    scheduler's Euler steps on ``num_steps`` equally spaced sigmas (no shift applied)."""
    with needs("siss.audit.sampling"):
        from diffusers import FlowMatchEulerDiscreteScheduler

    config = {
        **dict(scheduler.config),
        "shift": 1.0,
        "use_dynamic_shifting": False,
        "shift_terminal": None,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "invert_sigmas": False,
    }
    sampler = FlowMatchEulerDiscreteScheduler.from_config(config)
    sigmas = [sigma * (1 - i / num_steps) for i in range(num_steps)]
    sampler.set_timesteps(sigmas=sigmas, device=x_t.device)
    rows = x_t.shape[0]
    x = x_t
    for t in sampler.timesteps:
        x = sampler.step(predict(x, t.expand(rows)), t, x).prev_sample.to(x.dtype)
    return x
