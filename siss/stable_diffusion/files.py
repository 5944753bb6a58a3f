"""The job folder (``--output_dir``): what the stages write there and read back, and the checks that
keep one folder one experiment.

Every file is written atomically (``siss._files``: a temporary sibling moved into place), so a
job killed at any moment leaves whole files only, and a rerun goes on from them. Here: the JSON
and PNG writers and the image grids; ``config.json``, the flags a folder's outputs depend on,
and the refusal of a folder that holds another experiment (``check_out``, before the pipeline is
loaded); accelerate's checkpoints (``checkpoints/step-NNNNNN/`` with ``run_state.json``, the
history and losses so far); and the prompt lists of ``--prompts`` (text, JSONL with Wen et al.'s
``sdv1_500_memorized.jsonl``, Webster's ground-truth parquet), one job and one subfolder per
prompt.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from siss._cli import FlagError
from siss._files import atomic_path, replace_folder, write_json_atomically
from siss._optional import needs

MEMORIZED_TYPES = ("MV", "RV", "TV")  # Webster's overfit_type labels of memorized prompts
CHECKPOINT_PREFIX = "step-"
RUN_STATE_FILE = "run_state.json"  # in a checkpoint: step, history, training time, losses

# Flags whose change makes the images on disk, the split or the training run another
# experiment. Images: generation; a run (checkpoints, weights): all three groups.
GENERATION_FLAGS = (
    "pretrained_model_name_or_path",
    "prompt",
    "train_prompt",
    "seed",
    "sample_steps",
    "guidance_scale",
    "resolution",
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
    "learning_rate",
    "adam_weight_decay",
    "train_batch_size",
    "gradient_accumulation_steps",
    "timesteps",
    "max_grad_norm",
    "mixed_precision",
    "rank",
    "lora_alpha",
    "lora_targets",
    "full",
    "verify_images",
    "until",
    "verify_every",
    "stop_images",
    "stop_checks",
    "keep_prompts",
    "keep_images",
    "keep_band",
    "keep_backoffs",
)


class StopJob(Exception):
    """A prompt that cannot be unlearned as asked (no memorization, an empty side of the split,
    generations that are not finite): the message says why and which flag would change it. The
    prompt-list mode records it in the summary and goes on with the next prompt."""


@dataclass
class Job:
    """One prompt to unlearn, and where its outputs go."""

    prompt: str
    train_prompt: str
    reference: Path | None
    out: Path
    source: dict[str, Any]  # the list entry's other fields (Wen's index/url, Webster's type)


def write_json(path: Path, payload: Any) -> None:
    """``payload`` as indented JSON, atomically; what JSON cannot hold (paths) as ``str``."""
    write_json_atomically(path, payload, default=str)


def save_png(image: Any, path: Path) -> None:
    """A PIL image, or ``(H, W, 3)`` uint8 array, as PNG."""
    with needs("siss-stable-diffusion"):
        from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.fromarray(image)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def read_json(path: Path) -> Any:
    """What ``write_json`` wrote (``config.json``, ``split.json``, ``metrics.json``, ...)."""
    return json.loads(path.read_text())


def image_grid(images: torch.Tensor, marks: torch.Tensor | None = None) -> Any:
    """A ``make_image_grid`` of uint8 ``(N, 3, H, W)``; ``marks`` (N,) bool frames those images
    red (memorized) and the others grey."""
    with needs("siss-stable-diffusion"):
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


def training_config(args: argparse.Namespace, job: Job) -> dict[str, Any]:
    """The settings a run's outputs depend on, JSON-safe, per flag."""
    values = {**vars(args), "prompt": job.prompt, "train_prompt": job.train_prompt}
    values["reference_image"] = None if job.reference is None else str(job.reference)
    keys = GENERATION_FLAGS + SPLIT_FLAGS + TRAINING_FLAGS
    return {k: (str(values[k]) if isinstance(values[k], Path) else values[k]) for k in keys}


def differing(saved: dict[str, Any], current: dict[str, Any], keys: Sequence[str]) -> list[str]:
    """``--flag (saved X, now Y)`` for every flag of ``keys`` that changed."""
    return [
        f"--{k} (saved {saved.get(k)!r}, now {current.get(k)!r})"
        for k in keys
        if saved.get(k) != current.get(k)
    ]


def check_out(args: argparse.Namespace, job: Job) -> None:
    """Refuse an ``--output_dir`` that holds another experiment's images or run, naming the
    flags (before the pipeline is loaded)."""
    config = training_config(args, job)
    path = job.out / "config.json"
    if path.is_file():
        saved = read_json(path)
        has_images = (job.out / "images").is_dir() and any((job.out / "images").iterdir())
        changed = differing(saved, config, GENERATION_FLAGS)
        if changed and has_images:
            raise FlagError(
                f"--output_dir {job.out} holds images generated with other settings: "
                f"{'; '.join(changed)}. Use another --output_dir"
            )
        has_run = bool(checkpoints(job.out)) or (job.out / "metrics.json").is_file()
        changed = differing(saved, config, GENERATION_FLAGS + SPLIT_FLAGS + TRAINING_FLAGS)
        if has_run and changed and args.stage in ("run", "unlearn"):
            raise FlagError(
                f"--output_dir {job.out} holds a run with another configuration: "
                f"{'; '.join(changed)}. Resume with the saved flags, or use another --output_dir"
            )
    if (
        checkpoints(job.out)
        and args.resume_from_checkpoint is None
        and args.stage in ("run", "unlearn")
    ):
        if not (job.out / "metrics.json").is_file():
            raise FlagError(
                f"--output_dir {job.out} holds checkpoints of an unfinished run: pass "
                "--resume_from_checkpoint latest to continue it, or use another --output_dir"
            )


def prepare_out(args: argparse.Namespace, job: Job, accelerator: Any) -> None:
    """Check ``--output_dir`` again and record this run's configuration in ``config.json``."""
    check_out(args, job)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(job.out / "config.json", training_config(args, job))
    accelerator.wait_for_everyone()


def checkpoints(out: Path) -> list[Path]:
    """The checkpoints in ``out`` (``checkpoints/step-NNNNNN``), oldest first; one still being
    written (``.tmp-step-...``) is not listed."""
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def remove_checkpoints(out: Path, keep: int = 0) -> None:
    """Delete all but the newest ``keep`` checkpoints of ``out`` (0: all of them), as
    ``examples/unlearn.py``'s checkpoints are pruned (``siss._digits.state.save_checkpoint``).
    accelerate's own rotation (``ProjectConfiguration(total_limit=...)``) only prunes its
    automatically named ``checkpoint_N`` folders, not these atomically renamed ones."""
    found = checkpoints(out)
    for old in found[: max(len(found) - keep, 0)]:
        shutil.rmtree(old)
    root = out / "checkpoints"
    if root.is_dir() and not any(root.iterdir()):
        root.rmdir()  # none kept: no empty folder left behind


def save_checkpoint(
    accelerator: Any, out: Path, step: int, state: dict[str, Any], keep: int = 1
) -> None:
    """``accelerator.save_state`` into a temporary folder, renamed into place when whole;
    then all but the newest ``keep`` checkpoints (``--checkpoints_total_limit``; 1 without
    it) are removed."""
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
        for leftover in root.glob(f".tmp-{CHECKPOINT_PREFIX}*"):  # a save killed before its rename
            shutil.rmtree(leftover)
        for stale in checkpoints(out):  # past this step: an abandoned run's, never resumed
            if int(stale.name[len(CHECKPOINT_PREFIX) :]) > step:
                shutil.rmtree(stale)
        remove_checkpoints(out, keep)
    accelerator.wait_for_everyone()


def _prompt_of(entry: dict[str, Any], where: str) -> str:
    """The entry's ``prompt`` (Wen's and Webster's lists: ``caption``); a named error if none."""
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


def prompt_rows(path: Path, overfit_types: Sequence[str]) -> list[dict[str, Any]]:
    """The entries of a prompt list, one dict each: a parquet's rows of ``overfit_types``, a
    JSONL file's objects, or a text file's lines (``#`` comments and blank lines left out)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as parquet
        except ImportError:
            raise FlagError(
                f"--prompts {path}: reading a parquet file needs pyarrow (pip install pyarrow)"
            ) from None
        return records_from_columns(parquet.read_table(path).to_pydict(), str(path), overfit_types)
    try:  # utf-8-sig: a byte-order mark is not part of the first prompt
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"--prompts {path}: not UTF-8 text ({error.reason} at byte {error.start}); save it "
            "as UTF-8"
        ) from None
    if suffix in (".jsonl", ".json"):
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(
                        f"--prompts {path} line {number}: not JSON ({error})"
                    ) from None
                if not isinstance(rows[-1], dict):
                    raise ValueError(f"--prompts {path} line {number}: not a JSON object")
        return rows
    lines = [line.strip() for line in text.splitlines()]
    return [{"prompt": line} for line in lines if line and not line.startswith("#")]


def read_prompt_list(
    path: Path, out: Path, overfit_types: Sequence[str] = MEMORIZED_TYPES
) -> list[Job]:
    """The jobs of ``--prompts``: one subfolder ``NNN-slug`` of ``out`` per prompt."""
    jobs = []
    for number, row in enumerate(prompt_rows(path, overfit_types)):
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
