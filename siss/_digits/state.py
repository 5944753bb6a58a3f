"""Resumable training state in safetensors, written atomically (``examples/unlearn.py``), and
``siss.Unlearner``'s steps drawn from a ``siss.loop.BatchPlan``.

A checkpoint is a folder ``step-NNNNNNN/`` holding the model (``save_pretrained``, safetensors),
the optimizer's tensors (``optimizer.safetensors``, its hyper-parameters in the file's metadata),
the random generators' states and a JSON of everything else. It is written into a temporary
sibling folder and renamed into place, so a run killed at any moment leaves either the whole
checkpoint or none of it; ``latest_checkpoint`` only ever sees whole ones. Nothing is read with
``torch.load``: no pickles.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from siss._files import atomic_folder, atomic_path
from siss.loop import BatchPlan
from siss.recipe import StepResult, Unlearner

PREFIX = "step-"
MODEL_FILE = "diffusion_pytorch_model.safetensors"  # what diffusers' save_pretrained writes


# How the training rows are drawn, recorded in checkpoints: a resume refuses any other.
DRAWS = "siss.loop.BatchPlan: keep rows in shuffled epochs"


def write_tensors_atomically(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Writes ``tensors`` (any shapes; made contiguous) as safetensors to ``path`` atomically,
    with the file's string ``metadata``."""
    with atomic_path(path) as tmp:
        contiguous = {name: t.contiguous() for name, t in tensors.items()}
        save_file(contiguous, str(tmp), metadata=metadata)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _load_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    tensors = load_file(str(folder / "optimizer.safetensors"))
    meta = json.loads((folder / "optimizer.json").read_text())
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for name, value in meta["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    groups = meta["param_groups"]
    for group in groups:  # JSON turned tuples into lists
        for key, value in group.items():
            if key != "params" and isinstance(value, list):
                group[key] = tuple(value)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(
    root: Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    generators: dict[str, torch.Generator],
    extra: dict[str, Any],
    ema: Any | None = None,
    keep: int = 2,
) -> Path:
    """Writes ``root/step-NNNNNNN`` atomically and prunes all but the newest ``keep`` ones.

    ``ema``: a ``diffusers.training_utils.EMAModel`` (or anything with its ``state_dict``), whose
    averaged weights go to ``ema.safetensors`` and its step counter and settings to ``ema.json``.
    """
    final = root / f"{PREFIX}{step:07d}"
    with atomic_folder(final) as tmp:  # a rerun past a checkpoint of the same step replaces it
        model.save_pretrained(tmp, safe_serialization=True)
        tensors, meta = _optimizer_tensors(optimizer)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(meta))
        save_file(
            {name: gen.get_state() for name, gen in generators.items()},
            str(tmp / "generators.safetensors"),
        )
        if ema is not None:
            state = dict(ema.state_dict())
            shadow = state.pop("shadow_params")
            tensors = {f"shadow.{i}": t.detach().contiguous().cpu() for i, t in enumerate(shadow)}
            save_file(tensors, str(tmp / "ema.safetensors"))
            (tmp / "ema.json").write_text(json.dumps(state))
        (tmp / "state.json").write_text(json.dumps({"step": step, **extra}, indent=2))
    for old in sorted(root.glob(f"{PREFIX}*"))[:-keep]:
        shutil.rmtree(old)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root``, or ``None``."""
    found = sorted(root.glob(f"{PREFIX}*")) if root.exists() else []
    return found[-1] if found else None


def load_checkpoint(
    folder: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    generators: dict[str, torch.Generator],
    ema: Any | None = None,
) -> dict[str, Any]:
    """Restores model weights, optimizer, generators (and ``ema``) in place; returns the JSON
    state. A checkpoint written without an EMA cannot resume a run with one (``ValueError``)."""
    if ema is not None:
        if not (folder / "ema.safetensors").exists():
            raise ValueError(f"{folder} holds no EMA weights: resume it without an EMA")
        tensors = load_file(str(folder / "ema.safetensors"))
        device = ema.shadow_params[0].device if ema.shadow_params else "cpu"
        shadow = [tensors[f"shadow.{i}"].to(device) for i in range(len(tensors))]
        ema.load_state_dict(
            {**json.loads((folder / "ema.json").read_text()), "shadow_params": shadow}
        )
    model.load_state_dict(load_file(str(folder / MODEL_FILE)))
    _load_optimizer(optimizer, folder)
    states = load_file(str(folder / "generators.safetensors"))
    for name, gen in generators.items():
        gen.set_state(states[name])
    return json.loads((folder / "state.json").read_text())


def plan_step(
    unlearner: Unlearner, keep: torch.Tensor, forget: torch.Tensor, plan: BatchPlan, step: int
) -> StepResult:
    """``unlearner.step`` on plan step ``step``'s rows of ``keep`` ``(n-k, C, H, W)`` (in
    shuffled epochs, as in pretraining) and of ``forget`` ``(k, C, H, W)``, with the step's own
    generator for the timesteps, coins and noise: a function of (seed, step), so a resumed run
    draws what an uninterrupted one draws."""
    ((rows, pick, generator),) = plan.micro_batches(step, rank=0)
    x0, a0 = keep[rows.to(keep.device)], forget[pick.to(forget.device)]
    return unlearner.step(x0, a0, generator=generator)


def calibrate(
    unlearner: Unlearner, keep: torch.Tensor, forget: torch.Tensor, plan: BatchPlan
) -> None:
    """The calibration batches of ``unlearner`` (none unless its rule is the calibrated one):
    plan steps ``0, 1, ...``, the draws the first training steps make, at the starting
    weights."""
    step = 0
    while unlearner.calibrating:
        plan_step(unlearner, keep, forget, plan, step)
        step += 1


def unlearner_state(unlearner: Unlearner) -> dict[str, Any]:
    """``unlearner.state_dict()`` for state.json: the EMA goes to ema.safetensors, the held
    coefficient as a float (a float32 value, exact in JSON)."""
    state = unlearner.state_dict()
    state.pop("ema")
    balancer = state["balancer"]
    if balancer is not None and balancer["coefficient"] is not None:
        balancer["coefficient"] = balancer["coefficient"].item()
    return state


def restore_unlearner(unlearner: Unlearner, state: dict[str, Any]) -> None:
    """The inverse of ``unlearner_state`` (the EMA is restored with the checkpoint)."""
    balancer = state["balancer"]
    if balancer is not None and balancer["coefficient"] is not None:
        balancer = {**balancer, "coefficient": torch.tensor(balancer["coefficient"])}
    unlearner.load_state_dict({**state, "balancer": balancer, "ema": None})
