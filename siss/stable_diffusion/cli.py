"""Remove a memorized training image from a Stable Diffusion model with SISS, end to end.

Stable Diffusion v1.4 reproduces some LAION training images almost verbatim for their captions
(Carlini et al., 2023; Webster, 2023). This command runs the paper's Section 5.3 experiment on
any diffusers text-to-image pipeline (SD 1.x/2.x, SDXL, SD3, Flux; a hub id or a local folder). It
**generates** ``--num_images`` images for the training prompt, seeded per image and resumable,
keeping each image's final latent; **splits** them into the memorized copies (A) and the rest
(X \\ A) by one rule, the distance to the memorized image (``--reference_image``, or the
centre of the paper's 2-means group) below the middle of the gap the generations show, saving
it in ``split.json`` with a grid of each side; **unlearns** A with SISS (λ = 0.5, the paper's
noise keep target and NormBalancer; ``--method`` picks any method of ``siss.registry``) on
those latents with the prompt held fixed, through a PEFT LoRA (default) or the full denoiser, under
``accelerate`` (processes, mixed precision, gradient accumulation and checkpointing,
``save_state`` checkpoints and ``--resume_from_checkpoint latest``), **until the image is gone**:
every ``--verify_every`` steps a check counts the copies among fresh generations and the drift
of the ``--keep_prompts`` from their images before, stopping when no copy is left or when a
keep prompt leaves its band; and **verifies** before and after, on seeds never used for training
or stopping: the memorized fraction for the training and the original prompt with
Clopper-Pearson intervals, each keep prompt's drift against its band, Wen et al.'s
noise-magnitude score, and CLIP-IQA and CLIP score when ``--clip_model`` names a local CLIP
folder. ``--prompts FILE`` does all of it for every prompt of a list (plain text, JSONL, Wen et
al.'s ``sdv1_500_memorized.jsonl`` or Webster's ground-truth parquet) and writes one summary
table. ``--report_to tensorboard`` (or ``wandb``) logs each step's loss terms, balancer
statistics and learning rate, each check's copies and keep drift, and the verifications;
``--checkpoints_total_limit N`` keeps the newest N checkpoints, also once the run has finished.
``python -m siss.stable_diffusion`` is the same command. Tutorial: docs/stable_diffusion.md.

    siss-stable-diffusion --pretrained_model_name_or_path CompVis/stable-diffusion-v1-4 \\
        --prompt "Mothers influence on her young hippo" \\
        --train_prompt "Mothers influence on ''her young hippo" --output_dir outputs/sd/hippo
    siss-stable-diffusion split --tightness 0.3 ...   # one stage, same flags
    accelerate launch --multi_gpu --num_processes 4 -m siss.stable_diffusion \\
        --pretrained_model_name_or_path ... --output_dir ...
    siss-stable-diffusion --prompts sdv1_500_memorized.jsonl \\
        --pretrained_model_name_or_path ... --output_dir ...
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from siss._cli import (
    CommandParser,
    DefaultsHelpFormatter,
    FlagError,
    add_checkpoints_total_limit_flag,
    add_logging_flags,
    add_method_flags,
    add_nonmember_flags,
    add_output_flag,
    exit_on_flag_error,
    flag,
    resolve_device,
    resolve_stop_rule,
    tracker_options,
)
from siss._files import write_atomically
from siss._optional import needs
from siss.stable_diffusion.files import (
    MEMORIZED_TYPES,
    Job,
    check_out,
    prepare_out,
    read_json,
    read_prompt_list,
    remove_checkpoints,
    write_json,
)
from siss.stable_diffusion.generate import generate, load_generated
from siss.stable_diffusion.pipeline import (
    check_lora_targets,
    denoiser_of,
    image_size,
    load_pipeline,
    mixed_precision_of,
    resolve_dtype,
    resolve_lora_targets,
)
from siss.stable_diffusion.split import (
    StopJob,
    load_reference,
    read_reference,
    split_stage,
)
from siss.stable_diffusion.unlearn import load_unlearned, recipe_config, unlearn
from siss.stable_diffusion.verify import Verifier, finish
from siss.stable_diffusion.watch import (
    DEFAULT_MAX_STEPS,
    DEFAULT_STOP_IMAGES,
    GENERIC_KEEP_PROMPTS,
    KEEP_BAND,
)

COMMAND = "siss-stable-diffusion"
STAGES = ("run", "generate", "split", "unlearn", "verify")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, DefaultsHelpFormatter):
    """The module docstring's examples kept as written, and every flag's real default shown."""


def build_parser() -> CommandParser:
    """The command's flags, one group per stage, and the shared ``--report_to`` group
    (``siss._cli.add_logging_flags``); ``--help`` shows the module docstring. A
    ``CommandParser``: the shared flags' checks run right after parsing, before ``check_args``."""
    # The installed command or `python -m siss.stable_diffusion`, whichever was run.
    command = Path(sys.argv[0]).name
    p = CommandParser(
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
        "model in --output_dir (the unlearned one once saved, else the original) again",
    )
    add_io_flags(p.add_argument_group("model, prompts, output"))
    add_generate_flags(p.add_argument_group("1. generate"))
    add_split_flags(p.add_argument_group("2. split"))
    add_unlearn_flags(p.add_argument_group("3. unlearn"))
    add_verify_flags(p.add_argument_group("4. verify"))
    add_logging_flags(p)
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The flags of ``argv`` (default ``sys.argv[1:]``), every one checked (``check_args``)
    before anything is loaded: a bad one exits with status 2, naming it."""
    p = build_parser()
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def add_io_flags(io: argparse._ArgumentGroup) -> None:
    """The model, the prompt (or ``--prompts`` list), ``--output_dir``, seed, dtype and device."""
    flag(
        io,
        "--pretrained_model_name_or_path",
        old=("--model",),
        metavar="MODEL",
        help="a diffusers text-to-image pipeline: a local folder or a hub id "
        "(CompVis/stable-diffusion-v1-4, stable-diffusion-v1-5/stable-diffusion-v1-5, ...). "
        "Required",
    )
    flag(io, "--prompt", help="the memorized (original) prompt")
    flag(
        io,
        "--train_prompt",
        help="the prompt the images are generated and the model fine-tuned with: the paper's "
        "modified, partially memorized prompt (default: --prompt)",
    )
    flag(
        io,
        "--prompts",
        type=Path,
        help="a list of prompts, each run in its own subfolder of --output_dir, with one summary "
        "table: .txt (one prompt a line), .jsonl (keys prompt or caption, optional "
        "train_prompt and reference_image, a path relative to the file), Wen et al.'s "
        "sdv1_500_memorized.jsonl (caption, index, url), or Webster's ground-truth .parquet "
        "(caption, url, overfit_type; needs pyarrow)",
    )
    flag(
        io,
        "--overfit_types",
        nargs="+",
        default=list(MEMORIZED_TYPES),
        metavar="TYPE",
        help="Webster parquet: the overfit_type rows to run (MV matching, RV retrieval, TV "
        "template verbatim; N, not memorized, only when named)",
    )
    add_output_flag(io, default=None, help="output folder (created). Required", old=("--out",))
    flag(io, "--seed", type=int, default=0, help="seed of everything; image i: seed + i")
    flag(
        io,
        "--dtype",
        choices=("auto", "float32", "float16", "bfloat16"),
        default="auto",
        help="dtype of the pipeline (auto: bfloat16 on a GPU that has it, else float16 on "
        "CUDA, float32 on the CPU); a full fine-tune keeps float32 master weights of the UNet",
    )
    flag(
        io,
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="cpu forces the CPU; default: accelerate's device of each process",
    )
    flag(io, "--threads", type=int, default=None, at_least=1, help="torch CPU threads")
    flag(io, "--no_progress", action="store_true", help="no progress bars")


def add_generate_flags(gen: argparse._ArgumentGroup) -> None:
    """Stage 1: how many images, and how they are sampled (the paper's 50-step DDIM)."""
    flag(
        gen,
        "--num_images",
        type=int,
        default=128,
        at_least=2,
        help="images generated (paper: 128; the split needs two)",
    )
    flag(gen, "--gen_batch_size", type=int, default=8, help="images per pipeline call")
    flag(gen, "--sample_steps", type=int, default=50, help="sampling steps (paper: 50-step DDIM)")
    flag(
        gen,
        "--guidance_scale",
        type=float,
        default=7.5,
        at_least=0,
        help="classifier-free guidance",
    )
    flag(
        gen,
        "--resolution",
        type=int,
        nargs="+",
        default=None,
        metavar="PX",
        help="image height and width in pixels (one value: square); default: the pipeline's "
        "own (SD 1.x: 512, SDXL, SD3 and Flux: 1024)",
    )
    flag(
        gen,
        "--sampler",
        choices=("ddim", "pipeline"),
        default="ddim",
        help="ddim (the paper's) or the scheduler the pipeline ships",
    )


def add_split_flags(split: argparse._ArgumentGroup) -> None:
    """Stage 2: the rule that splits the images into copies and the rest."""
    flag(
        split,
        "--reference_image",
        type=Path,
        help="the training image to remove, at the generated size: the centre of the rule "
        "(an image is a copy when its features are near it); without it, the centre of the "
        "2-means memorized group",
    )
    flag(
        split,
        "--threshold",
        type=float,
        default=None,
        help="with --reference_image: decide by the distance to it alone, an image being a copy "
        "below this (a Euclidean feature distance; with --metric cosine a similarity above "
        "which it is). Default: the middle of the gap between the 2-means memorized group's "
        "distances to the centre and the other images' (split.json records it)",
    )
    flag(
        split,
        "--metric",
        choices=("euclidean", "cosine"),
        default=None,
        help="reference rule's comparison (default: cosine for an image encoder, else euclidean)",
    )
    flag(
        split,
        "--tightness",
        type=float,
        default=0.25,
        help="2-means rule: a memorized group exists when its spread / the other images' "
        "RMS distance to its centre is at most this (siss.audit.split; a single-mode population "
        "gives >= 0.277). Raise it if a memorized prompt is reported as not memorized",
    )
    flag(
        split,
        "--features",
        default="pixels",
        help="image features of the split: pixels, vae (the pipeline's VAE latents) or a local "
        "folder of a transformers image encoder (CLIP vision, DINOv2)",
    )


def add_unlearn_flags(train: argparse._ArgumentGroup) -> None:
    """Stage 3: the recipe, the optimizer, the LoRA (or ``--full``), checkpoints."""
    # The noise target: with the teacher the memorized mode stays where the copies are most of the
    # prompt's own distribution (docs/stable_diffusion.md, "How the defaults were chosen")
    add_method_flags(train, keep_target="noise")
    flag(
        train,
        "--max_train_steps",
        old=("--steps",),
        type=int,
        default=DEFAULT_MAX_STEPS,
        help="the cap on optimizer steps (--until gone usually stops before; paper: 35 fixed)",
    )
    flag(
        train,
        "--until",
        choices=("gone", "steps", "nonmember"),
        default="gone",
        help="gone: stop once --stop_checks checks in a row find no copy among fresh "
        "generations (or at the cap); steps: run all --max_train_steps; nonmember: stop at the "
        "first check where the copies' latents are denoised like the training prompt's "
        "non-copies held out as --stop_references (--stop_target; siss.stopping, "
        "siss.stable_diffusion.nonmember), the level a model that never saw the image reaches. "
        "Always a keep prompt leaving its band stops the run and puts back the last weights in "
        "band",
    )
    add_nonmember_flags(
        train,
        references=32,
        references_help="--until nonmember: non-copies of the training prompt held out of the "
        "keep set as the rule's references (at most a third of them)",
        every=None,
    )
    flag(
        train,
        "--train_batch_size",
        old=("--micro-batch-size", "--micro_batch_size"),
        type=int,
        default=4,
        help="rows per device and forward pass; one optimizer step takes train_batch_size x "
        "processes x gradient_accumulation_steps rows (defaults: 16, the paper's, on one "
        "process)",
    )
    flag(
        train,
        "--gradient_accumulation_steps",
        type=int,
        default=4,
        help="forward passes accumulated into one optimizer step",
    )
    # 0.1's global batch, hidden: start_accelerator converts it to accumulation steps
    train.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int,
                       default=None, help=argparse.SUPPRESS)  # fmt: skip
    flag(
        train,
        "--learning_rate",
        old=("--lr",),
        type=float,
        default=1e-5,
        help="AdamW learning rate (paper: 1e-5 for SD 1.4; tiny models take more, see the docs)",
    )
    flag(
        train,
        "--adam_weight_decay",
        old=("--weight-decay",),
        type=float,
        default=1e-2,
        help="AdamW weight decay",
    )
    flag(train, "--max_grad_norm", type=float, default=1.0, help="0: no clipping")
    flag(
        train,
        "--timesteps",
        type=int,
        nargs="+",
        default=None,
        help="fixed t (the authors' SD runs: 999) or a 'low high' window; default uniform",
    )
    flag(
        train,
        "--mixed_precision",
        choices=("auto", "no", "fp16", "bf16"),
        default="auto",
        help="accelerate's mixed precision (auto: follows --dtype)",
    )
    flag(
        train,
        "--rank",
        old=("--lora-rank", "--lora_rank"),
        type=int,
        default=None,
        help="LoRA rank (default 4); see --full",
    )
    flag(
        train,
        "--lora_alpha",
        type=float,
        default=None,
        above=0,
        help="LoRA alpha (default: the rank)",
    )
    flag(
        train,
        "--lora_targets",
        nargs="+",
        default=None,
        metavar="NAME",
        help="module names the LoRA wraps; default: those diffusers' LoRA training script of "
        "the pipeline's family wraps (SD 1.x/2.x, SDXL: to_q to_k to_v to_out.0; SD3: both "
        "attention streams; Flux: attention and feed-forwards)",
    )
    flag(train, "--full", action="store_true", help="fine-tune the whole denoiser, no LoRA")
    flag(
        train,
        "--gradient_checkpointing",
        action="store_true",
        help="recompute activations: less memory",
    )
    flag(train, "--compile", action="store_true", help="torch.compile the denoiser")
    flag(
        train,
        "--checkpointing_steps",
        old=("--checkpoint-every",),
        type=int,
        default=10,
        help="accelerate save_state period in steps; 0: never",
    )
    add_checkpoints_total_limit_flag(
        train,
        default=None,
        help="checkpoints kept in --output_dir/checkpoints: the oldest are deleted as new ones "
        "are saved, and the newest N stay once the run has finished. Default: only the newest "
        "while the run goes on, none once it has finished (its weights are saved)",
    )
    flag(
        train,
        "--resume_from_checkpoint",
        old=(("--resume", "latest"),),
        choices=("latest",),
        default=None,
        help="latest: continue from the newest checkpoint in --output_dir",
    )
    flag(
        train,
        "--stop_after",
        type=int,
        default=None,
        at_least=1,
        help="stop (as if interrupted) after this many steps; for testing a resume",
    )


def add_verify_flags(check: argparse._ArgumentGroup) -> None:
    """Stage 4 and the checks: how often and on how many images the model is measured."""
    flag(
        check,
        "--verify_images",
        type=int,
        default=16,
        help="generations per prompt of the verifications before and after (paper: 16), on "
        "seeds after the training images' (seed + num_images + i)",
    )
    flag(
        check,
        "--verify_every",
        type=int,
        default=10,
        help="steps between checks (copies on fresh seeds, the keep prompts' drift; "
        "siss.stable_diffusion.watch); 0: none, only the verifications before and after "
        "(and --until gone never stops early)",
    )
    flag(
        check,
        "--stop_images",
        type=int,
        default=DEFAULT_STOP_IMAGES,
        help="fresh generations of the training prompt a check looks at (new seeds every "
        "check; it stops at the first copy)",
    )
    flag(
        check,
        "--stop_checks",
        type=int,
        default=2,
        help="checks in a row without a copy that end an --until gone run",
    )
    flag(
        check,
        "--keep_prompts",
        nargs="*",
        default=list(GENERIC_KEEP_PROMPTS),
        metavar="PROMPT",
        help="prompts whose images must not change, watched at every check besides the "
        "training prompt's own non-copies (none: the non-copies only)",
    )
    flag(
        check,
        "--keep_images",
        type=int,
        default=4,
        help="fixed seeds per keep prompt (the same before, at every check and after)",
    )
    flag(
        check,
        "--keep_band",
        type=float,
        default=KEEP_BAND,
        help="a keep prompt is in its band while its images moved, on average, at most this "
        "fraction of the distance between two of its images before unlearning",
    )
    flag(
        check,
        "--keep_backoffs",
        type=int,
        default=2,
        help="times a keep prompt leaving its band halves the forget weight (the weights of the "
        "last check in band put back) before it stops the run",
    )
    flag(
        check,
        "--noise_generations",
        type=int,
        default=4,
        help="generations of Wen et al.'s noise-magnitude score (theirs: 4); 0: not measured",
    )
    flag(
        check,
        "--noise_steps",
        type=int,
        default=None,
        help="first sampling steps the noise-magnitude score averages (default: all)",
    )
    flag(
        check,
        "--clip_model",
        default=None,
        help="a local CLIP folder (transformers CLIPModel + CLIPProcessor) for CLIP-IQA and "
        "CLIP score, or clip_iqa for torchmetrics' own weights (needs piq); without it quality "
        "is 'not measured' and success 'not determined'",
    )
    flag(
        check,
        "--quality_floor",
        type=float,
        default=0.35,
        at_least=0,
        at_most=1,
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


def check_timestep_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--timesteps`` and ``--forget_timesteps`` inside a local pipeline's training schedule
    (``scheduler/scheduler_config.json``'s ``num_train_timesteps``), before its weights load."""
    config = Path(args.pretrained_model_name_or_path).expanduser() / "scheduler"
    try:
        steps = json.loads((config / "scheduler_config.json").read_text())["num_train_timesteps"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # a hub id, or no such file: the loaded scheduler is checked later
    if not isinstance(steps, int):
        return
    for name in ("timesteps", "forget_timesteps"):
        values = getattr(args, name, None)
        if values is not None and not all(0 <= v < steps for v in values):
            parser.error(
                f"--{name} {' '.join(map(str, values))}: outside the pipeline's training "
                f"schedule [0, {steps - 1}]"
            )


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Errors naming the flag, before anything is loaded."""
    check_launcher(parser, os.environ)
    for name in ("pretrained_model_name_or_path", "output_dir"):
        if getattr(args, name) is None:
            parser.error(f"--{name} is required")
    if (args.prompt is None) == (args.prompts is None):
        parser.error("give --prompt or --prompts (one of them)")
    if args.prompts is not None and (args.train_prompt or args.reference_image):
        parser.error("--train_prompt and --reference_image go into the --prompts file per prompt")
    if args.prompts is not None and not args.prompts.is_file():
        parser.error(f"--prompts: no file {args.prompts}")
    if args.full and args.rank is not None:
        parser.error("--full trains the whole UNet; --rank is for a LoRA: give one of them")
    if not args.full:
        args.rank = 4 if args.rank is None else args.rank
        if args.rank < 1:
            parser.error(f"--rank must be >= 1, got {args.rank}")
        args.lora_alpha = float(args.rank if args.lora_alpha is None else args.lora_alpha)
    for name in ("prompt", "train_prompt"):
        if getattr(args, name) is not None and not getattr(args, name).strip():
            parser.error(f"--{name} is empty")
    on_cpu = args.device == "cpu" or (args.device is None and not torch.cuda.is_available())
    if args.dtype == "float16" and on_cpu:
        parser.error("--dtype float16 does not run on the CPU: use float32 or bfloat16")
    at_least_one = (
        "gen_batch_size", "sample_steps", "max_train_steps", "train_batch_size",
        "gradient_accumulation_steps", "verify_images", "stop_images", "stop_checks",
    )  # fmt: skip
    for name in at_least_one:
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("noise_generations", "verify_every", "checkpointing_steps", "keep_backoffs"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.until == "nonmember" and args.verify_every == 0:
        parser.error("--until nonmember measures at the checks: --verify_every must be >= 1")
    if (message := resolve_stop_rule(args)) is not None:
        parser.error(message)
    if args.batch_size is not None and (
        args.batch_size < 1 or args.batch_size % args.train_batch_size
    ):
        parser.error(
            f"--batch-size ({args.batch_size}) must be a multiple of --train_batch_size "
            f"({args.train_batch_size})"
        )
    if args.keep_images < 2:
        parser.error(f"--keep_images must be >= 2 (the spread needs two), got {args.keep_images}")
    if not 0 < args.keep_band < math.inf:
        parser.error(f"--keep_band must be a number > 0, got {args.keep_band}")
    if args.resolution is not None:
        if len(args.resolution) not in (1, 2) or min(args.resolution) < 1:
            parser.error(f"--resolution takes one or two sizes >= 1, got {args.resolution}")
        args.resolution = list(args.resolution) * (3 - len(args.resolution))  # [H, W]
    if args.noise_steps is not None and not 1 <= args.noise_steps <= args.sample_steps:
        parser.error(f"--noise_steps must be in [1, --sample_steps={args.sample_steps}]")
    if args.timesteps is not None and len(args.timesteps) not in (1, 2):
        parser.error("--timesteps takes one value (fixed) or two (a window)")
    check_timestep_flags(parser, args)
    try:
        recipe_config(args)
        if args.device == "cuda":  # accelerate would fall back to the CPU without a word
            resolve_device(args.device)
    except ValueError as error:
        parser.error(str(error))
    if args.reference_image is not None and not args.reference_image.is_file():
        parser.error(f"--reference_image: no file {args.reference_image}")
    if args.clip_model not in (None, "clip_iqa") and not Path(args.clip_model).is_dir():
        parser.error(f"--clip_model: no folder {args.clip_model} (a local CLIP model)")
    if args.features not in ("pixels", "vae") and not Path(args.features).is_dir():
        parser.error(f"--features: pixels, vae or a local image-encoder folder; no {args.features}")
    if args.metric is None:
        args.metric = "euclidean" if args.features in ("pixels", "vae") else "cosine"
    if args.prompts is None and args.threshold is not None and args.reference_image is None:
        parser.error("--threshold is the reference rule's: give --reference_image too")
    if not 0 < args.tightness < 1:
        parser.error(f"--tightness must be in (0, 1), got {args.tightness}")
    model = args.pretrained_model_name_or_path
    local = Path(model).expanduser()
    if not local.exists() and not re.fullmatch(r"[\w.-]+/[\w.-]+", model):
        parser.error(
            f"--pretrained_model_name_or_path: no folder {model} (and not a hub id such as "
            "owner/name)"
        )
    if local.is_dir() and not (local / "model_index.json").is_file():
        parser.error(
            f"--pretrained_model_name_or_path: {model} has no model_index.json: not a diffusers "
            "pipeline"
        )


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
    if (job.out / "metrics.json").is_file():
        # finished before (its weights saved before metrics.json), whatever checkpoints
        # --checkpoints_total_limit kept: nothing to do, nothing deleted
        return read_json(job.out / "metrics.json")
    try:
        result = unlearn(args, job, pipe, accelerator, latents, split, verifier)
    finally:
        accelerator.free_memory()  # forget the prepared model and optimizer (prompt lists)
    if result is None or not accelerator.is_main_process:
        return {"stopped": True} if result is None else {}
    metrics = finish(args, job, result, split)
    # the run is complete, its weights saved: its checkpoints go, but for the newest
    # --checkpoints_total_limit
    remove_checkpoints(job.out, args.checkpoints_total_limit or 0)
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
    if isinstance(before.get("noise_score_keep_median"), float):
        ratios = [e.get("train", {}).get("noise_ratio") for e in (before, after)]
        if all(isinstance(r, float) for r in ratios):
            lines.append(
                f"noise score / keep prompts' median: {ratios[0]:.2f} -> {ratios[1]:.2f} "
                "(reported only: unlearning itself changes this score)"
            )
    keep = after.get("keep") or {}
    if keep:
        lines.append(f"{'keep prompt':40}{'drift / spread':>16}{'band':>7}")
        for prompt, row in keep.items():
            mark = "" if row["in_band"] else "  OUTSIDE"
            lines.append(f"{prompt[:40]:40}{row['relative']:>16.3f}{row['band']:>7g}{mark}")
    for prompt, why in (after.get("keep_not_watched") or {}).items():
        lines.append(f"{prompt[:40]:40} not watched: {why}")
    stop = metrics.get("stop")
    if stop:
        lines.append(f"stopped after {stop['steps']} steps: {stop['text']}")
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
    """One job per prompt: the ``--prompts`` list's (a subfolder of ``--output_dir`` each), or the
    one of ``--prompt``."""
    if args.prompts is not None:
        try:  # an unreadable list is the flag's refusal
            return read_prompt_list(args.prompts, args.output_dir, args.overfit_types)
        except ValueError as error:  # its messages name --prompts
            raise FlagError(str(error)) from None
        except OSError as error:
            raise FlagError(f"--prompts {args.prompts}: {error}") from None
    train_prompt = args.train_prompt or args.prompt
    return [Job(args.prompt, train_prompt, args.reference_image, args.output_dir, {})]


def start_accelerator(args: argparse.Namespace, jobs: list[Job]) -> tuple[Any, torch.dtype]:
    """accelerate's ``Accelerator`` for the flags, and the pipeline's dtype.

    Before anything is loaded: an old ``--batch-size`` is converted for the number of processes,
    and every job's ``--output_dir`` is checked against what it holds (``check_out``).
    ``args.dtype`` and ``args.mixed_precision`` become what ``auto`` resolved to
    (``config.json`` records them).
    """
    with needs("siss-stable-diffusion"):
        from accelerate import Accelerator, PartialState

    state = PartialState(cpu=args.device == "cpu")
    device = state.device
    dtype = resolve_dtype(args.dtype, device)
    args.dtype = str(dtype).removeprefix("torch.")
    args.mixed_precision = mixed_precision_of(args, dtype)
    if args.batch_size is not None:
        convert_global_batch(args, state.num_processes)
    for job in jobs:
        check_out(args, job)  # another experiment's folder: refused before anything is loaded
    accelerator = Accelerator(
        cpu=device.type == "cpu",
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        # --report_to: its tracker, writing under --output_dir/--logging_dir; {} without it
        **tracker_options(args, args.output_dir),
    )
    return accelerator, dtype


def convert_global_batch(args: argparse.Namespace, processes: int) -> None:
    """0.1's ``--batch-size`` (rows per optimizer step, whatever the number of processes) as
    ``--gradient_accumulation_steps``, with a warning, until ``siss._cli.parser.REMOVED_IN``."""
    import warnings

    from siss._cli.parser import REMOVED_IN

    rows = args.train_batch_size * processes
    if args.batch_size % rows:
        raise FlagError(
            f"--batch-size {args.batch_size} must be a multiple of --train_batch_size "
            f"{args.train_batch_size} x {processes} processes"
        )
    args.gradient_accumulation_steps = args.batch_size // rows
    warnings.warn(
        f"--batch-size (rows per optimizer step) is replaced by --train_batch_size x processes "
        f"x --gradient_accumulation_steps; taken as --gradient_accumulation_steps "
        f"{args.gradient_accumulation_steps}; accepted until {REMOVED_IN}",
        FutureWarning,
        stacklevel=2,
    )
    args.batch_size = None


def check_pipeline(args: argparse.Namespace, pipe: Any, jobs: list[Job]) -> None:
    """What the loaded pipeline must allow, checked before any image is generated: a LoRA on
    its denoiser, and each reference image at the size it generates."""
    _, denoiser = denoiser_of(pipe)
    check_lora_targets(denoiser, args)
    size = image_size(pipe)
    for job in jobs:
        if job.reference is not None:
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
    ``--prompt`` (``{"stopped": True}`` after ``--stop_after``), or with ``--prompts`` the
    summary rows (also written to ``summary.json`` and ``summary.md``)."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    resolve_lora_targets(args)  # the family's default, recorded in config.json before loading
    jobs = jobs_of(args)
    for job in jobs:  # each reference image readable before the pipeline loads
        if job.reference is not None:
            read_reference(job.reference)
    accelerator, dtype = start_accelerator(args, jobs)
    pipe = load_pipeline(args, accelerator.device, dtype)
    check_pipeline(args, pipe, jobs)
    rows = []
    for number_, job in enumerate(jobs):
        if number_:
            pipe = load_pipeline(args, accelerator.device, dtype)  # the original weights again
        rows.append(run_prompt(args, job, pipe, accelerator))
    if args.prompts is not None and accelerator.is_main_process:
        write_json(args.output_dir / "summary.json", rows)
        table = summary_table(rows)
        write_atomically(args.output_dir / "summary.md", table)
        print(table)
    accelerator.wait_for_everyone()
    if accelerator.num_processes > 1 or args.report_to is not None:
        accelerator.end_training()  # the trackers (each job finished its own) and processes
    return rows if args.prompts is not None else rows[0]["metrics"]


def main(argv: Sequence[str] | None = None) -> int:
    """The installed command ``siss-stable-diffusion`` (and ``python -m siss.stable_diffusion``):
    ``run_command``, then exit status 0; a bad flag exits with 2 (argparse), a job that cannot
    go on (no memorization found, no image to keep, too few non-copies for ``--until
    nonmember``) with its message and status 1. A flag refused once what it names is read
    (``FlagError``: a ``--resolution`` the pipeline cannot generate, ``--lora_targets`` it
    lacks, a ``--reference_image`` of another size, an ``--output_dir`` holding another run, a
    ``--pretrained_model_name_or_path`` that is no text-to-image pipeline) exits with 2, as
    argparse's refusals do."""
    try:
        run_command(argv)
    except FlagError as error:
        raise exit_on_flag_error("siss-stable-diffusion", error) from None
    return 0
