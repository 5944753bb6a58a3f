"""Remove a memorized training image from a Stable Diffusion model with SISS, end to end.

Stable Diffusion v1.4 reproduces some LAION training images almost verbatim for their captions
(Carlini et al., 2023; Webster, 2023). This script runs the paper's Section 5.3 experiment as one
command on any diffusers text-to-image pipeline (SD 1.x/2.x, SDXL, SD3; a hub id or a local
folder). It **generates** ``--num-images`` images for the training prompt, seeded per image and
resumable, keeping each image's final latent; **splits** them into the memorized copies (A) and
the rest (X \\ A), by similarity to ``--reference-image`` when one is given and otherwise by the
paper's 2-means rule, saving the rule in ``split.json`` and a grid of each side; **unlearns** A
with SISS (λ = 0.5, the paper's NormBalancer rule; ``--method`` picks any method of
``siss.registry``) on those latents with the prompt held fixed, through a PEFT LoRA (default) or
the full UNet, under ``accelerate`` (any number of processes, mixed precision, gradient
accumulation, gradient checkpointing, ``save_state`` checkpoints and ``--resume``); and
**verifies** before, every ``--verify-every`` steps and at the end, on seeds never used for
training: the memorized fraction for the training and the original prompt with Clopper-Pearson
intervals, Wen et al.'s noise-magnitude score, and CLIP-IQA and CLIP score when ``--clip-model``
names a local CLIP folder. ``--prompts FILE`` does all of it for every prompt of a list (plain
text, JSONL, Wen et al.'s ``sdv1_500_memorized.jsonl`` or Webster's ground-truth parquet) and
writes one summary table. Tutorial: docs/stable_diffusion.md.

    python -m examples.stable_diffusion --model CompVis/stable-diffusion-v1-4 \\
        --prompt "Mothers influence on her young hippo" \\
        --train-prompt "Mothers influence on ''her young hippo" --out outputs/sd/hippo
    python -m examples.stable_diffusion split --tightness 0.3 ...   # one stage, same flags
    accelerate launch --num_processes 4 -m examples.stable_diffusion --model ... --out ...
    python -m examples.stable_diffusion --prompts sdv1_500_memorized.jsonl --model ... --out ...
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import re
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from siss._cli import resolve_device
from siss._files import (
    atomic_folder,
    atomic_path,
    replace_folder,
    write_atomically,
    write_json_atomically,
)
from siss.loop import BatchPlan, derived_seed

STAGES = ("run", "generate", "split", "unlearn", "verify")
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # diffusers' train_text_to_image_lora.py
MEMORIZED_TYPES = ("MV", "RV", "TV")  # Webster's overfit_type labels of memorized prompts
CHECKPOINT_PREFIX = "step-"
RUN_STATE_FILE = "run_state.json"

# Flags whose change makes the images on disk, the split or the training run another
# experiment. Images: generation; a run (checkpoints, weights): all three groups.
GENERATION_FLAGS = (
    "model",
    "prompt",
    "train_prompt",
    "seed",
    "sample_steps",
    "guidance_scale",
    "sampler",
    "dtype",
)
SPLIT_FLAGS = ("reference_image", "threshold", "metric", "tightness", "features", "num_images")
TRAINING_FLAGS = (
    "method",
    "lam",
    "superfactor",
    "ratio",
    "keep_target",
    "balance_mode",
    "balance_every",
    "calibration_batches",
    "lr",
    "weight_decay",
    "batch_size",
    "micro_batch_size",
    "timesteps",
    "max_grad_norm",
    "mixed_precision",
    "lora_rank",
    "lora_alpha",
    "lora_targets",
    "full",
)


class StopJob(Exception):
    """A prompt that cannot be unlearned as asked (no memorization, an empty side of the split):
    the message says why and which flag would change it. The prompt-list mode records it in the
    summary and goes on with the next prompt."""


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring's examples kept as written, and every flag's default shown."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m examples.stable_diffusion",
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
    io = p.add_argument_group("model, prompts, output")
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
        "template verbatim; N, not memorized, is left out by default)",
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

    gen = p.add_argument_group("1. generate")
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

    split = p.add_argument_group("2. split")
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

    train = p.add_argument_group("3. unlearn")
    from siss._cli import add_keep_target_flags
    from siss.registry import METHODS

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

    check = p.add_argument_group("4. verify")
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
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Errors naming the flag, before anything is loaded."""
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


def check_threshold_given(args: argparse.Namespace, where: str) -> None:
    """The default reference threshold is a pixel distance: other features need their own."""
    if args.threshold is None and (args.features, args.metric) != ("pixels", "euclidean"):
        raise SystemExit(
            f"--threshold is required with {where} and --features {args.features} "
            f"(--metric {args.metric}): the default threshold is a pixel distance"
        )


def training_config(args: argparse.Namespace, job: Job) -> dict[str, Any]:
    """The settings a run's outputs depend on, JSON-safe, per flag."""
    values = {**vars(args), "prompt": job.prompt, "train_prompt": job.train_prompt}
    values["reference_image"] = None if job.reference is None else str(job.reference)
    keys = GENERATION_FLAGS + SPLIT_FLAGS + TRAINING_FLAGS
    return {k: (str(values[k]) if isinstance(values[k], Path) else values[k]) for k in keys}


def differing(saved: dict[str, Any], current: dict[str, Any], keys: Sequence[str]) -> list[str]:
    """``--flag (saved X, now Y)`` for every flag of ``keys`` that changed."""
    return [
        f"--{k.replace('_', '-')} (saved {saved.get(k)!r}, now {current.get(k)!r})"
        for k in keys
        if saved.get(k) != current.get(k)
    ]


# --------------------------------------------------------------------------------------------
# Files: everything written atomically (siss._files: temporary sibling + os.replace)
# --------------------------------------------------------------------------------------------


def write_json(path: Path, payload: Any) -> None:
    """``payload`` as indented JSON, atomically; what JSON cannot hold (paths) as ``str``."""
    write_json_atomically(path, payload, default=str)


def save_png(image: Any, path: Path) -> None:
    """A PIL image, or ``(H, W, 3)`` uint8 array, as PNG."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.fromarray(image)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


# --------------------------------------------------------------------------------------------
# Prompt lists: text, JSONL (Wen et al.'s sdv1_500_memorized.jsonl included), Webster's parquet
# --------------------------------------------------------------------------------------------


@dataclass
class Job:
    """One prompt to unlearn, and where its outputs go."""

    prompt: str
    train_prompt: str
    reference: Path | None
    out: Path
    source: dict[str, Any]  # the list entry's other fields (Wen's index/url, Webster's type)


def _prompt_of(entry: dict[str, Any], where: str) -> str:
    prompt = entry.get("prompt", entry.get("caption"))
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"--prompts {where}: no 'prompt' (or 'caption') text")
    return prompt


def records_from_columns(
    columns: dict[str, list[Any]], where: str, overfit_types: Sequence[str]
) -> list[dict[str, Any]]:
    """Rows of a column table (Webster's parquet as ``pyarrow.Table.to_pydict()``).

    Webster's ground-truth parquets (``fraisdufour/templates-verbs``,
    ``groundtruth_parquets/sdv1_*_groundtruth.parquet``; written by his
    ``gather_groundtruth_labels.py``) hold ``caption``, ``url``, ``overfit_type`` (``MV``
    matching verbatim, ``RV`` retrieval verbatim, ``TV`` template verbatim, ``N`` none),
    ``gen_seeds``, ``retrieved_urls``, ``mse_real_gen`` and ``template_indices``. Rows whose
    ``overfit_type`` is not in ``overfit_types`` are left out.
    """
    if "caption" not in columns and "prompt" not in columns:
        raise ValueError(f"--prompts {where}: no 'caption' or 'prompt' column ({list(columns)})")
    length = len(next(iter(columns.values())))
    rows = [{key: values[i] for key, values in columns.items()} for i in range(length)]
    if "overfit_type" in columns:
        rows = [row for row in rows if row["overfit_type"] in set(overfit_types)]
    return rows


def read_prompt_list(
    path: Path, out: Path, overfit_types: Sequence[str] = MEMORIZED_TYPES
) -> list[Job]:
    """The jobs of ``--prompts``: one subfolder ``NNN-slug`` of ``out`` per prompt."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as parquet
        except ImportError:
            raise SystemExit(
                f"--prompts {path}: reading a parquet file needs pyarrow (pip install pyarrow)"
            ) from None
        rows = records_from_columns(parquet.read_table(path).to_pydict(), str(path), overfit_types)
    elif suffix in (".jsonl", ".json"):
        rows = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(
                        f"--prompts {path} line {number}: not JSON ({error})"
                    ) from None
                if not isinstance(rows[-1], dict):
                    raise ValueError(f"--prompts {path} line {number}: not a JSON object")
    else:
        lines = [line.strip() for line in path.read_text().splitlines()]
        rows = [{"prompt": line} for line in lines if line and not line.startswith("#")]
    jobs = []
    for number, row in enumerate(rows):
        prompt = _prompt_of(row, f"{path} entry {number + 1}")
        train_prompt = row.get("train_prompt") or prompt
        reference = row.get("reference_image")
        if reference:
            reference = (path.parent / reference).resolve()
            if not reference.is_file():
                raise ValueError(
                    f"--prompts {path} entry {number + 1}: no reference image {reference}"
                )
        slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40] or "prompt"
        extra = {
            k: v
            for k, v in row.items()
            if k not in ("prompt", "caption", "train_prompt", "reference_image")
            and isinstance(v, str | int | float | bool | type(None))
        }
        jobs.append(Job(prompt, train_prompt, reference, out / f"{number:03d}-{slug}", extra))
    if not jobs:
        raise ValueError(f"--prompts {path}: no prompt in it (overfit types {list(overfit_types)})")
    return jobs


# --------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def mixed_precision_of(args: argparse.Namespace, dtype: torch.dtype) -> str:
    if args.mixed_precision != "auto":
        return args.mixed_precision
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")


def check_model_index(model: str) -> None:
    """A local pipeline without a text encoder is refused before its weights are read."""
    index = Path(model).expanduser() / "model_index.json"
    if not index.is_file():
        return
    components = read_json(index)
    entry = components.get("text_encoder") or components.get("text_encoder_2")
    if not entry or entry[0] is None:
        raise SystemExit(
            f"--model {model}: a {components.get('_class_name', 'pipeline')} without a text "
            "encoder; this example needs a text-to-image pipeline (the prompt is its "
            "conditioning)"
        )


def denoiser_of(pipe: Any) -> tuple[str, torch.nn.Module]:
    """``("unet" | "transformer", module)``: the model that is fine-tuned."""
    for name in ("unet", "transformer"):
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            return name, module
    raise SystemExit(f"--model: {type(pipe).__name__} has neither a unet nor a transformer")


def load_pipeline(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Any:
    """The pipeline on ``device`` in ``dtype``, its text encoder checked, progress bars off."""
    from diffusers import DDIMScheduler, DiffusionPipeline
    from diffusers.pipelines import pipeline_utils

    check_model_index(args.model)
    # diffusers renamed `torch_dtype` to `dtype` (0.36); older releases know the first only.
    key = "dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype"
    try:
        # Components the folder saved as [null, null] (e.g. SD3 without its T5 encoder) must be
        # passed as None, or diffusers refuses to build the pipeline.
        index = DiffusionPipeline.load_config(args.model)
        absent = {
            name: None
            for name, entry in index.items()
            if isinstance(entry, list | tuple) and len(entry) == 2 and entry[0] is None
        }
        if "safety_checker" in index:  # never run (see below): not loaded either
            absent.update(safety_checker=None, feature_extractor=None)
            absent["requires_safety_checker"] = False
        pipe = DiffusionPipeline.from_pretrained(args.model, **{key: dtype}, **absent)
    except (OSError, ValueError) as error:
        raise SystemExit(f"--model {args.model}: could not load the pipeline ({error})") from None
    if (
        getattr(pipe, "text_encoder", None) is None
        and getattr(pipe, "text_encoder_2", None) is None
    ):
        raise SystemExit(
            f"--model {args.model}: {type(pipe).__name__} has no text encoder; this example needs "
            "a text-to-image pipeline"
        )
    # The safety checker would black out images before the split sees them; output_type="latent"
    # skips it anyway (see the tutorial).
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe.training_scheduler = pipe.scheduler  # the forward process the loss trains on
    if args.sampler == "ddim" and "Flow" not in type(pipe.scheduler).__name__:
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe


def image_size(pipe: Any) -> tuple[int, int]:
    """``(H, W)`` of the images the pipeline generates by default."""
    _, denoiser = denoiser_of(pipe)
    sample = denoiser.config.sample_size
    factor = int(getattr(pipe, "vae_scale_factor", 8))
    if getattr(pipe, "default_sample_size", None):
        sample = pipe.default_sample_size
    if isinstance(sample, int):
        return sample * factor, sample * factor
    return int(sample[0]) * factor, int(sample[1]) * factor


def check_lora_targets(denoiser: torch.nn.Module, args: argparse.Namespace) -> None:
    """Refuse a LoRA PEFT cannot put on this model, before any image is generated."""
    if args.full:
        return
    if not callable(getattr(denoiser, "add_adapter", None)):
        raise SystemExit(
            f"--lora-rank {args.lora_rank}: {type(denoiser).__name__} does not take a PEFT "
            "adapter (no add_adapter); use --full"
        )
    names = [name for name, _ in denoiser.named_modules()]
    found = [t for t in args.lora_targets if any(n == t or n.endswith("." + t) for n in names)]
    if not found:
        raise SystemExit(
            f"--lora-rank {args.lora_rank}: none of the --lora-targets {args.lora_targets} is a "
            f"module of {type(denoiser).__name__} (it has no attention projections to wrap); "
            "name its layers with --lora-targets, or use --full"
        )


def load_reference(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """``(1, 3, H, W)`` in [-1, 1]; a named error when it is not the generated size."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        if (image.height, image.width) != size:
            raise SystemExit(
                f"--reference-image {path} is {image.width}x{image.height} but the pipeline "
                f"generates {size[1]}x{size[0]} images: resize or crop it to {size[1]}x{size[0]}"
            )
        array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return to_signed(torch.from_numpy(array.copy()).permute(2, 0, 1)[None])


def to_signed(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, 3, H, W)`` to float32 in [-1, 1]."""
    return images.float() / 127.5 - 1


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float ``(N, 3, H, W)`` in [-1, 1] to uint8, rounded (what a PNG keeps)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def autocast_for(pipe: Any, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast to the pipeline's dtype when the denoiser keeps float32 master weights (a full
    fine-tune under mixed precision): its inputs come in the text encoder's dtype."""
    _, denoiser = denoiser_of(pipe)
    dtype = pipe.text_encoder.dtype if getattr(pipe, "text_encoder", None) is not None else None
    if device.type == "cpu" or dtype in (None, torch.float32) or denoiser.dtype == dtype:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def decode(pipe: Any, latents: torch.Tensor) -> torch.Tensor:
    """Images ``(N, 3, H, W)`` in [-1, 1] from the denoiser's latents ``(N, C, h, w)``."""
    vae = pipe.vae
    original = vae.dtype
    # SDXL's VAE overflows in float16 (config.force_upcast): decode in float32, as its pipeline
    # does.
    dtype = torch.float32 if getattr(vae.config, "force_upcast", False) else original
    latents = latents.to(vae.device, dtype) / vae.config.scaling_factor
    if getattr(vae.config, "shift_factor", None) is not None:
        latents = latents + vae.config.shift_factor
    if dtype != original:
        vae.to(dtype)
    try:
        with torch.autocast(vae.device.type, enabled=False):
            images = vae.decode(latents, return_dict=False)[0]
    finally:
        if dtype != original:
            vae.to(original)
    return images.float().clamp(-1, 1)


@torch.no_grad()
def sample_batch(
    pipe: Any, prompt: str, seeds: Sequence[int], args: argparse.Namespace, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images ``(B, 3, H, W)`` and float32 final latents ``(B, C, h, w)`` on the CPU for
    ``seeds``, one generator each: image ``i``'s noise depends on its seed only."""
    generators = [torch.Generator(device).manual_seed(int(s)) for s in seeds]
    _, denoiser = denoiser_of(pipe)
    was_training = denoiser.training
    denoiser.eval()
    with autocast_for(pipe, device):
        latents = pipe(
            [prompt] * len(seeds),
            num_inference_steps=args.sample_steps,
            guidance_scale=args.guidance_scale,
            generator=generators,
            output_type="latent",
        ).images
        images = decode(pipe, latents)
    denoiser.train(was_training)
    return to_uint8(images).cpu(), latents.float().cpu()


def generate(
    pipe: Any,
    prompt: str,
    seeds: Sequence[int],
    args: argparse.Namespace,
    accelerator: Any,
    *,
    store: Path | None = None,
    desc: str = "generate",
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Images and latents for ``seeds``, the processes sharing the work.

    With ``store``, image ``i`` goes to ``store/images/{i:05d}.png`` and its latent to
    ``store/latents/{i:05d}.safetensors`` (the main process writes; an image already there is
    not generated again) and nothing is returned; else the main process gets
    ``(uint8 (N, 3, H, W), float32 latents (N, C, h, w))`` in the order of ``seeds``.
    """
    from accelerate.utils import gather_object
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    indices = list(range(len(seeds)))
    if store is not None:
        indices = [i for i in indices if not image_files_exist(store, i)]
    world, rank = accelerator.num_processes, accelerator.process_index
    chunk = world * args.gen_batch_size
    results: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    bar = tqdm(
        total=len(indices),
        desc=desc,
        disable=args.no_progress or not accelerator.is_main_process or not indices,
    )
    for start in range(0, len(indices), chunk):
        part = indices[start : start + chunk][rank::world]
        mine: list[tuple[int, Any, Any]] = []
        if part:
            images, latents = sample_batch(
                pipe, prompt, [seeds[i] for i in part], args, accelerator.device
            )
            mine = [(i, images[n].numpy(), latents[n].numpy()) for n, i in enumerate(part)]
        gathered = gather_object(mine) if world > 1 else mine
        if accelerator.is_main_process:
            for i, image, latent in gathered:
                image, latent = torch.from_numpy(image), torch.from_numpy(latent)
                if store is None:
                    results[i] = (image, latent)
                    continue
                save_png(image.permute(1, 2, 0).numpy(), store / "images" / f"{i:05d}.png")
                with atomic_path(store / "latents" / f"{i:05d}.safetensors") as tmp:
                    metadata = {"seed": str(seeds[i]), "prompt": prompt}
                    save_file({"latent": latent.contiguous()}, str(tmp), metadata=metadata)
            bar.update(len(gathered))
    bar.close()
    accelerator.wait_for_everyone()
    if store is not None or not accelerator.is_main_process:
        return None
    order = range(len(seeds))
    return (
        torch.stack([results[i][0] for i in order]),
        torch.stack([results[i][1] for i in order]),
    )


def image_files_exist(store: Path, index: int) -> bool:
    return (store / "images" / f"{index:05d}.png").is_file() and (
        store / "latents" / f"{index:05d}.safetensors"
    ).is_file()


def load_generated(store: Path, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images ``(N, 3, H, W)`` and float32 latents ``(N, C, h, w)`` from ``store``."""
    import numpy as np
    from PIL import Image
    from safetensors.torch import load_file

    missing = [i for i in range(count) if not image_files_exist(store, i)]
    if missing:
        raise SystemExit(
            f"{store}: images {missing[:5]}{'...' if len(missing) > 5 else ''} are missing; run "
            "the generate stage first (same flags)"
        )
    images, latents = [], []
    for i in range(count):
        with Image.open(store / "images" / f"{i:05d}.png") as image:
            images.append(torch.from_numpy(np.asarray(image.convert("RGB")).copy()))
        latents.append(load_file(str(store / "latents" / f"{i:05d}.safetensors"))["latent"])
    return torch.stack(images).permute(0, 3, 1, 2).contiguous(), torch.stack(latents)


# --------------------------------------------------------------------------------------------
# 2. The split, and the same rule applied to new images (verification)
# --------------------------------------------------------------------------------------------


def feature_map(args: argparse.Namespace, pipe: Any) -> Any:
    """Images ``(N, 3, H, W)`` in [-1, 1] -> features ``(N, F)``; ``None`` for pixels (the
    split's default, which also brings its default reference threshold)."""
    from siss.audit import split as split_module

    if args.features == "pixels":
        return None
    if args.features == "vae":
        return split_module.vae_features(pipe.vae)
    return split_module.image_encoder_features(args.features, device=pipe.device)


def split_stage(
    args: argparse.Namespace, job: Job, pipe: Any, accelerator: Any, images: torch.Tensor
) -> tuple[Any, Any]:
    """Split the generated images with ``siss.audit.split.memorization_split``.

    The main process splits (deterministic: KMeans is seeded) and writes ``split.json`` (the
    rule in words, its parameters and statistics, per-image scores and the memorized indices)
    and a grid of each side; every process then reads ``split.json`` and raises ``StopJob``
    when no memorization was found or a side is empty. Returns the split (``.memorized``, a
    ``(N,)`` bool mask) and, on the main process, the detector that applies the split's own
    rule to new uint8 images (``MemorizationSplit.classify``).
    """
    from siss.audit.generation import pixel_features
    from siss.audit.split import memorization_split

    path = job.out / "split.json"
    features = feature_map(args, pipe)
    detector = split = None
    if accelerator.is_main_process:
        kwargs: dict[str, Any] = {"features": features}
        if job.reference is not None:
            reference = load_reference(job.reference, tuple(images.shape[2:]))
            kwargs.update(reference=reference, threshold=args.threshold, metric=args.metric)
        else:
            kwargs.update(seed=args.seed, tightness=args.tightness)
        split = memorization_split(to_signed(images), **kwargs)
        settings = {k: training_config(args, job)[k] for k in SPLIT_FLAGS}
        write_json(path, {**split.to_dict(), "settings": settings})
        save_split_grids(images, split.memorized.bool().cpu(), job.out)
        apply = features or pixel_features

        def detector(new_images: torch.Tensor) -> torch.Tensor:
            feats = torch.cat([apply(to_signed(chunk)) for chunk in new_images.split(64)])
            return split.classify(feats).bool().cpu()

    accelerator.wait_for_everyone()
    payload = read_json(path)
    check_split(payload, job)
    if split is None:
        split = SavedSplit(payload)
    return split, detector


class SavedSplit:
    """What the other processes need of the split: the ``(N,)`` bool mask (from split.json)."""

    def __init__(self, payload: dict[str, Any]):
        self.memorized = torch.tensor(payload["memorized"], dtype=torch.bool)


def check_split(payload: dict[str, Any], job: Job) -> None:
    memorized, keep = payload["counts"]["memorized"], payload["counts"]["not_memorized"]
    grids = f"see {job.out}/split_memorized.png and split_not_memorized.png"
    if not payload.get("found", True) or memorized == 0:
        if job.reference is None:
            how = "pass --reference-image (the training image), or raise --tightness"
        elif payload.get("metric") == "cosine":
            how = "lower --threshold (a similarity)"
        else:
            how = "raise --threshold (a distance)"
        raise StopJob(
            f"no memorization found among the {memorized + keep} images of {job.train_prompt!r}: "
            f"{payload.get('reason', '')} ({grids}); if it is memorized, {how}"
        )
    if keep == 0:
        raise StopJob(
            f"all {memorized} images of {job.train_prompt!r} are copies of the memorized image: "
            "with no image to keep, SISS has no X \\ A; use a modified, partially memorized "
            f"--train-prompt (the paper's), or raise --num-images ({grids})"
        )


def save_split_grids(images: torch.Tensor, memorized: torch.Tensor, out: Path) -> None:
    for name, mask in (("split_memorized", memorized), ("split_not_memorized", ~memorized)):
        save_png(image_grid(images[mask][:64]), out / f"{name}.png")


def image_grid(images: torch.Tensor, marks: torch.Tensor | None = None) -> Any:
    """A ``make_image_grid`` of uint8 ``(N, 3, H, W)``; ``marks`` (N,) bool frames those images
    red (memorized) and the others grey."""
    from diffusers.utils import make_image_grid
    from PIL import Image, ImageOps

    if len(images) == 0:
        return Image.new("RGB", (64, 16), "white")
    tiles = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images]
    # tiles of 64 to 256 pixels: tiny test images readable, 128 SD images not a 50 MB PNG
    side = min(max(tiles[0].width, 64), 256)
    if side != tiles[0].width:
        resample = Image.Resampling.NEAREST if side > tiles[0].width else Image.Resampling.LANCZOS
        tiles = [t.resize((side, side * t.height // t.width), resample) for t in tiles]
    if marks is not None:
        border = max(1, tiles[0].width // 64)
        tiles = [
            ImageOps.expand(t, border=border, fill="red" if m else "lightgrey")
            for t, m in zip(tiles, marks.tolist(), strict=True)
        ]
    cols = min(len(tiles), 8)
    rows = math.ceil(len(tiles) / cols)
    tiles += [Image.new("RGB", tiles[0].size, "white")] * (rows * cols - len(tiles))
    return make_image_grid(tiles, rows=rows, cols=cols)


# --------------------------------------------------------------------------------------------
# 4. Verification: memorized fraction, noise-magnitude score, quality
# --------------------------------------------------------------------------------------------


class Verifier:
    """Measures the model at one step: for the training and the original prompt, on the same
    fresh seeds every time (seed + num-images + i, never a training image's)."""

    def __init__(
        self,
        args: argparse.Namespace,
        job: Job,
        pipe: Any,
        accelerator: Any,
        detector: Any,
    ):
        self.args, self.job, self.pipe, self.accelerator = args, job, pipe, accelerator
        self.detector = detector
        base = args.seed + args.num_images
        self.seeds = list(range(base, base + args.verify_images))
        self.prompts = {"train": job.train_prompt}
        if job.prompt != job.train_prompt:
            self.prompts["original"] = job.prompt
        self.quality = None
        self.quality_reason = "not measured: no --clip-model (a local CLIP folder) given"
        if args.clip_model is not None and accelerator.is_main_process:
            from siss.metrics import CLIPQuality

            self.quality = CLIPQuality(args.clip_model, accelerator.device)
            self.quality_reason = None

    def __call__(self, step: int, tag: str | None = None) -> dict[str, Any]:
        """Every process calls it (the generations are shared); the main process gets the
        measurement, the others ``{}``. The grids go to ``verify/{tag}-{prompt}.png`` (tag
        default ``step-NNNNN``), memorized images framed red."""
        entry: dict[str, Any] = {"step": step}
        started = time.perf_counter()
        for name, prompt in self.prompts.items():
            generated = generate(
                self.pipe, prompt, self.seeds, self.args, self.accelerator,
                desc=f"verify {name} @ {step}",
            )  # fmt: skip
            if not self.accelerator.is_main_process:
                continue
            images, _ = generated
            memorized = self.detector(images)
            count, total = int(memorized.sum()), len(memorized)
            from siss.metrics.rate import proportion_ci

            low, high = proportion_ci(count, total)
            row: dict[str, Any] = {
                "prompt": prompt,
                "memorized": count,
                "total": total,
                "fraction": count / total,
                "ci95": [low, high],
                **self.noise_score(prompt),
            }
            if self.quality is not None:
                row.update(self.quality(images, prompt))
            else:
                row["quality"] = self.quality_reason
            entry[name] = row
            save_png(
                image_grid(images, memorized),
                self.job.out / "verify" / f"{tag or f'step-{step:05d}'}-{name}.png",
            )
        entry["wall_s"] = round(time.perf_counter() - started, 2)
        self.accelerator.wait_for_everyone()
        return entry if self.accelerator.is_main_process else {}

    @torch.no_grad()
    def noise_score(self, prompt: str) -> dict[str, Any]:
        """Wen et al.'s ``||eps(x_t, prompt) - eps(x_t, "")||`` averaged over the first
        ``--noise-steps`` guided DDIM steps, per generation; its mean and standard error."""
        args = self.args
        if args.noise_generations == 0:
            return {"noise_score": "not measured: --noise-generations 0"}
        from siss.adapters.prompts import prompt_conditioning
        from siss.audit.memorization import noise_magnitude_score

        _, denoiser = denoiser_of(self.pipe)
        device = self.accelerator.device
        cond = prompt_conditioning(self.pipe, prompt, device=device, dtype=denoiser.dtype)
        embeds = cond.conditional["encoder_hidden_states"]
        null = cond.unconditional["encoder_hidden_states"]
        extra = {k: v for k, v in cond.conditional.items() if k != "encoder_hidden_states"}
        null_extra = {k: v for k, v in cond.unconditional.items() if k != "encoder_hidden_states"}
        channels = denoiser.config.in_channels
        height, width = image_size(self.pipe)
        factor = int(getattr(self.pipe, "vae_scale_factor", 8))
        shape = (args.noise_generations, channels, height // factor, width // factor)
        generator = torch.Generator(device).manual_seed(derived_seed(args.seed, "noise-score"))
        was_training = denoiser.training
        with autocast_for(self.pipe, device):
            scores = noise_magnitude_score(
                denoiser,
                self.pipe.scheduler,
                shape,
                embeds,
                null,
                num_inference_steps=args.sample_steps,
                num_steps=args.noise_steps or args.sample_steps,
                guidance_scale=args.guidance_scale,
                generator=generator,
                conditioning=extra or None,
                null_conditioning=null_extra or None,
            ).cpu()
        denoiser.train(was_training)
        if not bool(torch.isfinite(scores).all()):
            return {"noise_score": "not measured: the model's prediction was not finite"}
        se = float(scores.std() / math.sqrt(len(scores))) if len(scores) > 1 else None
        return {"noise_score": float(scores.mean()), "noise_score_se": se}


# --------------------------------------------------------------------------------------------
# 3. Unlearning
# --------------------------------------------------------------------------------------------


def recipe_config(args: argparse.Namespace) -> Any:
    """The run's ``siss.UnlearningConfig``: a constant learning rate, as the paper's SD runs."""
    from siss._cli import recipe_config as from_flags

    return from_flags(args, lr_scheduler="constant", adam_weight_decay=args.weight_decay)


def add_lora(denoiser: torch.nn.Module, args: argparse.Namespace) -> None:
    from peft import LoraConfig

    config = LoraConfig(
        r=args.lora_rank,
        lora_alpha=args.lora_alpha,
        init_lora_weights="gaussian",
        target_modules=list(args.lora_targets),
    )
    try:
        # PEFT draws lora_A from the global generator: seed it, so that the start (and so the
        # run) is the same whatever ran before, on every process and on every number of them.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derived_seed(args.seed, "lora"))
            denoiser.add_adapter(config)
    except ValueError as error:  # PEFT's "Target modules ... not found"
        raise SystemExit(f"--lora-rank {args.lora_rank} / --lora-targets: {error}") from None
    for parameter in denoiser.parameters():  # LoRA weights in float32 under mixed precision
        if parameter.requires_grad:
            parameter.data = parameter.data.float()


def checkpoints(out: Path) -> list[Path]:
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def save_checkpoint(accelerator: Any, out: Path, step: int, state: dict[str, Any]) -> None:
    """``accelerator.save_state`` into a temporary folder, renamed into place when whole;
    older checkpoints are removed."""
    root = out / "checkpoints"
    tmp = root / f".tmp-{CHECKPOINT_PREFIX}{step:06d}"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(tmp / RUN_STATE_FILE, state)
        final = root / f"{CHECKPOINT_PREFIX}{step:06d}"
        replace_folder(tmp, final)
        for old in checkpoints(out):
            if old != final:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()


def unlearn(
    args: argparse.Namespace,
    job: Job,
    pipe: Any,
    accelerator: Any,
    latents: torch.Tensor,
    split: Any,
    verifier: Verifier,
) -> dict[str, Any] | None:
    """Fine-tune the denoiser; returns the history of verifications (main process)."""
    from tqdm.auto import tqdm

    from siss import Unlearner
    from siss.adapters import register_lora_checkpoint_hooks, trainable_parameters
    from siss.adapters.prompts import prompt_conditioning

    out, device = job.out, accelerator.device
    memorized = split.memorized.bool().cpu()
    keep, forget = latents[~memorized].to(device), latents[memorized].to(device)
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

    try:
        plan = BatchPlan(
            args.seed, len(keep), len(forget), args.batch_size, args.micro_batch_size,
            accelerator.num_processes,
        )  # fmt: skip
    except ValueError:
        raise SystemExit(
            f"--batch-size {args.batch_size} is not a multiple of --micro-batch-size "
            f"{args.micro_batch_size} x {accelerator.num_processes} processes: choose them so "
            "that it is"
        ) from None
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

    step, history, train_wall, past_losses = 0, [], 0.0, []
    saved = checkpoints(out)
    if saved and args.resume:
        try:
            accelerator.load_state(str(saved[-1]))
        except (ValueError, FileNotFoundError) as error:  # the LoRA checkpoint hooks' checks
            raise SystemExit(f"--resume {saved[-1]}: {error}") from None
        state = read_json(saved[-1] / RUN_STATE_FILE)
        step, history, train_wall = state["step"], state["history"], state["train_wall_s"]
        past_losses = state["loss"]
        if accelerator.is_main_process:
            print(f"resumed {out} at step {step} from {saved[-1].name}", file=sys.stderr)
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


# --------------------------------------------------------------------------------------------
# 5. Results: metrics.json, the plot, the verdict
# --------------------------------------------------------------------------------------------


def verdict(history: list[dict[str, Any]], which: str, floor: float) -> tuple[str | None, str]:
    """The paper's success (Fig. 6): 0 memorized among the final generations and mean CLIP-IQA
    at least ``floor`` at every verification. ``(True/False/None, why)``; ``None``: not
    determined (quality not measured)."""
    final = history[-1].get(which)
    if final is None:
        return None, f"no {which} prompt"
    if final["memorized"] > 0:
        return False, (
            f"failed: {final['memorized']} of {final['total']} final generations are still "
            "memorized"
        )
    scores = [entry[which].get("clip_iqa") for entry in history if which in entry]
    if any(score is None for score in scores):
        return None, (
            f"not determined: 0 of {final['total']} memorized, but quality was not measured "
            "(give --clip-model)"
        )
    worst = min(scores)
    if worst < floor:
        return False, f"failed: CLIP-IQA fell to {worst:.3f}, below the floor {floor:g}"
    return True, f"success: 0 of {final['total']} memorized, CLIP-IQA >= {worst:.3f} throughout"


def save_plot(history: list[dict[str, Any]], path: Path, floor: float, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for which, color in (("train", "C0"), ("original", "C1")):
        rows = [(e["step"], e[which]) for e in history if which in e]
        if not rows:
            continue
        steps = [s for s, _ in rows]
        fraction = [r["fraction"] for _, r in rows]
        errors = [
            [f - r["ci95"][0] for f, (_, r) in zip(fraction, rows, strict=True)],
            [r["ci95"][1] - f for f, (_, r) in zip(fraction, rows, strict=True)],
        ]
        left.errorbar(steps, fraction, yerr=errors, marker="o", capsize=3, color=color,
                      label=f"{which} prompt")  # fmt: skip
        quality = [r.get("clip_iqa") for _, r in rows]
        if all(q is not None for q in quality):
            right.plot(steps, quality, marker="o", color=color, label=f"{which} prompt")
    left.set(xlabel="step", ylabel="memorized fraction (95% CI)", ylim=(-0.02, 1.02))
    left.legend()
    if right.lines:
        right.axhline(floor, color="grey", linestyle="--", label=f"floor {floor:g}")
        right.set(xlabel="step", ylabel="CLIP-IQA")
        right.legend()
    else:
        right.text(0.5, 0.5, "quality not measured\n(no --clip-model)", ha="center",
                   va="center", transform=right.transAxes)  # fmt: skip
        right.set_axis_off()
    fig.suptitle(title[:90])
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def finish(args: argparse.Namespace, job: Job, result: dict[str, Any], split: Any) -> dict:
    history = result["history"]
    out = job.out
    first, final = history[0], history[-1]
    for which in ("train", "original"):
        if which in first:
            shutil.copyfile(
                out / "verify" / f"step-{first['step']:05d}-{which}.png",
                out / f"samples_before_{which}.png",
            )
            shutil.copyfile(
                out / "verify" / f"step-{final['step']:05d}-{which}.png",
                out / f"samples_after_{which}.png",
            )
    outcome = {
        which: verdict(history, which, args.quality_floor) for which in ("train", "original")
    }
    memorized = split.memorized.bool()
    metrics = {
        "prompt": job.prompt,
        "train_prompt": job.train_prompt,
        "source": job.source,
        "split": {"memorized": int(memorized.sum()), "not_memorized": int((~memorized).sum())},
        "before": first,
        "after": final,
        "success": outcome["train"][0],
        "verdict": outcome["train"][1],
        "generalization": outcome["original"][1] if "original" in final else None,
        "quality_floor": args.quality_floor,
        "config": training_config(args, job),
        **result,
    }
    write_json(out / "metrics.json", metrics)
    save_plot(history, out / "metrics.png", args.quality_floor, job.train_prompt)
    return metrics


def describe(row: dict[str, Any] | None) -> str:
    if row is None:
        return "-"
    low, high = row["ci95"]
    return f"{row['memorized']}/{row['total']} [{low:.2f}, {high:.2f}]"


def number(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) else "n/m"


def report_lines(metrics: dict[str, Any]) -> list[str]:
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


# --------------------------------------------------------------------------------------------
# One prompt, end to end
# --------------------------------------------------------------------------------------------


def check_out(args: argparse.Namespace, job: Job) -> None:
    """Refuse an --out that holds another experiment's images or run, naming the flags (before
    the pipeline is loaded)."""
    config = training_config(args, job)
    path = job.out / "config.json"
    if path.is_file():
        saved = read_json(path)
        has_images = (job.out / "images").is_dir() and any((job.out / "images").iterdir())
        changed = differing(saved, config, GENERATION_FLAGS)
        if changed and has_images:
            raise SystemExit(
                f"--out {job.out} holds images generated with other settings: "
                f"{'; '.join(changed)}. Use another --out"
            )
        has_run = bool(checkpoints(job.out)) or (job.out / "metrics.json").is_file()
        changed = differing(saved, config, GENERATION_FLAGS + SPLIT_FLAGS + TRAINING_FLAGS)
        if has_run and changed and args.stage in ("run", "unlearn"):
            raise SystemExit(
                f"--out {job.out} holds a run with another configuration: {'; '.join(changed)}. "
                "Resume with the saved flags, or use another --out"
            )
    if checkpoints(job.out) and not args.resume and args.stage in ("run", "unlearn"):
        if not (job.out / "metrics.json").is_file():
            raise SystemExit(
                f"--out {job.out} holds checkpoints of an unfinished run: pass --resume to "
                "continue it, or use another --out"
            )


def prepare_out(args: argparse.Namespace, job: Job, accelerator: Any) -> None:
    """Check ``--out`` again and record this run's configuration in ``config.json``."""
    check_out(args, job)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(job.out / "config.json", training_config(args, job))
    accelerator.wait_for_everyone()


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


def summary_table(rows: list[dict[str, Any]]) -> str:
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


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | list[dict[str, Any]]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.prompts is not None:
        jobs = read_prompt_list(args.prompts, args.out, args.overfit_types)
    else:
        train_prompt = args.train_prompt or args.prompt
        jobs = [Job(args.prompt, train_prompt, args.reference_image, args.out, {})]

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
    pipe = load_pipeline(args, accelerator.device, dtype)
    _, denoiser = denoiser_of(pipe)
    check_lora_targets(denoiser, args)
    size = image_size(pipe)
    for job in jobs:
        if job.reference is not None:
            check_threshold_given(args, f"a reference image ({job.reference})")
            load_reference(job.reference, size)  # the size is checked before any generation

    rows = []
    for number_, job in enumerate(jobs):
        if number_:
            pipe = load_pipeline(args, accelerator.device, dtype)  # the original weights again
        try:
            metrics = run_job(args, job, pipe, accelerator)
            status = metrics.get("verdict", "done") if metrics else "done"
        except StopJob as stop:
            if args.prompts is None:
                raise SystemExit(str(stop)) from None
            metrics, status = {}, f"skipped: {stop}"
            if accelerator.is_main_process:
                print(f"{job.out.name}: {stop}", file=sys.stderr)
        rows.append(
            {"prompt": job.prompt, "train_prompt": job.train_prompt, "status": status,
             "out": str(job.out), "metrics": metrics}
        )  # fmt: skip
        if accelerator.is_main_process and metrics.get("before") and args.prompts is None:
            print("\n".join(report_lines(metrics)))
            print(f"outputs in {job.out}")
    if args.prompts is not None and accelerator.is_main_process:
        write_json(args.out / "summary.json", rows)
        table = summary_table(rows)
        write_atomically(args.out / "summary.md", table)
        print(table)
    accelerator.wait_for_everyone()
    if accelerator.num_processes > 1:
        accelerator.end_training()
    return rows if args.prompts is not None else rows[0]["metrics"]


if __name__ == "__main__":
    main()
