"""Groups of flags named as in diffusers' training scripts (``train_text_to_image.py``,
``train_unconditional.py``), shared by every command: the model to start from, the output folder,
the training schedule, checkpoints and resume, trackers, and where the command runs.

Each ``add_*`` function adds its flags to a ``CommandParser`` (with their old hyphenated
spellings, hidden, until ``siss._cli.parser.REMOVED_IN``) and the checks of their values, run
right after parsing: an out-of-range value, a missing folder, a device this machine lacks or a
tracker whose package is not installed is an error naming the flag and the value, exit code 2,
before any model is loaded or any file is written. A command offers the flags that mean
something for it: an argument left at ``None`` leaves that flag out.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch

from siss._cli.parser import Check, CommandParser, Container, flag

MIXED_PRECISIONS = ("no", "fp16", "bf16")
TRACKERS = ("tensorboard", "wandb")
CHECKPOINTS = "checkpoints"
"""The folder under ``--output_dir`` that ``--resume_from_checkpoint NAME`` also looks in."""


def resolve_device(value: str | None, flag: str = "--device") -> torch.device:
    """The ``torch.device`` of ``value`` (``None``: CUDA if available, else the CPU); a
    ``ValueError`` naming ``flag`` for a malformed device or one this machine does not have.

    Examples:
        >>> resolve_device("cpu")
        device(type='cpu')
        >>> resolve_device("tpu")
        Traceback (most recent call last):
        ...
        ValueError: --device tpu: not a torch device (e.g. cpu, cuda, cuda:1, mps)
    """
    if value is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise ValueError(
            f"{flag} {value}: not a torch device (e.g. cpu, cuda, cuda:1, mps)"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{flag} {value}: CUDA is not available on this machine; use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"{flag} {value}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{flag} {value}: MPS is not available on this machine; use cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{flag} {value}: this command runs on cpu, cuda or mps")
    return device


def _folder_check(name: str, dest: str, *, hub: bool, hint: str) -> Check:
    """The check that ``args.<dest>`` is an existing folder (or, with ``hub``, a Hub id)."""

    def check(args: argparse.Namespace) -> None:
        value = getattr(args, dest)
        if value is None:
            return
        path = Path(value)
        if path.is_dir():
            return
        if path.exists():
            raise ValueError(f"{name} {value}: is a file, not a model folder")
        parts = str(value).split("/")
        if hub and len(parts) == 2 and all(parts) and not str(value).startswith("."):
            return  # a Hub model id (organization/name), downloaded by from_pretrained
        raise ValueError(f"{name} {value}: no such folder{hint}")

    return check


def add_model_flag(
    parser: CommandParser,
    *,
    default: Path | str | None,
    help: str,
    old: tuple[str, ...] = (),
    hub: bool = False,
    missing_hint: str = "",
) -> None:
    """``--pretrained_model_name_or_path``: the model folder the command starts from, which
    must exist (``hub``: or be a Hub id such as ``CompVis/stable-diffusion-v1-4``).
    ``missing_hint`` ends the error of a missing folder (say how to make it)."""
    flag(
        parser,
        "--pretrained_model_name_or_path",
        old=old,
        type=str if hub else Path,
        default=default,
        metavar="PATH",
        help=help,
    )
    parser.add_check(
        _folder_check(
            "--pretrained_model_name_or_path",
            "pretrained_model_name_or_path",
            hub=hub,
            hint=missing_hint,
        )
    )


def output_folder_error(name: str, folder: Path | str | None) -> str | None:
    """Why the output folder ``folder`` (flag ``name``) cannot be made: something that is not a
    folder already there or above it, which would stop ``mkdir`` after the work; ``None`` if
    nothing is in the way (or no folder is given)."""
    if folder is None:
        return None
    folder = Path(folder)
    blocking = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocking is None:
        return None
    where = "" if blocking == folder else f"{blocking} "
    return f"{name} {folder}: {where}is a file, not a folder"


def add_output_flag(
    parser: CommandParser | argparse._ArgumentGroup,
    *,
    default: Path | None,
    help: str,
    old: tuple[str, ...] = (),
) -> None:
    """``--output_dir``: the folder the command writes into (made when the run starts, not at
    parsing); a file there or above it is refused (``output_folder_error``). ``parser``: a
    ``CommandParser`` or one of its groups."""
    flag(parser, "--output_dir", old=old, type=Path, default=default, metavar="DIR", help=help)

    def check(args: argparse.Namespace) -> None:
        if (error := output_folder_error("--output_dir", args.output_dir)) is not None:
            raise ValueError(error)

    parser.add_check(check)  # type: ignore[union-attr]


# The flags of the training group with their generic help; a command's ``helps`` override it.
_TRAINING_HELP = {
    "max_train_steps": "optimizer steps of the run",
    "train_batch_size": "rows per step on each device (one process: the whole batch)",
    "gradient_accumulation_steps": "micro-batches accumulated into one optimizer step",
    "learning_rate": "AdamW's peak learning rate",
    "lr_scheduler": "learning-rate schedule (diffusers.optimization.get_scheduler)",
    "lr_warmup_steps": "linear warmup steps of the learning-rate schedule",
    "max_grad_norm": "gradient clipping norm; 0 disables clipping",
    "mixed_precision": "precision of the forward and backward passes (accelerate)",
    "gradient_checkpointing": "recompute activations in the backward pass: less memory, slower",
    "rank": "rank of the LoRA adapters",
    "seed": "seed of every random draw (data order, timesteps, noise)",
}
# The spellings these flags had before they followed diffusers (accepted until REMOVED_IN).
_TRAINING_OLD: dict[str, tuple[Any, ...]] = {
    "max_train_steps": ("--steps",),
    "train_batch_size": ("--batch-size",),
    "learning_rate": ("--lr",),
    "lr_scheduler": ("--lr-schedule",),
}


def add_training_flags(
    parser: CommandParser,
    *,
    max_train_steps: int | None = None,
    train_batch_size: int | None = None,
    learning_rate: float | None = None,
    lr_scheduler: tuple[str, tuple[str, ...]] | None = None,
    lr_warmup_steps: int | None = None,
    max_grad_norm: float | None = None,
    gradient_accumulation_steps: int | None = None,
    mixed_precision: str | None = None,
    gradient_checkpointing: bool = False,
    rank: int | None = None,
    seed: int | None = None,
    helps: dict[str, str] | None = None,
    old: dict[str, tuple[Any, ...]] | None = None,
) -> argparse._ArgumentGroup:
    """The training group: each flag given a default here is offered with it, the others are
    left out. ``lr_scheduler`` is ``(default, choices)``; ``gradient_checkpointing`` a switch.
    ``helps``: the command's help of a flag (by its name without dashes); ``old``: more old
    spellings of a flag. Checks: steps, batch and accumulation >= 1, learning rate > 0,
    warmup >= 0, clipping norm >= 0, rank >= 1, seed >= 0."""
    helps = {**_TRAINING_HELP, **(helps or {})}
    old_names = {**_TRAINING_OLD}
    for key, spellings in (old or {}).items():
        old_names[key] = old_names.get(key, ()) + tuple(spellings)
    group = parser.add_argument_group("training")

    def add(name: str, **kwargs: Any) -> None:
        flag(group, f"--{name}", old=old_names.get(name, ()), help=helps[name], **kwargs)

    if max_train_steps is not None:
        add("max_train_steps", type=int, default=max_train_steps, at_least=1)
    if train_batch_size is not None:
        add("train_batch_size", type=int, default=train_batch_size, at_least=1)
    if gradient_accumulation_steps is not None:
        add(
            "gradient_accumulation_steps", type=int, default=gradient_accumulation_steps, at_least=1
        )
    if learning_rate is not None:
        add("learning_rate", type=float, default=learning_rate, above=0)
    if lr_scheduler is not None:
        default, choices = lr_scheduler
        add("lr_scheduler", choices=choices, default=default)
    if lr_warmup_steps is not None:
        add("lr_warmup_steps", type=int, default=lr_warmup_steps, at_least=0)
    if max_grad_norm is not None:
        add("max_grad_norm", type=float, default=max_grad_norm, at_least=0)
    if mixed_precision is not None:
        add("mixed_precision", choices=MIXED_PRECISIONS, default=mixed_precision)
    if gradient_checkpointing:
        add("gradient_checkpointing", action="store_true")
    if rank is not None:
        add("rank", type=int, default=rank, at_least=1)
    if seed is not None:
        add("seed", type=int, default=seed, at_least=0)
    return group


def add_checkpoint_flags(
    parser: CommandParser,
    *,
    checkpointing_steps: int | None = None,
    checkpoints_total_limit: int | None = None,
    resume_paths: bool = True,
    what: str = "the newest checkpoint under --output_dir",
) -> argparse._ArgumentGroup:
    """``--checkpointing_steps N`` (a checkpoint every N steps), ``--checkpoints_total_limit N``
    (the newest N kept, older ones deleted as new ones are written) where given a default, and
    ``--resume_from_checkpoint latest|PATH`` (``latest``: ``what``; a PATH: that checkpoint
    folder, as given or under ``--output_dir``/checkpoints; ``resume_paths=False``: ``latest``
    only). A PATH that does not exist is an error naming it."""
    group = parser.add_argument_group("checkpoints")
    if checkpointing_steps is not None:
        flag(
            group,
            "--checkpointing_steps",
            old=("--checkpoint-every",),
            type=int,
            default=checkpointing_steps,
            at_least=1,
            help="save a resumable checkpoint every this many steps (and at the last one)",
        )
    if checkpoints_total_limit is not None:
        add_checkpoints_total_limit_flag(group, default=checkpoints_total_limit)
    flag(
        group,
        "--resume_from_checkpoint",
        old=(("--resume", "latest"),),
        default=None,
        metavar="latest|PATH" if resume_paths else "latest",
        help=f"continue a run: 'latest' from {what}"
        + (", or a PATH to one checkpoint folder" if resume_paths else "")
        + ". Default: none (start anew)",
    )

    def check(args: argparse.Namespace) -> None:
        value = args.resume_from_checkpoint
        if value is None or value == "latest":
            return
        if not resume_paths:
            raise ValueError(
                f"--resume_from_checkpoint {value}: this command resumes its --output_dir; "
                "use 'latest'"
            )
        candidates = [Path(value)]
        if getattr(args, "output_dir", None) is not None:
            candidates.append(Path(args.output_dir) / CHECKPOINTS / value)
        found = next((path for path in candidates if path.is_dir()), None)
        if found is None:
            raise ValueError(f"--resume_from_checkpoint {value}: no such checkpoint folder")
        args.resume_from_checkpoint = found

    parser.add_check(check)
    return group


def add_checkpoints_total_limit_flag(
    container: Container,
    *,
    default: int | None,
    help: str = "checkpoints kept: the oldest are deleted as new ones are saved",
) -> argparse.Action:
    """``--checkpoints_total_limit N`` (diffusers' name), checked to be >= 1 after parsing: the
    newest N checkpoints are kept. ``add_checkpoint_flags`` adds it; a command whose
    ``--checkpointing_steps`` and ``--resume_from_checkpoint`` mean something else (the Stable
    Diffusion job's) adds it alone, with its own ``help`` (what ``None`` keeps)."""
    return flag(
        container,
        "--checkpoints_total_limit",
        type=int,
        default=default,
        at_least=1,
        help=help,
    )


def tracker_available(name: str) -> bool:
    """Whether the package of accelerate's tracker ``name`` is installed."""
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    return {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}[name]()


def add_logging_flags(parser: CommandParser) -> argparse._ArgumentGroup:
    """``--report_to tensorboard|wandb`` (accelerate's trackers; default none) and
    ``--logging_dir`` (under ``--output_dir``). A tracker whose package is not installed is
    an error naming it."""
    group = parser.add_argument_group("logging")
    flag(
        group,
        "--report_to",
        choices=TRACKERS,
        default=None,
        help="log the per-step loss terms, balancer statistics, learning rate and in-run "
        "evaluations with accelerate's tracker: tensorboard (pip install tensorboard, or "
        "siss-unlearn[examples]) or wandb. Default: no tracker",
    )
    flag(
        group,
        "--logging_dir",
        type=Path,
        default=Path("logs"),
        help="the trackers' folder, under --output_dir",
    )

    def check(args: argparse.Namespace) -> None:
        if args.report_to is not None and not tracker_available(args.report_to):
            raise ValueError(
                f"--report_to {args.report_to}: the {args.report_to} package is not installed "
                f"(pip install {args.report_to})"
            )

    parser.add_check(check)
    return group


def add_runtime_flags(
    parser: CommandParser, *, device: bool = True, threads: int | None = None
) -> argparse._ArgumentGroup:
    """``--device`` (checked: a device this machine lacks is named as such; the namespace
    holds its name), ``--threads`` (torch CPU threads; ``threads`` the default, ``None``:
    torch's) and ``--no_progress``."""
    group = parser.add_argument_group("runtime")
    if device:
        flag(
            group,
            "--device",
            default=None,
            help="torch device (cpu, cuda, cuda:1, mps). Default: cuda if available, else cpu",
        )
        parser.add_check(lambda args: setattr(args, "device", str(resolve_device(args.device))))
    default = "torch's own (all cores)" if threads is None else threads
    flag(
        group,
        "--threads",
        type=int,
        default=threads,
        at_least=1,
        help=f"torch CPU threads. Default: {default}",
    )
    flag(group, "--no_progress", action="store_true", help="hide the progress bars")
    return group


def release_run(accelerator: Any) -> None:
    """Drop everything ``accelerator`` holds of a finished run: what ``accelerator.prepare``
    returned (models, optimizers, schedulers, data loaders: accelerate's ``free_memory``, which
    also collects them) and the objects registered for checkpointing (an ``Unlearner`` with its
    teacher, a ``NonmemberStop``; accelerate has no call to unregister them, so its list is
    cleared).

    Why: the next run of the same process (a ``--prompts`` list's next job) starts with none of
    the last one's model, AdamW state or teacher in memory, and its checkpoints hold its own
    state only; and before ``accelerator.end_training()``, the process group then ends while
    nothing else holds it. A prepared DDP model collected only at interpreter exit takes gloo's
    worker threads down with the interpreter: "terminate called without an active exception",
    an intermittent SIGABRT after a run whose work was done (seen once in CI on two CPU
    processes)."""
    accelerator._custom_objects.clear()
    accelerator.free_memory()


def start_trackers(
    args: argparse.Namespace, project_dir: Path, project_name: str, config: dict[str, Any]
) -> Any | None:
    """An ``accelerate.Accelerator`` logging to ``args.report_to`` under
    ``project_dir / args.logging_dir`` (``ProjectConfiguration``), its trackers started with
    ``config`` as hyper-parameters (values that are not numbers, strings or booleans as
    strings); ``None`` without ``--report_to``. Log with ``accelerator.log(values, step=...)``
    and close with ``accelerator.end_training()``."""
    if getattr(args, "report_to", None) is None:
        return None
    from accelerate import Accelerator

    accelerator = Accelerator(**tracker_options(args, project_dir))
    accelerator.init_trackers(project_name, config=tracker_config(config))
    return accelerator


def tracker_options(args: argparse.Namespace, project_dir: Path) -> dict[str, Any]:
    """The ``accelerate.Accelerator`` keyword arguments of ``--report_to``: ``log_with`` and a
    ``ProjectConfiguration`` whose trackers write under ``project_dir / args.logging_dir``;
    ``{}`` without ``--report_to`` (an Accelerator built with them is the one it would be
    without the flags). For a command that builds its own Accelerator (``start_trackers``
    builds one for a command that has none)."""
    if getattr(args, "report_to", None) is None:
        return {}
    from accelerate.utils import ProjectConfiguration

    project = ProjectConfiguration(
        project_dir=str(project_dir), logging_dir=str(Path(project_dir) / args.logging_dir)
    )
    return {"log_with": args.report_to, "project_config": project}


def tracker_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` as trackers take hyper-parameters: numbers (finite), strings and booleans as
    they are, anything else (paths, lists, ``None``, infinities) as its ``str``."""
    return {
        key: value
        if isinstance(value, bool | int | str)
        or (isinstance(value, float) and math.isfinite(value))
        else str(value)
        for key, value in config.items()
    }


# ------------------------------------------------------------------ the digits commands' groups
# (examples/: pretrain, unlearn, sequential, study; the settings live in siss._digits)


def add_data_flags(parser: CommandParser, *, outlier_help: str) -> argparse._ArgumentGroup:
    """``--data``, ``--data_root`` and ``--outlier_image`` (``siss._digits.data``), checked:
    ``mnist`` and ``folder`` need an existing ``--data_root``; ``--outlier_image`` an existing
    file."""
    group = parser.add_argument_group("data")
    flag(
        group,
        "--data",
        choices=("sklearn", "mnist", "folder"),
        default="sklearn",
        help="training set: scikit-learn's digits, MNIST from a torchvision folder on disk "
        "(--data_root), or an image folder (--data_root)",
    )
    flag(
        group,
        "--data_root",
        type=Path,
        default=None,
        help="the MNIST or image folder of --data mnist/folder. Default: none (sklearn)",
    )
    flag(group, "--outlier_image", type=Path, default=None, help=outlier_help)

    def check(args: argparse.Namespace) -> None:
        if args.data != "sklearn":
            if args.data_root is None:
                raise ValueError(f"--data {args.data}: needs --data_root (the folder)")
            if not Path(args.data_root).is_dir():
                raise ValueError(f"--data_root {args.data_root}: no such folder")
        if args.outlier_image is not None and not Path(args.outlier_image).is_file():
            raise ValueError(f"--outlier_image {args.outlier_image}: no such file")

    parser.add_check(check)
    return group


def add_evaluation_flags(
    parser: CommandParser,
    *,
    eval_samples: int,
    samples_help: str = "samples of each full evaluation (before, after)",
    at_least: int = 1,
    sampler_flag: str = "--eval_sampler",
    precision: bool = True,
    nll: bool = True,
) -> argparse._ArgumentGroup:
    """The evaluation group: ``--eval_samples``, the sampler (``sampler_flag``) and
    ``--eval_steps`` (``None``: the process's, resolved once the checkpoint is known), with
    ``precision`` ``--eval_precision`` and with ``nll`` the NLL's ``--nll_probes`` and
    ``--nll_tolerance``."""
    from siss._digits import DEFAULT_EVAL_STEPS, PRECISIONS, SAMPLERS

    group = parser.add_argument_group("evaluation")
    flag(
        group,
        "--eval_samples",
        type=int,
        default=eval_samples,
        at_least=at_least,
        help=samples_help,
    )
    flag(
        group,
        sampler_flag,
        choices=SAMPLERS,
        default=None,
        help="sampler of the evaluations. DDPM checkpoints: ddpm (ancestral, the paper's; the "
        "default), ddim (eta 0) or dpm (DPM-Solver++ 2M; 2.5x faster at 20 steps, its IS-style "
        "score 1.4%% lower on the pretrained model than ddpm-50's: compare only runs with the "
        "same sampler). Flow checkpoints: euler (the scheduler's own steps; the default)",
    )
    flag(
        group,
        "--eval_steps",
        type=int,
        default=None,
        at_least=1,
        help=f"sampling steps of the evaluations. Default: {DEFAULT_EVAL_STEPS['ddpm']} for "
        f"DDPM, {DEFAULT_EVAL_STEPS['flow']} for flow",
    )
    if precision:
        flag(
            group,
            "--eval_precision",
            choices=PRECISIONS,
            default="fp32",
            help="network precision of the evaluations' sampling: bf16 (torch.autocast) is "
            "2.3x faster on a CPU with AMX and moves the samples' pixels by ~1e-3 (median; "
            "study.py's precision_check.json); the NLL is always float32",
        )
    if nll:
        flag(
            group,
            "--nll_probes",
            type=int,
            default=4,
            at_least=1,
            help="Hutchinson probes of each NLL (of the outlier, of each shape)",
        )
        flag(
            group,
            "--nll_tolerance",
            type=float,
            default=1e-5,
            above=0,
            help="ODE rtol = atol of the NLL",
        )
    return group


def add_tracking_flags(group: Container, *, eval_every: int) -> None:
    """``--eval_every`` and ``--track_samples``: the in-run outlier-rate tracking."""
    flag(
        group,
        "--eval_every",
        type=int,
        default=eval_every,
        at_least=0,
        help="track the outlier rate every this many steps; 0: never",
    )
    flag(
        group,
        "--track_samples",
        type=int,
        default=500,
        at_least=1,
        help="samples of each in-run outlier-rate tracking",
    )


AUDIT_CHECKS = ("generation", "reconstruction", "membership")
"""``--audit``'s default checks: those that separate pretrained from retrain in seconds to about
a minute each on a CPU (docs/audit.md); the likelihood check alone takes ~3 minutes a model."""


def add_audit_flags(
    parser: CommandParser, *, audit_help: str, description: str | None = None, inherit: bool = False
) -> argparse._ArgumentGroup:
    """``--audit`` (``audit_help``) and its settings: the checks, the generation check's samples,
    the sampling steps, the T-shirt variants and per-check options. ``inherit``: every setting
    defaults to ``None``, the unlearning command's default (the study passes on what is set)."""
    from siss.audit import ALL_CHECKS

    group = parser.add_argument_group("audit", description)
    flag(group, "--audit", action="store_true", help=audit_help)

    def default(value: Any) -> Any:
        return None if inherit else value

    suffix = ". Default: unlearn.py's" if inherit else ""
    flag(
        group,
        "--audit_checks",
        nargs="+",
        choices=[c for c in ALL_CHECKS if c != "memorization"],
        default=default(list(AUDIT_CHECKS)),
        metavar="CHECK",
        help=f"checks of --audit, from %(choices)s (likelihood: ~3 min a model){suffix}",
    )
    for name, value, text in (
        ("--audit_samples", 1000, "samples of the generation check"),
        ("--audit_steps", 50, "DDIM steps of the audit's sampling"),
        (
            "--audit_references",
            128,
            "T-shirt variants (non-members); fewer than 104 leave some verdicts undecided",
        ),
    ):
        flag(group, name, type=int, default=default(value), at_least=1, help=text + suffix)
    flag(
        group,
        "--audit_option",
        action="append",
        default=[],
        metavar="CHECK.KEY=VALUE",
        help="a per-check option of siss.audit.audit, VALUE as JSON (e.g. likelihood.repeats=8)",
    )
    return group


def add_recipe_flags(
    parser: CommandParser,
    *,
    max_train_steps: int,
    helps: dict[str, str],
    ema: bool = True,
    old: dict[str, tuple[str, ...]] | None = None,
) -> None:
    """The recipe's flags (``siss.UnlearningConfig``: method, λ, superfactor or ratio, keep
    target and balancer, timesteps, min-SNR-γ, with ``ema`` the EMA) and the training group at
    the digits commands' defaults (``helps`` and ``old``: the command's, as
    ``add_training_flags`` takes them)."""
    from siss._cli.recipe import add_method_flags
    from siss.recipe import LR_SCHEDULERS

    recipe = parser.add_argument_group("recipe")
    add_method_flags(recipe)
    flag(
        recipe,
        "--timesteps",
        type=int,
        nargs="*",
        default=None,
        help="fixed t, or a 'low high' window of grid indices. Default: uniform over the "
        "schedule (flow: index 0 is the noisiest, as in diffusers)",
    )
    flag(
        recipe,
        "--snr_gamma",
        type=float,
        default=None,
        help="min-SNR-γ weighting of each row's loss, min(SNR, γ)/SNR for epsilon prediction "
        "(diffusers' --snr_gamma; 5 is its recommended value): tempers the least noisy rows, "
        "whose targets grow as 1/σ in ReTrack's redirect term. Not with the teacher keep target "
        "unless the model was pretrained with the same weighting (it warns). Default: no weighting",
    )
    if ema:
        flag(
            recipe,
            "--ema_decay",
            type=float,
            default=0.0,
            help="largest decay of an EMA of the fine-tuned weights (diffusers' EMAModel, warmup "
            "power --ema_power); the EMA weights are evaluated and saved. 0: no EMA (raw "
            "weights)",
        )
        flag(
            recipe,
            "--ema_power",
            type=float,
            default=0.75,
            help="EMA warmup: decay 1 - (1 + step)^-power, capped at --ema_decay (pretrain.py's)",
        )
    add_training_flags(
        parser,
        max_train_steps=max_train_steps,
        train_batch_size=64,
        learning_rate=5e-5,
        lr_scheduler=("cosine", LR_SCHEDULERS),
        lr_warmup_steps=0,
        max_grad_norm=1.0,
        seed=0,
        helps=helps,
        old=old,
    )


def check_timesteps(args: argparse.Namespace) -> None:
    """``--timesteps`` takes one value (a fixed grid index) or two (a window)."""
    if args.timesteps is not None and len(args.timesteps) not in (1, 2):
        values = " ".join(map(str, args.timesteps))
        raise ValueError(f"--timesteps {values}: takes one value (fixed) or two (a window)")
