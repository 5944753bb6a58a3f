"""PEFT LoRA adapters in accelerate checkpoints: store the adapter, not the frozen base model.

``accelerator.save_state`` writes every prepared model whole: for a LoRA fine-tune of a Stable
Diffusion UNet that is 3.4 GB of frozen weights per checkpoint around a few MB that changed.
``register_lora_checkpoint_hooks`` makes ``save_state`` write the LoRA weights alone (safetensors)
and ``load_state`` put them back, while optimizer, scheduler, scaler and random states go through
accelerate as usual::

    unet.add_adapter(LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    unet, optimizer = accelerator.prepare(unet, optimizer)
    register_lora_checkpoint_hooks(accelerator, unet)
    accelerator.save_state("checkpoints/step-100")   # lora_weights.safetensors, optimizer.bin, ...
    accelerator.load_state("checkpoints/step-100")   # on resume, after the same add_adapter
"""

from __future__ import annotations

import os
from typing import Any

import torch

from siss._files import atomic_path
from siss._optional import needs

LORA_CHECKPOINT_FILE = "lora_weights.safetensors"
"""The file ``register_lora_checkpoint_hooks`` writes into each checkpoint folder (safetensors).

Examples:
    >>> LORA_CHECKPOINT_FILE
    'lora_weights.safetensors'
"""


def lora_state_dict(
    model: torch.nn.Module, adapter_name: str = "default"
) -> dict[str, torch.Tensor]:
    """The LoRA weights of ``model`` (PEFT's names), detached, contiguous and on the CPU.

    Args:
        model: a module with a PEFT adapter (``model.add_adapter(LoraConfig(...))`` on a diffusers
            model, or a ``peft.PeftModel``); an accelerate- or DDP-wrapped one is unwrapped.
        adapter_name: which adapter (PEFT's default name unless you named it).

    Returns:
        ``{name: tensor}`` ready for ``safetensors.torch.save_file``; for diffusers'
        ``save_lora_weights`` pass it through ``diffusers.utils.convert_state_dict_to_diffusers``.

    Examples:
        >>> from peft import LoraConfig, inject_adapter_in_model
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 3))
        >>> model = inject_adapter_in_model(LoraConfig(r=2, target_modules=["0"]), model)
        >>> sorted((name, tuple(value.shape)) for name, value in lora_state_dict(model).items())
        [('0.lora_A.weight', (2, 3)), ('0.lora_B.weight', (3, 2))]
    """
    with needs("siss.adapters.lora"):
        from peft.utils import get_peft_model_state_dict

    model = _unwrap(model)
    state = {}
    if adapter_name in (getattr(model, "peft_config", None) or {}):
        state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    if not state:
        raise ValueError(
            f"`model` has no LoRA weights for adapter {adapter_name!r}: add one first "
            "(`model.add_adapter(LoraConfig(...))`)"
        )
    return {name: value.detach().cpu().contiguous() for name, value in state.items()}


def register_lora_checkpoint_hooks(
    accelerator: Any,
    model: torch.nn.Module,
    *,
    adapter_name: str = "default",
    filename: str = LORA_CHECKPOINT_FILE,
) -> list[Any]:
    """Make ``accelerator.save_state``/``load_state`` keep only ``model``'s LoRA weights.

    Saving writes ``lora_state_dict(model)`` to ``output_dir/filename`` (main process, atomically)
    and drops ``model``'s full state from what accelerate writes; other prepared models are saved
    as usual. Loading reads the file back into the adapter (``set_peft_model_state_dict``) and
    keeps accelerate from looking for the full weights. For one process or DDP (FSDP and DeepSpeed
    save models their own way, not through these hooks).

    Args:
        accelerator: an ``accelerate.Accelerator``.
        model: the module holding the adapter, prepared by ``accelerator`` or not (it is matched
            through ``accelerator.unwrap_model``).
        adapter_name: the PEFT adapter to save and load.
        filename: the file inside each checkpoint folder.

    Returns:
        The two hook handles; ``handle.remove()`` unregisters them.

    Raises (on load):
        FileNotFoundError: the checkpoint folder has no ``filename``.
        ValueError: the file's weights do not match the adapter (other names: another rank,
            other target modules).

    Examples:
        >>> import os, tempfile
        >>> from accelerate import Accelerator
        >>> from peft import LoraConfig, inject_adapter_in_model
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 3))
        >>> model = inject_adapter_in_model(LoraConfig(r=2, target_modules=["0"]), model)
        >>> accelerator = Accelerator(cpu=True)
        >>> model = accelerator.prepare(model)
        >>> handles = register_lora_checkpoint_hooks(accelerator, model)
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     _ = accelerator.save_state(folder)
        ...     names = [n for n in sorted(os.listdir(folder)) if "random_states" not in n]
        >>> names == [LORA_CHECKPOINT_FILE] == ["lora_weights.safetensors"]
        True
        >>> for handle in handles:
        ...     handle.remove()
        >>> from accelerate.state import AcceleratorState, GradientState
        >>> AcceleratorState._reset_state(reset_partial_state=True)  # no process-wide state left
        >>> GradientState._reset_state()
    """
    with needs("siss.adapters.lora"):
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file, save_file

    if not isinstance(filename, str) or not filename or os.sep in filename:
        raise ValueError(f"`filename` must be a plain file name, got {filename!r}")
    target = _unwrap(model)
    lora_state_dict(target, adapter_name)  # fail now, not at the first checkpoint

    def index_of_model(models: list[Any]) -> int | None:
        for index, candidate in enumerate(models):
            if _unwrap(accelerator.unwrap_model(candidate)) is target:
                return index
        return None

    def save_hook(models: list[Any], weights: list[Any], output_dir: str) -> None:
        if accelerator.is_main_process:
            with atomic_path(os.path.join(output_dir, filename)) as tmp:
                save_file(lora_state_dict(target, adapter_name), str(tmp))
        index = index_of_model(models)
        if index is not None and index < len(weights):
            weights.pop(index)  # `models` is accelerate's own list: leave it whole

    def load_hook(models: list[Any], input_dir: str) -> None:
        path = os.path.join(input_dir, filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no LoRA checkpoint {path} (saved without these hooks?)")
        state = load_file(path)
        expected = lora_state_dict(target, adapter_name)
        if state.keys() != expected.keys():
            missing = sorted(expected.keys() - state.keys())[:3]
            unexpected = sorted(state.keys() - expected.keys())[:3]
            raise ValueError(
                f"{path} does not match the adapter {adapter_name!r}: missing {missing}, "
                f"unexpected {unexpected} (another rank or other target modules?)"
            )
        for name, value in state.items():
            if value.shape != expected[name].shape:
                raise ValueError(
                    f"{path}: {name} has shape {tuple(value.shape)}, the adapter "
                    f"{tuple(expected[name].shape)} (another LoRA rank?)"
                )
        set_peft_model_state_dict(target, state, adapter_name=adapter_name)
        index = index_of_model(models)
        if index is not None:
            models.pop(index)

    return [
        accelerator.register_save_state_pre_hook(save_hook),
        accelerator.register_load_state_pre_hook(load_hook),
    ]


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Through DDP's ``.module`` and ``torch.compile``'s ``._orig_mod``."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        else:
            return model
