"""Unlearn an outlier image from a pretrained DDPM or flow model with SISS or a baseline, measured.

This script is the "after" half of the paper's MNIST T-Shirt experiment (Hasanaliyev et al.,
2025, Sec. 5.2, Table 2) at laptop scale. It starts from the shipped tiny digits DDPM
(``examples/assets/pretrained``, trained by ``pretrain.py`` on scikit-learn's digits with a
T-shirt injected at 1%), fine-tunes it with any method of the library (``--method siss``,
``siss-nois``, ``naive``, ``neggrad``, ``erasediff``; ``--lam`` for SISS's mixture weight) on
``X \\ A`` (the digits) and ``A`` (the T-shirt copies), and measures before and after how often
the model samples the T-shirt (with a 95% interval), the T-shirt's exact NLL in bits/dim along
the probability-flow ODE, and the sample quality (IS- and FID-style scores under the shipped digit
classifier); ``--eval_every N`` also tracks the T-shirt rate every N steps. Checkpoints are
written atomically in safetensors every ``--checkpointing_steps`` (the newest
``--checkpoints_total_limit`` kept); a run that is interrupted and restarted with
``--resume_from_checkpoint latest`` ends with the same weights as an uninterrupted one.
``--report_to tensorboard`` logs each step's loss terms, balancer statistics and learning rate,
and the evaluations, through accelerate's trackers. The learning rate follows a cosine schedule
to 0 (``--lr_scheduler``) and the keep rows come in shuffled epochs (``siss.loop.BatchPlan``), as
in the pretraining. The flags are named as in diffusers' training scripts
(``--pretrained_model_name_or_path``, ``--max_train_steps``, ``--learning_rate``, ...); the old
hyphenated spellings (``--steps``, ``--checkpoint``, ...) are accepted until 0.3.0.
SISS's keep term matches a frozen copy of the pretrained model instead of the drawn
noise (``--keep_target teacher``, the default; not at ``--lam`` 0 or 1, where the noise target is
the default): Lemma 1's expected gradient where the teacher is stationary, without the keep
term's regression on the drawn noise, which doubled the FID-style score of every method
(docs/results.md, 'Quality kept'). ``--audit``
also runs ``siss.audit`` on the pretrained and the unlearned model, against 128 T-shirt variants
as non-members, and prints the comparison (docs/audit.md).

A rectified-flow checkpoint (``pretrain.py --process flow``: ``FlowMatchEulerDiscreteScheduler``
in its ``scheduler_config.json``) is detected and unlearned the same way: the loss comes from the
scheduler (``siss.adapters.loss_from_scheduler``: velocity targets, ``γ = 1 - s``), samples from
its Euler steps (``--eval_sampler euler``), and the NLL is integrated along the flow ODE
(``siss.audit.likelihood.flow_bits_per_dim``), a different ODE from the DDPM's: bits/dim compare
within a process, not across. ``--timesteps`` indices follow the scheduler's grid, which for
flow runs from the most noise (index 0) to the least. Every method runs on flow but EraseDiff,
refused by name: its uniform targets are targets for predicted noise, which a flow model does
not predict.

    python -m examples.unlearn --method siss --lam 0.5 --max_train_steps 300
    python -m examples.unlearn --audit            # + generation, reconstruction, membership audit
    python -m examples.unlearn --method neggrad --max_train_steps 100 --output_dir outputs/neggrad
    python -m examples.unlearn --resume_from_checkpoint latest \
        --output_dir outputs/unlearn/siss-lam0.5-seed0
    python -m examples.unlearn --report_to tensorboard   # loss terms, balancer, lr: logs/
    python -m examples.unlearn --pretrained_model_name_or_path examples/assets/flow-pretrained
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DModel
from tqdm.auto import tqdm

from siss import RULES, Unlearner, UnlearningConfig
from siss._cli import (
    CHECKPOINTS,
    CommandParser,
    add_audit_flags,
    add_checkpoint_flags,
    add_data_flags,
    add_evaluation_flags,
    add_logging_flags,
    add_model_flag,
    add_output_flag,
    add_recipe_flags,
    add_runtime_flags,
    add_tracking_flags,
    check_timesteps,
    flag,
    recipe_config,
    start_trackers,
)
from siss._digits import DEFAULT_EVAL_STEPS, PROCESS_NAMES, stopping
from siss._digits.data import load_training_set, make_tshirt_variants
from siss._digits.evaluate import Evaluator, evaluation_log, save_grid, step_log
from siss._digits.models import check_sampler, checkpoint_process, load_scheduler, save_model
from siss._digits.state import (
    DRAWS,
    calibrate,
    latest_checkpoint,
    load_checkpoint,
    plan_step,
    restore_unlearner,
    save_checkpoint,
    unlearner_state,
)
from siss._files import write_atomically, write_json_atomically
from siss.audit import AuditReport, audit, compare
from siss.loop import BatchPlan

ASSETS = Path(__file__).resolve().parent / "assets"
CLASSIFIER = "digit_classifier.safetensors"  # under ASSETS, read when a run starts
# Methods that do not apply to a process, and why (siss.RULES; checked at parse time).
METHOD_REFUSALS = {
    name: {"flow": rules.refused["flow_prediction"]}
    for name, rules in RULES.items()
    if "flow_prediction" in rules.refused
}
AUDIT_REFERENCE_SEED = 1  # make_tshirt_variants' seed, as examples/audit_digits.py's


def build_parser() -> CommandParser:
    """This script's flags (diffusers' names where diffusers has the flag) and their checks."""
    p = CommandParser(prog="python -m examples.unlearn", description=__doc__.split("\n\n")[0])
    add_model_flag(
        p,
        default=ASSETS / "pretrained",
        old=("--checkpoint",),
        help="the model to unlearn from: a folder of pretrain.py (save_pretrained weights and "
        "the scheduler_config.json of a DDPM or rectified-flow scheduler)",
        missing_hint=" (python -m examples.pretrain --output_dir DIR makes one)",
    )
    add_recipe_flags(
        p,
        max_train_steps=300,
        helps={
            "train_batch_size": "rows per step (one process). SISS (λ=0.5)'s keep term sees "
            "about half of them (docs/results.md, 'Why fine-tuning loses quality here', "
            "measures it at 128)",
            "learning_rate": "AdamW learning rate (paper: 5e-5)",
            "lr_scheduler": "learning-rate schedule (diffusers.optimization.get_scheduler). "
            "cosine anneals --learning_rate to 0 by the last step, as the pretraining did: a "
            "constant lr leaves the model re-heated and its samples drifting (naive deletion's "
            "FID-style score up by 5-21 at 300 steps; docs/results.md, 'Quality after "
            "unlearning')",
            "lr_warmup_steps": "linear warmup steps of --lr_scheduler (not used by 'constant')",
        },
    )
    add_tracking_flags(add_evaluation_flags(p, eval_samples=1000), eval_every=0)
    stopping.add_until_flags(p.add_argument_group("stopping"))
    checkpoints = add_checkpoint_flags(p, checkpointing_steps=50, checkpoints_total_limit=2)
    flag(
        checkpoints,
        "--stop_after",
        type=int,
        default=None,
        at_least=1,
        help="stop (as if interrupted) after this many steps, for testing "
        "--resume_from_checkpoint. Default: run to --max_train_steps",
    )
    add_data_flags(p, outlier_help="the outlier image to forget. Default: the drawn T-shirt")
    add_output_flag(
        p,
        default=None,
        help="where metrics.json, the pictures, checkpoints/ and model/ go. Default: "
        "outputs/unlearn/[flow-]<method>[-lam<λ>]-seed<seed>",
    )
    add_logging_flags(p)
    add_runtime_flags(p)
    add_audit_flags(
        p,
        audit_help="audit the model before and after unlearning",
        description="--audit runs siss.audit (docs/audit.md) on the pretrained model "
        "(--pretrained_model_name_or_path) and on the unlearned one, with --audit_references "
        "procedurally varied T-shirts (siss._digits.data.make_tshirt_variants, seed 1) as the "
        "non-members; prints the before/after comparison and writes audit_before.json, "
        "audit_after.json, audit_compare.md and audit_before.png, audit_after.png into "
        "--output_dir. Cost on a CPU, per model: generation 40-70 s, reconstruction 5-17 s, "
        "membership 2-7 s (the default checks: ~1.5 min for both models on 2 cores), "
        "reconstruction_sweep 1-2 min, likelihood ~3 min; the full audit is ~6 min per model. The"
        " before audit is reused from audit_before.json when its settings match. Needs the "
        "T-shirt outlier (not --outlier_image).",
    )
    p.add_check(check_run)
    return p


def check_run(args: argparse.Namespace) -> None:
    """The checks across flags, after each flag's own: the timesteps' count, the recipe
    (``siss.UnlearningConfig``), the audit's options, the process read from the checkpoint's
    scheduler config (no weights loaded: a sampler or method of the other process fails here,
    before any training), a resumed checkpoint's files; then ``--output_dir``'s default."""
    check_timesteps(args)
    stopping.check_until(args)  # before the recipe's defaults: --stop_rule level sets one
    resolve_keep_target(args)
    from siss.audit.run import parse_options

    args.audit_options = parse_options(args.audit_option, "--audit_option")
    if args.audit and args.outlier_image is not None:
        raise ValueError(
            "--audit compares with T-shirt variants: it needs the T-shirt (no --outlier_image)"
        )
    resolve_process(args)
    if args.process in METHOD_REFUSALS.get(args.method, {}):
        raise ValueError(f"--method {args.method}: {METHOD_REFUSALS[args.method][args.process]}")
    resumed = args.resume_from_checkpoint
    if resumed not in (None, "latest") and not (Path(resumed) / "state.json").is_file():
        raise ValueError(
            f"--resume_from_checkpoint {resumed}: holds no state.json, not a checkpoint of "
            "unlearn.py (its checkpoints are --output_dir/checkpoints/step-NNNNNNN)"
        )
    if args.output_dir is None:
        label = f"{args.method}-lam{args.lam:g}" if args.method == "siss" else args.method
        prefix = "flow-" if args.process == "flow" else ""
        args.output_dir = Path("outputs/unlearn") / f"{prefix}{label}-seed{args.seed}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The checked flags of one run (``error``, exit code 2, on a bad one)."""
    return build_parser().parse_args(argv)


# UnlearningConfig's fields that this script's flags set (the others keep their defaults).
RECIPE_FIELDS = (
    "method",
    "lam",
    "keep_target",
    "superfactor",
    "ratio",
    "balance_mode",
    "balance_every",
    "calibration_batches",
    "timesteps",
    "learning_rate",
    "lr_scheduler",
    "lr_warmup_steps",
    "max_train_steps",
    "ema_decay",
    "ema_power",
    "max_grad_norm",
    "seed",
    "num_neighbors",
    "forget_timesteps",
    "snr_gamma",
)


def job(config: UnlearningConfig, **settings: Any) -> argparse.Namespace:
    """One run's settings built in code (study.py): the recipe ``config`` and the other
    settings by their flag's name without dashes (``output_dir=...``, ``eval_samples=...``),
    the rest at their defaults; checked as the flags are (a ``ValueError`` naming the flag).
    ``config`` must be one these flags can express (``x_from`` and ``adam_weight_decay`` at
    their defaults): the run trains exactly it, or refuses."""
    parser = build_parser()
    args = parser.defaults()
    unknown = sorted(set(settings) - set(vars(args)) | set(settings) & set(RECIPE_FIELDS))
    if unknown:
        raise TypeError(f"not settings of unlearn.py besides the recipe config: {unknown}")
    timesteps = config.timesteps
    if timesteps is not None:
        timesteps = list(timesteps) if isinstance(timesteps, tuple) else [timesteps]
    vars(args).update({name: getattr(config, name) for name in RECIPE_FIELDS})
    vars(args).update(timesteps=timesteps, **settings)
    parser.check(args)
    if resolve_keep_target(args) != config:
        raise ValueError(
            "unlearn.py's flags cannot express this config (x_from and adam_weight_decay "
            f"stay at their defaults): {config}"
        )
    return args


def resolve_keep_target(args: argparse.Namespace) -> UnlearningConfig:
    """The run's ``siss.UnlearningConfig`` from the flags, validated (a ``ValueError`` naming
    the flag); sets the flags left at None (``--keep_target``, ``--balance_mode``,
    ``--balance_every``) to the config's defaults."""
    config = recipe_config(
        args,
        lr_scheduler=args.lr_scheduler,
        lr_warmup_steps=args.lr_warmup_steps,
        ema_decay=getattr(args, "ema_decay", 0.0),
        ema_power=getattr(args, "ema_power", 0.75),
    )
    args.keep_target, args.balance_mode = config.keep_target, config.balance_mode
    args.balance_every = config.balance_every
    return config


def resolve_process(args: argparse.Namespace) -> str:
    """Sets ``args.process`` from ``--pretrained_model_name_or_path``'s scheduler config and
    the evaluation sampler and steps of that process where they were left at None;
    ``ValueError`` naming the flag otherwise (also ``--snr_gamma`` on a flow model)."""
    try:
        args.process = checkpoint_process(args.pretrained_model_name_or_path)
    except ValueError as error:
        raise ValueError(f"--pretrained_model_name_or_path: {error}") from error
    args.eval_sampler = check_sampler(args.process, args.eval_sampler, "--eval_sampler")
    if args.process == "flow" and getattr(args, "snr_gamma", None) is not None:
        raise ValueError(
            f"--snr_gamma {args.snr_gamma:g}: min-SNR-γ weighting is for DDPM checkpoints; "
            f"{args.pretrained_model_name_or_path} is a rectified-flow model"
        )
    if args.eval_steps is None:
        args.eval_steps = DEFAULT_EVAL_STEPS[args.process]
    return args.process


def run_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The flags of a run that are not the recipe's, for the trackers' hyper-parameters."""
    skip = {*RECIPE_FIELDS, "audit_options"}
    return {key: value for key, value in vars(args).items() if key not in skip}


def run(args: argparse.Namespace, before: dict[str, Any] | None = None) -> dict[str, Any]:
    """Runs (or resumes) one unlearning job; returns the metrics written to metrics.json.

    ``before``: the starting checkpoint's metrics under the same evaluation settings, when the
    caller has them already (the study evaluates the pretrained model once per seed).
    """
    if args.threads:
        torch.set_num_threads(args.threads)
    resolve_process(args)  # a Namespace built elsewhere may not have been through parse_args
    device = torch.device(args.device)
    out = Path(args.output_dir)
    config = resolve_keep_target(args)
    unet = UNet2DModel.from_pretrained(args.pretrained_model_name_or_path).to(device)
    data = load_training_set(
        source=args.data,
        root=args.data_root,
        outlier_path=args.outlier_image,
        size=unet.config.sample_size,
        channels=unet.config.in_channels,
        seed=0,
    )
    keep, forget = data.images[~data.is_outlier], data.images[data.is_outlier]
    scheduler = load_scheduler(args.pretrained_model_name_or_path)
    # The teacher is a frozen copy of the weights loaded here: built before a resume loads the
    # checkpoint's.
    retain = keep.to(device) if args.method == "retrack" else None  # ReTrack's neighbour pool
    unlearner = Unlearner(unet, scheduler, config, n=len(data.images), k=len(forget), retain=retain)
    stop = stopping.nonmember_stop(args, unet, scheduler, data.outlier.to(device))
    # Training draws (rows, timesteps, coins, noise) are a function of (seed, step): a resumed
    # run draws what an uninterrupted one draws, with no generator state to carry.
    batch = args.train_batch_size
    plan = BatchPlan(args.seed, len(keep), len(forget), batch, batch)
    evaluator = Evaluator.from_flags(args, data.outlier, keep, ASSETS / CLASSIFIER)

    history: list[dict[str, Any]] = []
    step, train_wall = 0, 0.0
    resume = args.resume_from_checkpoint
    found = latest_checkpoint(out / CHECKPOINTS) if resume == "latest" else resume
    if found is not None:
        found = Path(found)
        saved = json.loads((found / "state.json").read_text())
        if saved.get("draws") != DRAWS:
            raise SystemExit(
                f"{found} was written by a version of unlearn.py that drew the keep rows with "
                "replacement; this one draws them in shuffled epochs (siss.loop.BatchPlan), so the "
                "run cannot go on: start it again without --resume_from_checkpoint, or in another "
                "--output_dir"
            )
        if saved.get("keep_target", "noise") != args.keep_target:
            raise SystemExit(
                f"{found} was trained with --keep_target {saved.get('keep_target', 'noise')}, "
                f"not {args.keep_target}: pass that, or start again in another --output_dir"
            )
        if "unlearner" not in saved:
            raise SystemExit(
                f"{found} was written before unlearn.py ran on siss.Unlearner: start it again "
                "without --resume_from_checkpoint, or in another --output_dir"
            )
        state = load_checkpoint(
            found, model=unet, optimizer=unlearner.optimizer, generators={}, ema=unlearner.ema
        )
        try:
            restore_unlearner(unlearner, state["unlearner"])
            if stop is not None:
                stop.load_state_dict(state["nonmember"])
        except ValueError as error:
            raise SystemExit(f"{found}: {error}") from None
        step, history, train_wall = state["step"], state["history"], state["train_wall_s"]
        # The schedule is a function of the step alone: replay it (torch warns that the
        # optimizer did not step in between, which is what a replay means).
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
            for _ in range(step):
                unlearner.lr_scheduler.step()
    elif resume == "latest":
        print(f"no checkpoint under {out / CHECKPOINTS}: starting from step 0")
    if step == 0 and not history:
        out.mkdir(parents=True, exist_ok=True)
        if before is None:
            before, samples = evaluator(unet, scheduler, args.eval_samples)
            save_grid(samples, data.outlier, out / "samples_before.png", "before unlearning")
        history.append({**before, "step": 0})
        if stop is not None:
            stop.steer(unlearner, stop.start())

    keep_dev, forget_dev = keep.to(device), forget.to(device)
    unet.train()
    if unlearner.calibrating:  # at the starting weights, once
        started = time.perf_counter()
        calibrate(unlearner, keep_dev, forget_dev, plan)
        train_wall += time.perf_counter() - started
    steps = args.max_train_steps
    last = steps if args.stop_after is None else min(steps, args.stop_after)
    if stop is not None and stop.stops():  # a non-member already
        steps = last = stop.history[-1].step
    tracker = start_trackers(args, out, "unlearn", {**config.to_dict(), **run_settings(args)})
    if tracker is not None and step == 0:
        tracker.log(evaluation_log(history[0]), step=0)
    bar = tqdm(
        range(step, last), initial=step, total=steps, desc=out.name, disable=args.no_progress
    )
    for step in bar:
        started = time.perf_counter()
        lr = unlearner.optimizer.param_groups[0]["lr"]  # this step's
        result = plan_step(unlearner, keep_dev, forget_dev, plan, step)
        train_wall += time.perf_counter() - started
        done = step + 1
        ends = False
        if stop is not None and done % stop.every == 0:  # the delivered (EMA) weights, measured
            with unlearner.averaged_weights():
                check = stop.check(done)
                ends = stop.steer(unlearner, check)
            bar.set_postfix(percentile=f"{check.percentile:.2f}")
        if ends:  # the T-shirt ranks like a non-member: stop here
            steps = last = done
        if tracker is not None:
            tracker.log(step_log(result, lr), step=done)
        if args.eval_every and done % args.eval_every == 0 and done < steps:
            with unlearner.averaged_weights():
                metrics = evaluator.track(unet, scheduler, args.track_samples)
            history.append({"step": done, **metrics})
            bar.set_postfix(rate=f"{metrics['outlier_rate']:.2%}")
            if tracker is not None:
                tracker.log(evaluation_log(metrics), step=done)
        if done % args.checkpointing_steps == 0 or done == last:
            save_checkpoint(
                out / CHECKPOINTS,
                done,
                model=unet,
                optimizer=unlearner.optimizer,
                generators={},
                extra={
                    "history": history,
                    "train_wall_s": train_wall,
                    "draws": DRAWS,
                    "keep_target": args.keep_target,
                    "unlearner": unlearner_state(unlearner),
                    "nonmember": stopping.stop_state(stop),
                },
                ema=unlearner.ema,
                keep=args.checkpoints_total_limit,
            )
        if ends:
            bar.update()  # the bar counts a step when the next one starts: this one is the last
            break
    bar.close()
    if last < steps:
        if tracker is not None:
            tracker.end_training()
        print(
            f"stopped after step {last} of {steps}; continue with --resume_from_checkpoint latest"
        )
        return {"stopped_at": last}

    if unlearner.ema is not None:  # the EMA is the model this run delivers: evaluated and saved
        unlearner.ema.copy_to(unlearner.params)
    if history[-1]["step"] != steps:
        metrics, samples = evaluator(unet, scheduler, args.eval_samples)
        history.append({"step": steps, **metrics})
        title = f"after {steps} steps of {out.name}"
        save_grid(samples, data.outlier, out / "samples_after.png", title)
    if tracker is not None:
        tracker.log(evaluation_log(history[-1]), step=steps)
        tracker.end_training()
    save_model(out / "model", unet)
    result = {
        "method": args.method,
        "process": args.process,
        "lam": args.lam if args.method == "siss" else None,
        "seed": args.seed,
        "steps": steps,
        "train_wall_s": round(train_wall, 1),
        "config": {key: str(value) for key, value in vars(args).items()},
        "before": history[0],
        "after": history[-1],
        "history": history,
        "nonmember_stop": stopping.stop_summary(stop, steps),
    }
    write_json_atomically(out / "metrics.json", result)
    return result


def audit_run(args: argparse.Namespace, before_path: Path | None = None) -> str:
    """``--audit``: audits ``--pretrained_model_name_or_path`` and the unlearned model; returns
    the comparison.

    Writes ``audit_before.json``, ``audit_after.json``, ``audit_compare.md`` and the two figures
    into ``--output_dir``. The pretrained model is audited once: its audit is kept in
    ``before_path`` (default ``audit_before.json``) and reused while the settings match (the
    study shares one per seed between its methods).
    """
    from siss.audit.figure import save_figure

    out = Path(args.output_dir)
    scheduler = load_scheduler(args.pretrained_model_name_or_path)
    before_unet = UNet2DModel.from_pretrained(args.pretrained_model_name_or_path)
    channels, size = before_unet.config.in_channels, before_unet.config.sample_size
    data = load_training_set(
        source=args.data, root=args.data_root, size=size, channels=channels, seed=0
    )
    forget = data.outlier[None]
    reference, _ = make_tshirt_variants(
        args.audit_references,
        torch.Generator().manual_seed(AUDIT_REFERENCE_SEED),
        size=size,
        channels=channels,
    )
    settings = {
        "checkpoint": str(args.pretrained_model_name_or_path),
        "data": args.data,
        "checks": list(args.audit_checks),
        "num_samples": args.audit_samples,
        "num_inference_steps": args.audit_steps,
        "references": args.audit_references,
        "reference_seed": AUDIT_REFERENCE_SEED,
        "seed": args.seed,
        "options": {k: {n: repr(v) for n, v in o.items()} for k, o in args.audit_options.items()},
    }

    def run_audit(unet: UNet2DModel, label: str) -> AuditReport:
        print(f"auditing {label} ({', '.join(args.audit_checks)})", file=sys.stderr)
        report = audit(
            unet,
            scheduler,
            forget,
            reference,
            checks=args.audit_checks,
            num_samples=args.audit_samples,
            num_inference_steps=args.audit_steps,
            seed=args.seed,
            device=args.device,
            progress=not args.no_progress,
            label=label,
            **args.audit_options,
        )
        report.config["unlearn"] = settings
        return report

    before = None
    cached = Path(before_path or out / "audit_before.json")
    if cached.exists():
        saved = AuditReport.from_dict(json.loads(cached.read_text()))
        if saved.config.get("unlearn") == settings:
            before = saved
    if before is None:
        before = run_audit(before_unet, f"before: {Path(args.pretrained_model_name_or_path).name}")
        write_json_atomically(cached, before.to_dict())
    if cached != out / "audit_before.json":
        write_json_atomically(out / "audit_before.json", before.to_dict())
    save_figure(before, out / "audit_before.png", forget=forget, reference=reference)
    after_unet = UNet2DModel.from_pretrained(out / "model")
    after = run_audit(after_unet, f"after: {out.name}")
    write_json_atomically(out / "audit_after.json", after.to_dict())
    save_figure(after, out / "audit_after.png", forget=forget, reference=reference)
    table = compare(before, after).to_markdown()
    write_atomically(out / "audit_compare.md", table + "\n")
    return table


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = run(args)
    if "before" not in result:
        return
    table = audit_run(args) if args.audit else None
    print(f"\n{PROCESS_NAMES[args.process]}, sampled with {args.eval_sampler}-{args.eval_steps}")
    print(f"{'':8}{'outlier rate [95% CI]':>26}{'outlier NLL (bpd)':>20}{'IS':>8}{'FID':>8}")
    for name in ("before", "after"):
        row = result[name]
        low, high = row["outlier_rate_ci95"]
        quality = "".join(
            f"{'n/a':>8}" if row[key] is None else f"{row[key]:>8.2f}"
            for key in ("inception_score", "fid")
        )
        rate = f"{row['outlier_rate']:.2%} [{low:.2%}, {high:.2%}]"
        if row["nonfinite_samples"]:
            rate = f"not measured: {row['nonfinite_samples']} NaN samples"
        nll = "n/a" if row["outlier_nll_bpd"] is None else f"{row['outlier_nll_bpd']:.2f}"
        print(f"{name:8}{rate:>26}{nll:>20}{quality}")
    print(
        f"\n{result['steps']} steps in {result['train_wall_s']:.0f} s of training; "
        f"pictures and metrics.json in {args.output_dir}"
    )
    if (line := stopping.summary_line(result["nonmember_stop"])) is not None:
        print(line)
    if table is not None:
        files = "audit_before.json, audit_after.json, audit_compare.md and figures"
        print(f"\n{table}\n\n{files} in {args.output_dir}")


if __name__ == "__main__":
    main()
