"""Stage 3, unlearn: fine-tune the denoiser on the generated latents with the library's recipe.

``siss.Unlearner`` takes every step (SISS, λ = 0.5, with the NormBalancer by default;
``--method`` any method of ``siss.registry``) with the training prompt held fixed, which makes
the text-conditional model an unconditional one for that prompt. It runs under ``accelerate``:
any number of processes, mixed precision, gradient accumulation. Every draw of a step comes from
``siss.loop.BatchPlan``, seeded by (seed, step, micro-batch), so the run does not depend on how
many processes share it or on where it was interrupted, and ``--resume_from_checkpoint latest``
from a ``save_state`` checkpoint ends with an uninterrupted run's weights. The model is verified
before and after, and checked every ``--verify_every`` steps (``siss.stable_diffusion.watch``:
until the copies are gone, while the keep prompts stay in their band); the weights are saved as
a diffusers LoRA (``lora/``) or the whole denoiser (``unet/``, ``transformer/``), which
``load_unlearned`` puts back into a pipeline. ``--report_to tensorboard|wandb`` logs every
step's loss terms, balancer statistics and learning rate, each check's copies and keep drift and
the verifications before and after, through accelerate's trackers (``Tracking``).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from siss._cli import FlagError, release_run, step_log, tracker_config
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
    training_config,
)
from siss.stable_diffusion.nonmember import hold_out_references, nonmember_rule
from siss.stable_diffusion.pipeline import add_lora, denoiser_of, guidance_conditioning
from siss.stable_diffusion.watch import Watch, restore, snapshot

if TYPE_CHECKING:
    from siss.stable_diffusion.verify import Verifier

KEEP_BEFORE_FILE = "keep_before.safetensors"  # the keep prompts' images before unlearning


def recipe_config(args: argparse.Namespace) -> Any:
    """The run's ``siss.UnlearningConfig``: a constant learning rate, as the paper's SD runs."""
    return config_from_flags(
        args, lr_scheduler="constant", adam_weight_decay=args.adam_weight_decay
    )


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
    optimizer = torch.optim.AdamW(
        params, lr=args.learning_rate, weight_decay=args.adam_weight_decay
    )
    model, optimizer = accelerator.prepare(denoiser, optimizer)
    if args.compile:
        model = torch.compile(model)
    hooks = [] if args.full else register_lora_checkpoint_hooks(accelerator, denoiser)
    return denoiser, model, optimizer, params, hooks


def batch_plan(args: argparse.Namespace, keep: int, forget: int, accelerator: Any) -> BatchPlan:
    """The rows and draw seeds of every micro-batch of the global batch (``--train_batch_size``
    x processes x ``--gradient_accumulation_steps`` rows), the same for any split of it into
    processes and accumulation steps."""
    world = accelerator.num_processes
    batch = args.train_batch_size * world * args.gradient_accumulation_steps
    return BatchPlan(args.seed, keep, forget, batch, args.train_batch_size, world)


def step_values(results: list[Any], lr: float, accelerator: Any) -> dict[str, float]:
    """What ``--report_to`` logs of one optimizer step (``siss._cli.step_log``, the digits
    example's tags): its micro-batches' loss, keep and forget terms averaged over the global
    batch (every process calls it: the mean is all-reduced over the processes), the learning
    rate, and the balancer's statistics of the micro-batch that ended the step."""
    terms = torch.stack([torch.stack(tuple(r.terms)).float() for r in results]).mean(0)
    if accelerator.num_processes > 1:
        terms = accelerator.reduce(terms, reduction="mean")
    stats = next((r.stats for r in reversed(results) if r.stats is not None), None)
    last = results[-1]
    return step_log(last._replace(terms=type(last.terms)(*terms), stats=stats), lr)


def _finite(value: Any) -> bool:
    """A measured number (not a reason string, ``None``, a flag or an infinity)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_log(entry: dict[str, Any]) -> dict[str, float]:
    """What ``--report_to`` logs of a check (``Watch.check``): the copies among the fresh
    generations it made, their number and fraction, the largest relative drift of a watched
    keep prompt (left out where one is infinite: a prompt without spread that moved), the
    number of keep prompts out of their band and, after a back-off, the halved forget weight."""
    values = {"check/copies": float(entry["copies"]), "check/generated": float(entry["generated"])}
    if entry["generated"]:
        values["check/copy_fraction"] = entry["copies"] / entry["generated"]
    keep = entry.get("keep") or {}
    if keep:
        relative = [row["relative"] for row in keep.values()]
        if all(_finite(r) for r in relative):
            values["check/keep_drift_max"] = float(max(relative))
        values["check/keep_outside"] = float(len(entry["keep_outside"]))
    if _finite(entry.get("backed_off")):
        values["check/forget_weight"] = float(entry["backed_off"])
    return values


def verification_log(entry: dict[str, Any]) -> dict[str, float]:
    """What ``--report_to`` logs of a verification (``Verifier``; before and after): per prompt
    (train, original) the copies among its generations and their fraction, and the noise score,
    CLIP-IQA and CLIP score where they were measured."""
    values = {}
    for name in ("train", "original"):
        row = entry.get(name)
        if row is None:
            continue
        values[f"verify/{name}_copies"] = float(row["memorized"])
        values[f"verify/{name}_fraction"] = float(row["fraction"])
        for key in ("noise_score", "clip_iqa", "clip_score"):
            if _finite(row.get(key)):
                values[f"verify/{name}_{key}"] = float(row[key])
    return values


class Tracking:
    """``--report_to``: one run of accelerate's trackers per job, under ``--output_dir``/
    ``--logging_dir``/``unlearn`` (a ``--prompts`` list: one run per prompt, named as its
    subfolder), its hyper-parameters the flags the run depends on (``config.json``'s). Without
    ``--report_to`` every method does nothing, and the run syncs the host no more often.

    ``accelerator.log`` and ``init_trackers`` act on the main process; ``step`` is called by
    every process (its mean is all-reduced)."""

    def __init__(self, args: argparse.Namespace, job: Job, accelerator: Any) -> None:
        self.on = args.report_to is not None
        self.accelerator = accelerator
        if self.on:
            name = "unlearn" if args.prompts is None else job.out.name
            accelerator.init_trackers(name, config=tracker_config(training_config(args, job)))

    def log(self, values: dict[str, float], step: int) -> None:
        """Log ``values`` at ``step`` (what the step measured; nothing if empty)."""
        if self.on and values:
            self.accelerator.log(values, step=step)

    def step(self, results: list[Any], lr: float, step: int) -> None:
        """One optimizer step's ``step_values`` at ``step`` (the steps done)."""
        if self.on and results:
            self.log(step_values(results, lr, self.accelerator), step)

    def close(self) -> None:
        """Finish the job's trackers. Not ``accelerator.end_training()``, which also ends the
        processes' group that the next prompt of a ``--prompts`` list still needs: the command
        calls it once, at its end."""
        if self.on:
            for tracker in self.accelerator.trackers:
                tracker.finish()
            self.accelerator.trackers.clear()


def resume_state(
    args: argparse.Namespace, out: Path, accelerator: Any
) -> tuple[int, list[dict[str, Any]], float, list[float]]:
    """``(step, history, training seconds, losses)`` so far: with ``--resume_from_checkpoint
    latest`` and a checkpoint in ``out``, the newest one's (accelerate's state loaded into the
    model, the optimizer and the recipe); else a new run's ``(0, [], 0.0, [])``."""
    saved = checkpoints(out)
    if not (saved and args.resume_from_checkpoint):
        return 0, [], 0.0, []
    try:
        accelerator.load_state(str(saved[-1]))
    except (ValueError, FileNotFoundError) as error:  # the LoRA checkpoint hooks' checks
        raise FlagError(f"--resume_from_checkpoint {saved[-1]}: {error}") from None
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
    when ``--stop_after`` stopped the run early (its checkpoint saved). With ``--report_to``,
    logged as it goes (``Tracking``), the job's trackers finished however it ends; and however it
    ends, the accelerator lets go of the job's prepared model, optimizer and recipe
    (``siss._cli.release_run``): a ``--prompts`` list's next job starts without them."""
    tracking = Tracking(args, job, accelerator)
    try:
        return _train(args, job, pipe, accelerator, latents, split, verifier, tracking)
    finally:
        tracking.close()
        release_run(accelerator)


def _train(
    args: argparse.Namespace,
    job: Job,
    pipe: Any,
    accelerator: Any,
    latents: torch.Tensor,
    split: Any,
    verifier: Verifier,
    tracking: Tracking,
) -> dict[str, Any] | None:
    """``unlearn``'s run: verify, train with checks and checkpoints, verify, save."""
    with needs("siss-stable-diffusion"):
        from tqdm.auto import tqdm

    from siss import Unlearner
    from siss.adapters.prompts import prompt_conditioning

    out, device = job.out, accelerator.device
    memorized = split.memorized.bool().cpu()
    keep, forget = latents[~memorized].to(device), latents[memorized].to(device)
    keep, references = hold_out_references(args, keep)  # --until nonmember's non-members
    denoiser, model, optimizer, params, hooks = prepare_denoiser(args, pipe, accelerator)
    plan = batch_plan(args, len(keep), len(forget), accelerator)
    # Built before a resume's load_state: its state (calibrated scale, balancer) is restored
    # with accelerate's, and its teacher (a frozen copy, or the LoRA's base model) is the
    # model before unlearning.
    unlearner = Unlearner(
        model,
        pipe.training_scheduler,
        recipe_config(args),
        n=len(keep) + len(forget),  # the held-out stop references are not trained on
        k=len(forget),
        accelerator=accelerator,
        optimizer=optimizer,
    )
    cond = prompt_conditioning(pipe, job.train_prompt, device=device)
    conditioning = cond.to(dtype=torch.float32 if args.full else denoiser.dtype).conditional
    conditioning.update(guidance_conditioning(pipe, args))  # Flux-dev: --guidance_scale

    nonmember = nonmember_rule(
        args, model, pipe.training_scheduler, forget, references, conditioning, accelerator
    )
    if nonmember is not None:  # its reference scores and checks travel with accelerate's state
        accelerator.register_for_checkpointing(nonmember)
    step, history, train_wall, past_losses = resume_state(args, out, accelerator)
    watch = Watch(args, job, pipe, accelerator, verifier.detector)
    before_path = out / KEEP_BEFORE_FILE
    if step == 0:
        history = [verifier(0)]
        tracking.log(verification_log(history[0]), 0)
        watch.start(verifier.images.get("train"), verifier.copies.get("train"))
        if nonmember is not None:
            check = nonmember.start()
            history[0]["nonmember"] = check.to_dict()
            nonmember.steer(unlearner, check)
        if accelerator.is_main_process:
            watch.save(before_path)
        accelerator.wait_for_everyone()
    else:
        watch.load(before_path)
    saved = snapshot(params)  # the weights of the last check in band (here: the start)
    last = (
        args.max_train_steps
        if args.stop_after is None
        else min(args.max_train_steps, args.stop_after)
    )
    bar = tqdm(
        range(step, last),
        initial=step,
        total=args.max_train_steps,
        desc=f"unlearn {job.train_prompt[:30]}",
        disable=args.no_progress or not accelerator.is_main_process,
    )
    losses: list[torch.Tensor] = []

    def run_step(plan_step: int) -> list[Any]:
        """One optimizer step of the plan: its micro-batches through ``unlearner.step``; the
        ``StepResult`` of each that trained (not calibrating)."""
        results = []
        for keep_rows, forget_rows, generator in plan.micro_batches(
            plan_step, accelerator.process_index
        ):
            x0, a0 = keep[keep_rows.to(device)], forget[forget_rows.to(device)]
            result = unlearner.step(x0, a0, generator=generator, **conditioning)
            if not result.calibrating:
                losses.append(result.terms.loss)
                results.append(result)
        return results

    if unlearner.calibrating:  # the first steps' draws, at the starting weights
        started = time.perf_counter()
        calibration_step = 0
        while unlearner.calibrating:  # more steps only where fp16 overflowed
            run_step(calibration_step)
            calibration_step += 1
        train_wall += time.perf_counter() - started
    checks = [entry for entry in history if entry.get("check") is not None]
    stop = None
    done = step
    for step in bar:
        started = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]  # this step's
        results = run_step(step)
        train_wall += time.perf_counter() - started
        done = step + 1
        tracking.step(results, lr, done)
        if args.verify_every and done % args.verify_every == 0 and done < args.max_train_steps:
            entry = watch.check(done, len(checks))
            nonmember_stops = False
            if nonmember is not None:
                check = nonmember.check(done)
                entry["nonmember"] = check.to_dict()
                nonmember_stops = nonmember.steer(unlearner, check)
            if entry["keep_outside"]:  # put back the last weights in band; weaker forgetting
                restore(params, saved)
                if sum("backed_off" in c for c in checks) < args.keep_backoffs:
                    unlearner.back_off(0.5)
                    entry["backed_off"] = unlearner.forget_weight
            else:
                saved = snapshot(params)
            checks.append(entry)
            history.append(entry)
            tracking.log(check_log(entry), done)
            stop = stop_reason(args, checks, nonmember_stops)
            if accelerator.is_main_process:
                bar.set_postfix(copies=f"{entry['copies']}/{entry['generated']}")
        periodic = args.checkpointing_steps and done % args.checkpointing_steps == 0
        if stop is None and done < args.max_train_steps and (periodic or done == last):
            state = {
                "step": done,
                "history": history,
                "train_wall_s": train_wall,
                "loss": past_losses + [float(v) for v in losses],  # one host sync per save
            }
            save_checkpoint(accelerator, out, done, state, keep=args.checkpoints_total_limit or 1)
        if stop is not None:
            break
    bar.close()
    for handle in hooks:
        handle.remove()
    if stop is None and last < args.max_train_steps:
        if accelerator.is_main_process:
            print(
                f"stopped after step {last} of {args.max_train_steps}; continue with "
                "--resume_from_checkpoint latest"
            )
        return None
    if stop is None:
        stop = {
            "reason": "cap",
            "text": f"reached the step cap (--max_train_steps {args.max_train_steps})"
            + (", copies remained at the last check" if checks and checks[-1]["copies"] else ""),
        }
    stop.update(steps=done, until=args.until)
    final = verifier(done)
    final["keep"] = watch.keep_drift("after")
    final["keep_not_watched"] = watch.not_watched
    history.append(final)
    tracking.log(verification_log(final), done)
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
        "stop": stop,
        "accumulation_steps": plan.accumulation,
        "processes": accelerator.num_processes,
    }


def stop_reason(
    args: argparse.Namespace, checks: list[dict[str, Any]], nonmember_stops: bool = False
) -> dict[str, Any] | None:
    """Why the run stops after the newest of ``checks``, or ``None`` to go on.

    A keep prompt out of its band once the forget weight was halved ``--keep_backoffs`` times
    (``"backed_off"`` marks a check after which it was halved; the weights of the last check in
    band are put back either way); or, with ``--until gone``, ``--stop_checks`` checks in a row
    in band without a copy; or, with ``--until nonmember``, a check in band at which the
    non-member rule ends the run (``nonmember_stops``: ``NonmemberStop.steer``'s answer at the
    newest check, never with ``--stop_rule level``, ``anneal`` or ``track``, which go on to the
    cap)."""
    newest = checks[-1]
    if newest["keep_outside"] and "backed_off" not in newest:
        in_band = [c["step"] for c in checks[:-1] if not c["keep_outside"]]
        back = in_band[-1] if in_band else 0
        names = ", ".join(repr(p) for p in newest["keep_outside"])
        return {
            "reason": "keep",
            "text": f"keep prompt {names} left its band at step {newest['step']}: the weights of "
            f"step {back} were put back",
            "restored_step": back,
        }
    if args.until == "nonmember":
        if not nonmember_stops or newest["keep_outside"]:
            return None
        measured = newest["nonmember"]
        return {
            "reason": "nonmember",
            "text": f"the copies rank like non-members: their denoising-error percentile among "
            f"the held-out non-copies is {measured['percentile']:.2f} >= --stop_target "
            f"{args.stop_target:g} at step {newest['step']}",
        }
    if args.until != "gone" or len(checks) < args.stop_checks:
        return None
    recent = checks[-args.stop_checks :]
    if any(c["copies"] or c["keep_outside"] for c in recent):
        return None
    seen = sum(c["generated"] for c in recent)
    return {
        "reason": "gone",
        "text": f"gone: no copy among {seen} fresh generations in the last {args.stop_checks} "
        f"checks (steps {', '.join(str(c['step']) for c in recent)})",
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

    layers = get_peft_model_state_dict(denoiser)
    if name == "unet":
        # As diffusers' UNet LoRA scripts (SD 1.x/2.x, SDXL) save them. Its transformer scripts
        # (SD3, Flux) save PEFT's names as they are: converted, the attention projections would
        # be renamed and the other modules not, and load_lora_weights would drop the former.
        layers = convert_state_dict_to_diffusers(layers)
    scale = args.lora_alpha / args.rank
    if scale != 1:
        # load_lora_weights rebuilds the adapter at alpha = rank (diffusers < 0.34 saves no
        # adapter metadata): the trained delta (alpha / r) B A is saved with the scale in B.
        layers = {k: v * scale if "lora_B" in k or "lora.up" in k else v for k, v in layers.items()}
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
    return "the original model (no unlearned weights in --output_dir yet)"
