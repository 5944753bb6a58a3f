"""Stage 3, unlearn: fine-tune the denoiser on the generated latents with the library's recipe.

``siss.Unlearner`` takes every step (SISS, λ = 0.5, with the NormBalancer by default;
``--method`` any method of ``siss.registry``) with the training prompt held fixed, which makes
the text-conditional model an unconditional one for that prompt. It runs under ``accelerate``:
any number of processes, mixed precision, gradient accumulation. Every draw of a step comes from
``siss.loop.BatchPlan``, seeded by (seed, step, micro-batch), so the run does not depend on how
many processes share it or on where it was interrupted, and ``--resume`` from a ``save_state``
checkpoint ends with an uninterrupted run's weights. The model is verified before, every
``--verify-every`` steps and after; the weights are saved as a diffusers LoRA (``lora/``) or the
whole denoiser (``unet/``, ``transformer/``), which ``load_unlearned`` puts back into a pipeline.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from siss._cli import recipe_config as config_from_flags
from siss._files import atomic_folder
from siss._optional import needs
from siss.loop import BatchPlan
from siss.stable_diffusion.files import (
    RUN_STATE_FILE,
    Job,
    checkpoints,
    read_json,
    save_checkpoint,
)
from siss.stable_diffusion.pipeline import add_lora, denoiser_of

if TYPE_CHECKING:
    from siss.stable_diffusion.verify import Verifier


def recipe_config(args: argparse.Namespace) -> Any:
    """The run's ``siss.UnlearningConfig``: a constant learning rate, as the paper's SD runs."""
    return config_from_flags(args, lr_scheduler="constant", adam_weight_decay=args.weight_decay)


def prepare_denoiser(
    args: argparse.Namespace, pipe: Any, accelerator: Any
) -> tuple[torch.nn.Module, Any, Any, list[torch.nn.Parameter], list[Any]]:
    """The denoiser made trainable and handed to accelerate with its AdamW.

    ``--full``: the whole denoiser in float32 (master weights; mixed precision autocasts the
    forward); else a LoRA on the frozen model (``add_lora``), whose checkpoints hold the adapter
    only (``register_lora_checkpoint_hooks``). Returns ``(denoiser, prepared model, optimizer,
    trained parameters, hook handles)``.
    """
    from siss.adapters import register_lora_checkpoint_hooks, trainable_parameters

    _, denoiser = denoiser_of(pipe)
    if args.full:
        denoiser.float()  # float32 master weights; mixed precision autocasts the forward
    else:
        denoiser.requires_grad_(False)
        add_lora(denoiser, args)
    if args.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    denoiser.train()
    params = trainable_parameters(denoiser) if not args.full else list(denoiser.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    model, optimizer = accelerator.prepare(denoiser, optimizer)
    if args.compile:
        model = torch.compile(model)
    hooks = [] if args.full else register_lora_checkpoint_hooks(accelerator, denoiser)
    return denoiser, model, optimizer, params, hooks


def batch_plan(args: argparse.Namespace, keep: int, forget: int, accelerator: Any) -> BatchPlan:
    """The rows and draw seeds of every micro-batch, the same for any number of processes."""
    try:
        return BatchPlan(
            args.seed, keep, forget, args.batch_size, args.micro_batch_size,
            accelerator.num_processes,
        )  # fmt: skip
    except ValueError:
        raise SystemExit(
            f"--batch-size {args.batch_size} is not a multiple of --micro-batch-size "
            f"{args.micro_batch_size} x {accelerator.num_processes} processes: choose them so "
            "that it is"
        ) from None


def resume_state(
    args: argparse.Namespace, out: Path, accelerator: Any
) -> tuple[int, list[dict[str, Any]], float, list[float]]:
    """``(step, history, training seconds, losses)`` so far: with ``--resume`` and a checkpoint
    in ``out``, the newest one's (accelerate's state loaded into the model, the optimizer and the
    recipe); else a new run's ``(0, [], 0.0, [])``."""
    saved = checkpoints(out)
    if not (saved and args.resume):
        return 0, [], 0.0, []
    try:
        accelerator.load_state(str(saved[-1]))
    except (ValueError, FileNotFoundError) as error:  # the LoRA checkpoint hooks' checks
        raise SystemExit(f"--resume {saved[-1]}: {error}") from None
    state = read_json(saved[-1] / RUN_STATE_FILE)
    step = state["step"]
    if accelerator.is_main_process:
        print(f"resumed {out} at step {step} from {saved[-1].name}", file=sys.stderr)
    return step, state["history"], state["train_wall_s"], state["loss"]


def unlearn(
    args: argparse.Namespace,
    job: Job,
    pipe: Any,
    accelerator: Any,
    latents: torch.Tensor,
    split: Any,
    verifier: Verifier,
) -> dict[str, Any] | None:
    """Fine-tune the denoiser; returns the history of verifications (main process), or ``None``
    when ``--stop-after`` stopped the run early (its checkpoint saved)."""
    with needs("siss-stable-diffusion"):
        from tqdm.auto import tqdm

    from siss import Unlearner
    from siss.adapters.prompts import prompt_conditioning

    out, device = job.out, accelerator.device
    memorized = split.memorized.bool().cpu()
    keep, forget = latents[~memorized].to(device), latents[memorized].to(device)
    denoiser, model, optimizer, params, hooks = prepare_denoiser(args, pipe, accelerator)
    plan = batch_plan(args, len(keep), len(forget), accelerator)
    # Built before a resume's load_state: its state (calibrated scale, balancer) is restored
    # with accelerate's, and its teacher (a frozen copy, or the LoRA's base model) is the
    # model before unlearning.
    unlearner = Unlearner(
        model,
        pipe.training_scheduler,
        recipe_config(args),
        n=len(latents),
        k=len(forget),
        accelerator=accelerator,
        optimizer=optimizer,
    )
    cond = prompt_conditioning(pipe, job.train_prompt, device=device)
    conditioning = cond.to(dtype=torch.float32 if args.full else denoiser.dtype).conditional

    step, history, train_wall, past_losses = resume_state(args, out, accelerator)
    if step == 0:
        history = [verifier(0)]
    last = args.steps if args.stop_after is None else min(args.steps, args.stop_after)
    bar = tqdm(
        range(step, last),
        initial=step,
        total=args.steps,
        desc=f"unlearn {job.train_prompt[:30]}",
        disable=args.no_progress or not accelerator.is_main_process,
    )
    losses: list[torch.Tensor] = []

    def run_step(plan_step: int) -> None:
        """One optimizer step of the plan: its micro-batches through ``unlearner.step``."""
        for keep_rows, forget_rows, generator in plan.micro_batches(
            plan_step, accelerator.process_index
        ):
            x0, a0 = keep[keep_rows.to(device)], forget[forget_rows.to(device)]
            result = unlearner.step(x0, a0, generator=generator, **conditioning)
            if not result.calibrating:
                losses.append(result.terms.loss)

    if unlearner.calibrating:  # the first steps' draws, at the starting weights
        started = time.perf_counter()
        calibration_step = 0
        while unlearner.calibrating:  # more steps only where fp16 overflowed
            run_step(calibration_step)
            calibration_step += 1
        train_wall += time.perf_counter() - started
    for step in bar:
        started = time.perf_counter()
        run_step(step)
        train_wall += time.perf_counter() - started
        done = step + 1
        if args.verify_every and done % args.verify_every == 0 and done < args.steps:
            entry = verifier(done)
            history.append(entry)
            if entry and "train" in entry:
                bar.set_postfix(
                    memorized=f"{entry['train']['memorized']}/{entry['train']['total']}"
                )
        periodic = args.checkpoint_every and done % args.checkpoint_every == 0
        if done < args.steps and (periodic or done == last):  # the last one: stopped early
            state = {
                "step": done,
                "history": history,
                "train_wall_s": train_wall,
                "loss": past_losses + [float(v) for v in losses],  # one host sync per save
            }
            save_checkpoint(accelerator, out, done, state)
    bar.close()
    for handle in hooks:
        handle.remove()
    if last < args.steps:
        if accelerator.is_main_process:
            print(f"stopped after step {last} of {args.steps}; continue with --resume")
        return None
    history.append(verifier(args.steps))
    weights = save_weights(args, pipe, denoiser, accelerator, out)
    fingerprints = rank_fingerprints(params, accelerator)
    return {
        "weights": str(weights),
        "rank_fingerprints": fingerprints,
        "ranks_identical": len(set(fingerprints)) == 1,
        "history": history,
        "train_wall_s": round(train_wall, 2),
        # the SISS loss of each micro-batch of the main process, in order
        "loss": past_losses + ([float(v) for v in torch.stack(losses).cpu()] if losses else []),
        "accumulation_steps": plan.accumulation,
        "processes": accelerator.num_processes,
    }


def rank_fingerprints(params: list[torch.nn.Parameter], accelerator: Any) -> list[str]:
    """A blake2b digest of the trained weights on each process: DDP (and the balancer's own
    all-reduce of the forget gradient) must leave them bit-identical."""
    with needs("siss-stable-diffusion"):
        from accelerate.utils import gather_object

    digest = hashlib.blake2b(digest_size=16)
    for parameter in params:
        digest.update(parameter.detach().float().cpu().numpy().tobytes())
    mine = [digest.hexdigest()]
    return gather_object(mine) if accelerator.num_processes > 1 else mine


def save_weights(
    args: argparse.Namespace, pipe: Any, denoiser: torch.nn.Module, accelerator: Any, out: Path
) -> Path:
    """LoRA: ``out/lora/pytorch_lora_weights.safetensors`` (``pipe.load_lora_weights``); full:
    ``out/unet`` (or ``out/transformer``; ``save_pretrained``). Returns the folder."""
    name, _ = denoiser_of(pipe)
    folder = out / (name if args.full else "lora")
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return folder
    if args.full:
        with atomic_folder(folder) as tmp:
            denoiser.save_pretrained(tmp, safe_serialization=True)
        return folder
    with needs("siss-stable-diffusion"):
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(denoiser))
    with atomic_folder(folder) as tmp:
        type(pipe).save_lora_weights(tmp, **{f"{name}_lora_layers": layers})
    return folder


def load_unlearned(args: argparse.Namespace, pipe: Any, out: Path) -> str:
    """Put the unlearned weights saved in ``out`` into ``pipe``; returns what was loaded."""
    name, denoiser = denoiser_of(pipe)
    if args.full and (out / name).is_dir():
        loaded = type(denoiser).from_pretrained(out / name).to(denoiser.device)
        denoiser.load_state_dict(loaded.state_dict())
        return f"{out / name}"
    if not args.full and (out / "lora").is_dir():
        pipe.load_lora_weights(out / "lora")
        return f"{out / 'lora'}"
    return "the original model (no unlearned weights in --out yet)"
