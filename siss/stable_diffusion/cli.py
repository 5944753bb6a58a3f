"""Remove a memorized training image from a Stable Diffusion model with SISS, end to end.

Stable Diffusion v1.4 reproduces some LAION training images almost verbatim for their captions
(Carlini et al., 2023; Webster, 2023). This command runs the paper's Section 5.3 experiment on
any diffusers text-to-image pipeline (SD 1.x/2.x, SDXL, SD3; a hub id or a local folder). It
**generates** ``--num-images`` images for the training prompt, seeded per image and resumable,
keeping each image's final latent; **splits** them into the memorized copies (A) and the rest
(X \\ A), by similarity to ``--reference-image`` when one is given and otherwise by the paper's
2-means rule, saving the rule in ``split.json`` and a grid of each side; **unlearns** A with SISS
(λ = 0.5, the paper's NormBalancer rule; ``--method`` picks any method of ``siss.registry``) on
those latents with the prompt held fixed, through a PEFT LoRA (default) or the full UNet, under
``accelerate`` (any number of processes, mixed precision, gradient accumulation, gradient
checkpointing, ``save_state`` checkpoints and ``--resume``); and **verifies** before, every
``--verify-every`` steps and at the end, on seeds never used for training: the memorized
fraction for the training and the original prompt with Clopper-Pearson intervals, Wen et al.'s
noise-magnitude score, and CLIP-IQA and CLIP score when ``--clip-model`` names a local CLIP
folder. ``--prompts FILE`` does all of it for every prompt of a list (plain text, JSONL, Wen et
al.'s ``sdv1_500_memorized.jsonl`` or Webster's ground-truth parquet) and writes one summary
table. ``python -m siss.stable_diffusion`` is the same command. Tutorial: docs/stable_diffusion.md.

    siss-stable-diffusion --model CompVis/stable-diffusion-v1-4 \\
        --prompt "Mothers influence on her young hippo" \\
        --train-prompt "Mothers influence on ''her young hippo" --out outputs/sd/hippo
    siss-stable-diffusion split --tightness 0.3 ...   # one stage, same flags
    accelerate launch --num_processes 4 -m siss.stable_diffusion --model ... --out ...
    siss-stable-diffusion --prompts sdv1_500_memorized.jsonl --model ... --out ...
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from siss._cli import DefaultsHelpFormatter, add_keep_target_flags, resolve_device
from siss._files import write_atomically
from siss._optional import needs
from siss.registry import METHODS
from siss.stable_diffusion.files import (
    MEMORIZED_TYPES,
    Job,
    check_out,
    checkpoints,
    prepare_out,
    read_json,
    read_prompt_list,
    write_json,
)
from siss.stable_diffusion.generate import generate, load_generated
from siss.stable_diffusion.pipeline import (
    LORA_TARGETS,
    check_lora_targets,
    denoiser_of,
    image_size,
    load_pipeline,
    mixed_precision_of,
    resolve_dtype,
)
from siss.stable_diffusion.split import (
    StopJob,
    check_threshold_given,
    load_reference,
    split_stage,
)
from siss.stable_diffusion.unlearn import load_unlearned, recipe_config, unlearn
from siss.stable_diffusion.verify import Verifier, finish

COMMAND = "siss-stable-diffusion"
STAGES = ("run", "generate", "split", "unlearn", "verify")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, DefaultsHelpFormatter):
    """The module docstring's examples kept as written, and every flag's real default shown."""


def build_parser() -> argparse.ArgumentParser:
    """The command's flags, one group per stage; ``--help`` shows the module docstring."""
    # The installed command or `python -m siss.stable_diffusion`, whichever was run.
    command = Path(sys.argv[0]).name
    p = argparse.ArgumentParser(
        prog=command if command == COMMAND else "python -m siss.stable_diffusion",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "stage",
        nargs="?",
        choices=STAGES,
        default="run",
        help="run: all stages (default); generate: the images; split: memorized vs not; "
        "unlearn: fine-tune with verification before, during and after; verify: measure the "
        "model in --out (the unlearned one once saved, else the original) again",
    )
    add_io_flags(p.add_argument_group("model, prompts, output"))
    add_generate_flags(p.add_argument_group("1. generate"))
    add_split_flags(p.add_argument_group("2. split"))
    add_unlearn_flags(p.add_argument_group("3. unlearn"))
    add_verify_flags(p.add_argument_group("4. verify"))
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The flags of ``argv`` (default ``sys.argv[1:]``), every one checked (``check_args``)
    before anything is loaded: a bad one exits with status 2, naming it."""
    p = build_parser()
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def add_io_flags(io: argparse._ArgumentGroup) -> None:
    """The model, the prompt (or ``--prompts`` list), ``--out``, seed, dtype and device."""
    io.add_argument(
        "--model",
        required=True,
        help="a diffusers text-to-image pipeline: a local folder or a hub id "
        "(CompVis/stable-diffusion-v1-4, stable-diffusion-v1-5/stable-diffusion-v1-5, ...)",
    )
    io.add_argument("--prompt", help="the memorized (original) prompt")
    io.add_argument(
        "--train-prompt",
        help="the prompt the images are generated and the model fine-tuned with: the paper's "
        "modified, partially memorized prompt (default: --prompt)",
    )
    io.add_argument(
        "--prompts",
        type=Path,
        help="a list of prompts, each run in its own subfolder of --out, with one summary "
        "table: .txt (one prompt a line), .jsonl (keys prompt or caption, optional "
        "train_prompt and reference_image, a path relative to the file), Wen et al.'s "
        "sdv1_500_memorized.jsonl (caption, index, url), or Webster's ground-truth .parquet "
        "(caption, url, overfit_type; needs pyarrow)",
    )
    io.add_argument(
        "--overfit-types",
        nargs="+",
        default=list(MEMORIZED_TYPES),
        metavar="TYPE",
        help="Webster parquet: the overfit_type rows to run (MV matching, RV retrieval, TV "
        "template verbatim; N, not memorized, only when named)",
    )
    io.add_argument("--out", type=Path, required=True, help="output folder (created)")
    io.add_argument("--seed", type=int, default=0, help="seed of everything; image i: seed + i")
    io.add_argument(
        "--dtype",
        choices=("auto", "float32", "float16", "bfloat16"),
        default="auto",
        help="dtype of the pipeline (auto: bfloat16 on a GPU that has it, else float16 on "
        "CUDA, float32 on the CPU); a full fine-tune keeps float32 master weights of the UNet",
    )
    io.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="cpu forces the CPU; default: accelerate's device of each process",
    )
    io.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    io.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_generate_flags(gen: argparse._ArgumentGroup) -> None:
    """Stage 1: how many images, and how they are sampled (the paper's 50-step DDIM)."""
    gen.add_argument("--num-images", type=int, default=128, help="images generated (paper: 128)")
    gen.add_argument("--gen-batch-size", type=int, default=8, help="images per pipeline call")
    gen.add_argument(
        "--sample-steps", type=int, default=50, help="sampling steps (paper: 50-step DDIM)"
    )
    gen.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance")
    gen.add_argument(
        "--sampler",
        choices=("ddim", "pipeline"),
        default="ddim",
        help="ddim (the paper's) or the scheduler the pipeline ships",
    )


def add_split_flags(split: argparse._ArgumentGroup) -> None:
    """Stage 2: the rule that splits the images into copies and the rest."""
    split.add_argument(
        "--reference-image",
        type=Path,
        help="the training image to remove, at the generated size: an image is memorized when "
        "its features are within --threshold of it (without it: the paper's 2-means rule)",
    )
    split.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="reference rule: a Euclidean feature distance below which an image is a copy "
        "(default with pixel features: siss.metrics.default_threshold, the paper's L2 < 10 at "
        "28x28 rescaled, on pixels in [0, 1]), or with --metric cosine a similarity above which "
        "it is; required with --features vae or an encoder",
    )
    split.add_argument(
        "--metric",
        choices=("euclidean", "cosine"),
        default=None,
        help="reference rule's comparison (default: cosine for an image encoder, else euclidean)",
    )
    split.add_argument(
        "--tightness",
        type=float,
        default=0.25,
        help="2-means rule: the tight cluster is memorized when its spread / the other images' "
        "RMS distance to its centre is at most this (siss.audit.split; a single-mode population "
        "gives >= 0.277). Raise it if a memorized prompt is reported as not memorized",
    )
    split.add_argument(
        "--features",
        default="pixels",
        help="image features of the split: pixels, vae (the pipeline's VAE latents) or a local "
        "folder of a transformers image encoder (CLIP vision, DINOv2)",
    )


def add_unlearn_flags(train: argparse._ArgumentGroup) -> None:
    """Stage 3: the recipe, the optimizer, the LoRA (or ``--full``), checkpoints."""
    train.add_argument("--method", choices=METHODS, default="siss", help="unlearning method")
    train.add_argument("--lam", type=float, default=0.5, help="SISS mixture weight λ")
    train.add_argument(
        "--superfactor",
        type=float,
        default=None,
        help="fixed superfactor s (no balancer); default: NormBalancer with --ratio (§5)",
    )
    train.add_argument(
        "--ratio", type=float, default=0.1, help="forget / keep gradient norm of the balancer"
    )
    # The teacher is the library's recipe, not yet measured on SD pipelines: noise by default.
    add_keep_target_flags(train, keep_target="noise")
    train.add_argument("--steps", type=int, default=35, help="optimizer steps (paper: 35)")
    train.add_argument(
        "--batch-size", type=int, default=16, help="global batch per optimizer step (paper: 16)"
    )
    train.add_argument(
        "--micro-batch-size",
        type=int,
        default=4,
        help="rows per process per forward; gradient accumulation steps = "
        "batch-size / (micro-batch-size x processes)",
    )
    train.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate (paper: 1e-5)")
    train.add_argument("--weight-decay", type=float, default=1e-2, help="AdamW weight decay")
    train.add_argument("--max-grad-norm", type=float, default=1.0, help="0: no clipping")
    train.add_argument(
        "--timesteps",
        type=int,
        nargs="+",
        default=None,
        help="fixed t (the authors' SD runs: 999) or a 'low high' window; default uniform",
    )
    train.add_argument(
        "--mixed-precision",
        choices=("auto", "no", "fp16", "bf16"),
        default="auto",
        help="accelerate's mixed precision (auto: follows --dtype)",
    )
    train.add_argument(
        "--lora-rank", type=int, default=None, help="LoRA rank (default 4); see --full"
    )
    train.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default rank)")
    train.add_argument(
        "--lora-targets",
        nargs="+",
        default=list(LORA_TARGETS),
        metavar="NAME",
        help="module names the LoRA wraps (diffusers' LoRA script's attention projections)",
    )
    train.add_argument("--full", action="store_true", help="fine-tune the whole UNet, no LoRA")
    train.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute activations: less memory"
    )
    train.add_argument("--compile", action="store_true", help="torch.compile the denoiser")
    train.add_argument(
        "--checkpoint-every", type=int, default=10, help="accelerate save_state period; 0: never"
    )
    train.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in --out"
    )
    train.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="stop (as if interrupted) after this many steps; for testing --resume",
    )


def add_verify_flags(check: argparse._ArgumentGroup) -> None:
    """Stage 4: how often and on how many images the model is measured, and its quality."""
    check.add_argument(
        "--verify-every",
        type=int,
        default=0,
        help="verification period in steps (0: before and after only)",
    )
    check.add_argument(
        "--verify-images",
        type=int,
        default=16,
        help="generations per prompt and verification (paper: 16), on seeds after the "
        "training images' (seed + num-images + i), the same at every verification",
    )
    check.add_argument(
        "--noise-generations",
        type=int,
        default=4,
        help="generations of Wen et al.'s noise-magnitude score (theirs: 4); 0: not measured",
    )
    check.add_argument(
        "--noise-steps",
        type=int,
        default=None,
        help="first sampling steps the noise-magnitude score averages (default: all)",
    )
    check.add_argument(
        "--clip-model",
        default=None,
        help="a local CLIP folder (transformers CLIPModel + CLIPProcessor) for CLIP-IQA and "
        "CLIP score, or clip_iqa for torchmetrics' own weights (needs piq); without it quality "
        "is 'not measured' and success 'not determined'",
    )
    check.add_argument(
        "--quality-floor",
        type=float,
        default=0.35,
        help="success needs CLIP-IQA at least this at every verification (paper: 0.35)",
    )


def check_launcher(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
    """Refuse a launch that asked for several processes and started one.

    ``accelerate launch --num_processes N`` (N > 1) without ``--multi_gpu`` — on the CPU, or
    with one GPU — uses accelerate's simple launcher: it sets ``MASTER_ADDR`` for the N
    processes and then starts a single one without ``WORLD_SIZE``, which would run alone and
    report ``processes: 1``. That signature is detected here; ``torchrun`` and accelerate's
    multi-process launchers set ``WORLD_SIZE``.
    """
    asked = "ACCELERATE_USE_CPU" in environ and "MASTER_ADDR" in environ
    if asked and "WORLD_SIZE" not in environ:
        parser.error(
            "accelerate launch was asked for several processes but started one (its simple "
            "launcher, used without --multi_gpu, runs a single process). On the CPU run "
            "`torchrun --nproc_per_node N -m siss.stable_diffusion ...`; on N GPUs "
            "`accelerate launch --multi_gpu --num_processes N -m siss.stable_diffusion ...`"
        )


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Errors naming the flag, before anything is loaded."""
    check_launcher(parser, os.environ)
    if (args.prompt is None) == (args.prompts is None):
        parser.error("give --prompt or --prompts (one of them)")
    if args.prompts is not None and (args.train_prompt or args.reference_image):
        parser.error("--train-prompt and --reference-image go into the --prompts file per prompt")
    if args.prompts is not None and not args.prompts.is_file():
        parser.error(f"--prompts: no file {args.prompts}")
    if args.full and args.lora_rank is not None:
        parser.error("--full trains the whole UNet; --lora-rank is for a LoRA: give one of them")
    if not args.full:
        args.lora_rank = 4 if args.lora_rank is None else args.lora_rank
        if args.lora_rank < 1:
            parser.error(f"--lora-rank must be >= 1, got {args.lora_rank}")
        args.lora_alpha = float(args.lora_rank if args.lora_alpha is None else args.lora_alpha)
    for flag in ("num_images", "gen_batch_size", "sample_steps", "steps", "batch_size"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.micro_batch_size < 1 or args.batch_size % args.micro_batch_size:
        parser.error(
            f"--batch-size ({args.batch_size}) must be a multiple of --micro-batch-size "
            f"({args.micro_batch_size})"
        )
    if args.verify_images < 1:
        parser.error("--verify-images must be >= 1")
    if args.noise_generations < 0 or args.verify_every < 0 or args.checkpoint_every < 0:
        parser.error("--noise-generations, --verify-every and --checkpoint-every must be >= 0")
    if args.noise_steps is not None and not 1 <= args.noise_steps <= args.sample_steps:
        parser.error(f"--noise-steps must be in [1, --sample-steps={args.sample_steps}]")
    if args.timesteps is not None and len(args.timesteps) not in (1, 2):
        parser.error("--timesteps takes one value (fixed) or two (a window)")
    try:
        recipe_config(args)
        if args.device == "cuda":  # accelerate would fall back to the CPU without a word
            resolve_device(args.device)
    except ValueError as error:
        parser.error(str(error))
    if args.reference_image is not None and not args.reference_image.is_file():
        parser.error(f"--reference-image: no file {args.reference_image}")
    if args.clip_model not in (None, "clip_iqa") and not Path(args.clip_model).is_dir():
        parser.error(f"--clip-model: no folder {args.clip_model} (a local CLIP model)")
    if args.features not in ("pixels", "vae") and not Path(args.features).is_dir():
        parser.error(f"--features: pixels, vae or a local image-encoder folder; no {args.features}")
    if args.metric is None:
        args.metric = "euclidean" if args.features in ("pixels", "vae") else "cosine"
    if args.prompts is None and args.threshold is not None and args.reference_image is None:
        parser.error("--threshold is the reference rule's: give --reference-image too")
    if args.reference_image is not None:
        check_threshold_given(args, "--reference-image")
    if not 0 < args.tightness < 1:
        parser.error(f"--tightness must be in (0, 1), got {args.tightness}")
    local = Path(args.model).expanduser()
    if not local.exists() and not re.fullmatch(r"[\w.-]+/[\w.-]+", args.model):
        parser.error(f"--model: no folder {args.model} (and not a hub id such as owner/name)")
    if local.is_dir() and not (local / "model_index.json").is_file():
        parser.error(f"--model: {args.model} has no model_index.json: not a diffusers pipeline")


def run_job(args: argparse.Namespace, job: Job, pipe: Any, accelerator: Any) -> dict[str, Any]:
    """Every stage of ``args.stage`` for one prompt; the metrics (main process)."""
    prepare_out(args, job, accelerator)
    seeds = [args.seed + i for i in range(args.num_images)]
    if args.stage in ("run", "generate"):
        generate(pipe, job.train_prompt, seeds, args, accelerator, store=job.out)
        if args.stage == "generate":
            return {"stage": "generate", "images": args.num_images}
    images, latents = load_generated(job.out, args.num_images)
    split, detector = split_stage(args, job, pipe, accelerator, images)
    if args.stage == "split":
        return {"stage": "split", **read_json(job.out / "split.json")["counts"]}
    verifier = Verifier(args, job, pipe, accelerator, detector)
    if args.stage == "verify":
        loaded = load_unlearned(args, pipe, job.out)
        entry = verifier(-1, tag="verify")
        if accelerator.is_main_process:
            entry["weights"] = loaded
            write_json(job.out / "verify.json", entry)
        return entry
    if (job.out / "metrics.json").is_file() and not checkpoints(job.out):
        return read_json(job.out / "metrics.json")  # finished before: nothing to do
    try:
        result = unlearn(args, job, pipe, accelerator, latents, split, verifier)
    finally:
        accelerator.free_memory()  # forget the prepared model and optimizer (prompt lists)
    if result is None or not accelerator.is_main_process:
        return {"stopped": True} if result is None else {}
    metrics = finish(args, job, result, split)
    for old in checkpoints(job.out):  # the run is complete: its weights are saved
        shutil.rmtree(old)
    return metrics


def describe(row: dict[str, Any] | None) -> str:
    """A verification's count for one prompt: ``memorized/total [low, high]`` (95% CI)."""
    if row is None:
        return "-"
    low, high = row["ci95"]
    return f"{row['memorized']}/{row['total']} [{low:.2f}, {high:.2f}]"


def number(value: Any, digits: int = 3) -> str:
    """A measurement to ``digits`` decimals, or ``n/m`` (not measured: a reason string)."""
    return f"{value:.{digits}f}" if isinstance(value, int | float) else "n/m"


def report_lines(metrics: dict[str, Any]) -> list[str]:
    """The report printed after a ``--prompt`` run: before and after per prompt, the verdict."""
    before, after = metrics["before"], metrics["after"]
    lines = [f"{'':10}{'memorized [95% CI]':>24}{'noise score':>14}{'CLIP-IQA':>10}"]
    for which in ("train", "original"):
        if which not in before:
            continue
        for label, entry in (("before", before), ("after", after)):
            row = entry[which]
            lines.append(
                f"{which[:5] + ' ' + label:10}{describe(row):>24}"
                f"{number(row.get('noise_score'), 2):>14}{number(row.get('clip_iqa')):>10}"
            )
    lines.append(metrics["verdict"])
    if metrics.get("generalization"):
        lines.append(f"original prompt: {metrics['generalization']}")
    return lines


def summary_table(rows: list[dict[str, Any]]) -> str:
    """``summary.md`` of a ``--prompts`` run: one Markdown row per prompt, skipped ones with
    the reason."""
    header = (
        "| # | prompt | train prompt | split A / N | memorized train: before → after | "
        "original: before → after | noise score: before → after | CLIP-IQA: before → after "
        "| result |"
    )
    lines = [header, "|" + "---|" * 9]
    for i, row in enumerate(rows):
        metrics = row.get("metrics") or {}
        if not metrics.get("before"):
            lines.append(
                f"| {i} | {row['prompt']} | {row['train_prompt']} | | | | | | {row['status']} |"
            )
            continue
        before, after = metrics["before"], metrics["after"]
        split = metrics["split"]

        def pair(which: str, key: str | None = None, before=before, after=after) -> str:
            if which not in before:
                return "-"
            if key is None:
                return f"{describe(before[which])} → {describe(after[which])}"
            return f"{number(before[which].get(key), 2)} → {number(after[which].get(key), 2)}"

        lines.append(
            f"| {i} | {row['prompt']} | {row['train_prompt']} | "
            f"{split['memorized']} / {split['memorized'] + split['not_memorized']} | "
            f"{pair('train')} | {pair('original')} | {pair('train', 'noise_score')} | "
            f"{pair('train', 'clip_iqa')} | {metrics['verdict']} |"
        )
    return "\n".join(lines) + "\n"


def jobs_of(args: argparse.Namespace) -> list[Job]:
    """One job per prompt: the ``--prompts`` list's (a subfolder of ``--out`` each), or the
    one of ``--prompt``."""
    if args.prompts is not None:
        return read_prompt_list(args.prompts, args.out, args.overfit_types)
    train_prompt = args.train_prompt or args.prompt
    return [Job(args.prompt, train_prompt, args.reference_image, args.out, {})]


def start_accelerator(args: argparse.Namespace, jobs: list[Job]) -> tuple[Any, torch.dtype]:
    """accelerate's ``Accelerator`` for the flags, and the pipeline's dtype.

    Before anything is loaded: the batch sizes are checked against the number of processes, and
    every job's ``--out`` against what it holds (``check_out``). ``args.dtype`` and
    ``args.mixed_precision`` become what ``auto`` resolved to (``config.json`` records them).
    """
    with needs("siss-stable-diffusion"):
        from accelerate import Accelerator, PartialState

    state = PartialState(cpu=args.device == "cpu")
    device = state.device
    dtype = resolve_dtype(args.dtype, device)
    args.dtype = str(dtype).removeprefix("torch.")
    args.mixed_precision = mixed_precision_of(args, dtype)
    if args.micro_batch_size * state.num_processes > args.batch_size or args.batch_size % (
        args.micro_batch_size * state.num_processes
    ):
        raise SystemExit(
            f"--batch-size {args.batch_size} must be a multiple of --micro-batch-size "
            f"{args.micro_batch_size} x {state.num_processes} processes"
        )
    for job in jobs:
        check_out(args, job)  # another experiment's folder: refused before anything is loaded
    accumulation = args.batch_size // (args.micro_batch_size * state.num_processes)
    accelerator = Accelerator(
        cpu=device.type == "cpu",
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=accumulation,
    )
    return accelerator, dtype


def check_pipeline(args: argparse.Namespace, pipe: Any, jobs: list[Job]) -> None:
    """What the loaded pipeline must allow, checked before any image is generated: a LoRA on
    its denoiser, and each reference image at the size it generates."""
    _, denoiser = denoiser_of(pipe)
    check_lora_targets(denoiser, args)
    size = image_size(pipe)
    for job in jobs:
        if job.reference is not None:
            check_threshold_given(args, f"a reference image ({job.reference})")
            load_reference(job.reference, size)  # the size is checked before any generation


def run_prompt(args: argparse.Namespace, job: Job, pipe: Any, accelerator: Any) -> dict[str, Any]:
    """One job's stages; its row of the summary. A ``StopJob`` ends the command for ``--prompt``
    and is recorded as skipped for ``--prompts`` (the list goes on)."""
    try:
        metrics = run_job(args, job, pipe, accelerator)
        status = metrics.get("verdict", "done") if metrics else "done"
    except StopJob as stop:
        if args.prompts is None:
            raise SystemExit(str(stop)) from None
        metrics, status = {}, f"skipped: {stop}"
        if accelerator.is_main_process:
            print(f"{job.out.name}: {stop}", file=sys.stderr)
    if accelerator.is_main_process and metrics.get("before") and args.prompts is None:
        print("\n".join(report_lines(metrics)))
        print(f"outputs in {job.out}")
    return {"prompt": job.prompt, "train_prompt": job.train_prompt, "status": status,
            "out": str(job.out), "metrics": metrics}  # fmt: skip


def run_command(argv: Sequence[str] | None = None) -> dict[str, Any] | list[dict[str, Any]]:
    """Everything the command line ``argv`` asks for; on the main process the metrics of the
    ``--prompt`` (``{"stopped": True}`` after ``--stop-after``), or with ``--prompts`` the
    summary rows (also written to ``summary.json`` and ``summary.md``)."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    jobs = jobs_of(args)
    accelerator, dtype = start_accelerator(args, jobs)
    pipe = load_pipeline(args, accelerator.device, dtype)
    check_pipeline(args, pipe, jobs)
    rows = []
    for number_, job in enumerate(jobs):
        if number_:
            pipe = load_pipeline(args, accelerator.device, dtype)  # the original weights again
        rows.append(run_prompt(args, job, pipe, accelerator))
    if args.prompts is not None and accelerator.is_main_process:
        write_json(args.out / "summary.json", rows)
        table = summary_table(rows)
        write_atomically(args.out / "summary.md", table)
        print(table)
    accelerator.wait_for_everyone()
    if accelerator.num_processes > 1:
        accelerator.end_training()
    return rows if args.prompts is not None else rows[0]["metrics"]


def main(argv: Sequence[str] | None = None) -> int:
    """The installed command ``siss-stable-diffusion`` (and ``python -m siss.stable_diffusion``):
    ``run_command``, then exit status 0; a bad flag exits with 2 (argparse), a job that cannot
    go on (an unusable model, an empty split, another experiment's ``--out``) with its message."""
    run_command(argv)
    return 0
