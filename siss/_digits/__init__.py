"""The digits examples' machinery (``python -m examples.<name>``), reusable from the package.

- ``siss._digits.data``: scikit-learn's digits with planted outliers (the T-shirt, four more
  shapes), MNIST or an image folder; the procedurally varied T-shirts of the audit.
- ``siss._digits.models``: the tiny ``UNet2DModel``, its DDPM and rectified-flow schedulers,
  reading a checkpoint's process, sampling it, saving it atomically, the outlier's NLL.
- ``siss._digits.state``: resumable training state in safetensors, and ``siss.Unlearner``'s
  steps drawn from a ``siss.loop.BatchPlan``.
- ``siss._digits.evaluate``: a model evaluated by its samples (outlier rate, NLL, IS- and
  FID-style scores under ``siss.metrics.DigitClassifier``), sample grids, tracker logs.
- ``siss._digits.stopping``: ``--until nonmember`` (``siss.stopping.NonmemberStop`` against
  varied T-shirts).
- ``siss._digits.study``: the study's tables (results, spread, precision, the audit against the
  retrained model) and figures.

This module holds only the sampling settings the flag groups (``siss._cli.groups``) name, so
that parsing a command imports neither diffusers nor scikit-learn.
"""

from __future__ import annotations

PROCESSES = ("ddpm", "flow")
PROCESS_NAMES = {
    "ddpm": "DDPM (NLL along the VP probability-flow ODE)",
    "flow": "rectified flow (NLL along the flow ODE; bits/dim not comparable with DDPM's)",
}
VP_SAMPLERS = ("ddpm", "ddim", "dpm")
FLOW_SAMPLERS = ("euler",)
SAMPLERS = VP_SAMPLERS + FLOW_SAMPLERS
PRECISIONS = ("fp32", "bf16")  # of the network during sampling; the scheduler stays float32


def native_bf16() -> bool:
    """Whether this machine's CPU computes in bfloat16 natively (AMX tiles or AVX512-BF16), so
    that sampling under bf16 autocast is faster than float32: 2.3x faster on the AMX CPU of
    docs/results.md, but about 28x slower on a CPU without them (AVX2 only: an AMD EPYC, 154 s
    against 4,329 s per 1,024 digits samples on one thread), where oneDNN emulates it."""
    import torch

    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # torch's own, private
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_precision(value: str) -> str:
    """``"auto"``: ``"bf16"`` where the CPU computes it natively (``native_bf16``), else
    ``"fp32"``; any other value as given."""
    if value != "auto":
        return value
    return "bf16" if native_bf16() else "fp32"


# Default sampling steps per process. Flow: Euler steps on the scheduler's grid, checked on a
# 1,500-step flow model, 2,000 samples from the same noise: T-shirt count / IS-style / FID-style
# 8 / 8.83 / 22.5 at 50 steps, 9 / 8.86 / 19.0 at 200, 8 / 8.76 / 31.0 at 20. The rate and IS
# hold at 50; the FID-style score is biased up by ~3.5 there, so compare it at equal steps only.
DEFAULT_EVAL_STEPS = {"ddpm": 50, "flow": 50}
DEFAULT_SAMPLER = {"ddpm": "ddpm", "flow": "euler"}
