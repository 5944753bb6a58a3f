"""What the job watches while it unlearns: the copies on fresh seeds, and the prompts it must keep.

Unlearning runs until the memorized image is gone (``--until gone``): every ``--verify_every``
steps a **check** generates up to ``--stop_images`` images of the training prompt on seeds never
used before (a new range at every check) and counts the copies with the split's own rule,
stopping the generation at the first copy (an early check costs one batch). ``--stop_checks``
checks in a row without a copy end the run; ``--max_train_steps`` caps it.

The same check measures the **keep prompts**: ``--keep_prompts`` (default: a handful of generic
prompts) on ``--keep_images`` fixed seeds each, and the training prompt on the seeds of the
first verification whose images were not copies. A keep prompt's own copies of the memorized
image (a prompt near the training prompt can generate it too) are meant to go: only its other
seeds are watched, and a prompt with fewer than two of them is reported as not watched. A
prompt's drift is the mean RMS pixel distance (in ``[-1, 1]``) of each seed's image from the
nearest of the prompt's images before unlearning (its own seed's, unless the seeds swapped their
images), divided by the prompt's seed-to-seed spread before unlearning (the median distance
between two of its images, or between two of all the watched prompts' images where that is
larger: a prompt the model has not learned often gives one image for every seed, whose band
would otherwise have zero width): 0 when nothing moved, about 1 when each image became a
different sample. A prompt is in its band while that ratio is at most ``--keep_band``.
When a keep prompt leaves its band, the weights of the last check in band (or the starting
weights) are put back and the forget weight is halved (``siss.Unlearner.back_off``); after
``--keep_backoffs`` halvings the run stops there instead: the report says so, with the copies
that remain.

Seeds (all from ``--seed`` = s; N = ``--num_images``, V = ``--verify_images``, M =
``--keep_images``): training images s .. s+N-1; verification s+N .. s+N+V-1; keep prompts
s+N+V .. s+N+V+M-1 (the same for every prompt); check c (c = 0, 1, ...) s+N+V+M+c*S .. with S =
``--stop_images``.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch

from siss._optional import needs
from siss.stable_diffusion.files import Job
from siss.stable_diffusion.generate import generate
from siss.stable_diffusion.pipeline import to_signed

# The default --keep_band: chosen by the sweep over the planted pipelines (docs/stable_diffusion.md,
# "How the defaults were chosen").
KEEP_BAND = 0.6
DEFAULT_STOP_IMAGES = 64  # --stop_images
DEFAULT_MAX_STEPS = 200  # --max_train_steps, the cap of an --until gone run

# Prompts any text-to-image model has seen something like; on a model that does not know their
# words they still measure whether unrelated generations moved.
GENERIC_KEEP_PROMPTS = (
    "a photo of a dog",
    "a photo of a cat",
    "a city street at night",
    "an oil painting of a landscape",
)


def rms_distance(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """``(N,)`` root-mean-square pixel distances, in ``[-1, 1]`` units, between uint8 images
    ``(N, 3, H, W)`` paired by row."""
    return (to_signed(first) - to_signed(second)).flatten(1).square().mean(1).sqrt()


def seed_to_seed_spread(images: torch.Tensor) -> float:
    """The median RMS distance between two different images of ``(M, 3, H, W)`` (``M >= 2``):
    how far apart the prompt's own generations are before unlearning."""
    flat = to_signed(images).flatten(1)
    distances = torch.cdist(flat, flat) / math.sqrt(flat.shape[1])
    pairs = torch.triu_indices(len(flat), len(flat), offset=1)
    return float(distances[pairs[0], pairs[1]].median())


def drift(
    before: torch.Tensor, after: torch.Tensor, band: float, floor: float = 0.0
) -> dict[str, Any]:
    """One keep prompt's drift: how far ``after`` lies from the prompt's own images ``before``
    (uint8 ``(M, 3, H, W)``, the same seeds), relative to ``before``'s seed-to-seed spread, or
    ``floor`` where that is larger (a prompt whose generations all look alike would otherwise
    have a band of zero width); ``in_band`` when at most ``band``.

    Each after-image is measured from the nearest before-image, its own seed's or another's: a
    prompt the model has never learned (a generic prompt on a small model) can swap its seeds'
    images under a small change of the weights, which is no drift of what the prompt
    generates; an image unlike all of them is."""
    spread = max(seed_to_seed_spread(before), floor)
    signed_after = to_signed(after).flatten(1)
    signed_before = to_signed(before).flatten(1)
    nearest = torch.cdist(signed_after, signed_before).min(1).values
    moved = float(nearest.mean() / math.sqrt(signed_after.shape[1]))
    relative = moved / spread if spread > 0 else (0.0 if moved == 0 else math.inf)
    return {
        "drift": moved,
        "spread": spread,
        "relative": relative,
        "band": band,
        "in_band": relative <= band,
        "images": len(before),
    }


def seed_layout(args: argparse.Namespace) -> dict[str, int]:
    """The first seed of each range (module docstring)."""
    verify = args.seed + args.num_images
    keep = verify + args.verify_images
    return {"verify": verify, "keep": keep, "checks": keep + args.keep_images}


class Watch:
    """The checks of ``--until gone`` and the keep prompts' drift (module docstring).

    ``start(train_before, train_copies)`` records the images before unlearning (every process
    calls it; the main process passes the first verification's images of the training prompt
    and which were copies); ``check(step, index)`` is one check; ``keep_drift()`` the drift of
    every keep prompt now. Only the main process holds images and results; the decisions are
    broadcast to every process.
    """

    def __init__(
        self, args: argparse.Namespace, job: Job, pipe: Any, accelerator: Any, detector: Any
    ):
        self.args, self.job, self.pipe, self.accelerator = args, job, pipe, accelerator
        self.detector = detector
        prompts = list(args.keep_prompts)
        self.prompts = [p for p in prompts if p not in (job.train_prompt, job.prompt)]
        layout = seed_layout(args)
        self.keep_seeds = list(range(layout["keep"], layout["keep"] + args.keep_images))
        self.first_check_seed = layout["checks"]
        self.before: dict[str, torch.Tensor] = {}
        self.train_seeds: list[int] = []
        self.spread_floor = 0.0  # the spread of all watched images pooled (main process)
        self.rows: dict[str, torch.Tensor] = {}  # each keep prompt's non-copy seeds (main)
        self.not_watched: dict[str, str] = {}  # keep prompts without two non-copies: why

    def _generate(self, prompt: str, seeds: list[int], desc: str) -> torch.Tensor | None:
        result = generate(self.pipe, prompt, seeds, self.args, self.accelerator, desc=desc)
        return None if result is None else result[0]

    def start(self, train_images: torch.Tensor | None, train_copies: torch.Tensor | None) -> None:
        """The keep prompts' images before unlearning, and the training prompt's non-copies
        among the first verification's images (up to ``--keep_images`` of them)."""
        with needs("siss-stable-diffusion"):
            from accelerate.utils import broadcast_object_list

        for prompt in self.prompts:
            images = self._generate(prompt, self.keep_seeds, "keep prompts, before")
            if images is not None:
                self.before[prompt] = images
        self._find_copies()
        chosen: list[Any] = [None]
        if self.accelerator.is_main_process and train_images is not None:
            rows = (~train_copies).nonzero().flatten()[: self.args.keep_images].tolist()
            if len(rows) >= 2:
                self.before[self.job.train_prompt] = train_images[rows]
            chosen = [[self.verify_seed(row) for row in rows] if len(rows) >= 2 else []]
        if self.accelerator.num_processes > 1:
            broadcast_object_list(chosen)
        self.train_seeds = chosen[0] or []
        self._set_floor()

    def _find_copies(self) -> None:
        """The keep prompts' seeds whose images before unlearning were not copies of the
        memorized image (main process): a keep prompt that generates the memorized image too
        is meant to lose those copies, so only its other seeds are watched; with fewer than two
        of them the prompt is not watched (``not_watched`` says why)."""
        if not self.accelerator.is_main_process:
            return
        for prompt in self.prompts:
            copies = self.detector(self.before[prompt])
            self.rows[prompt] = (~copies).nonzero().flatten()
            if len(self.rows[prompt]) < 2:
                self.not_watched[prompt] = (
                    f"{int(copies.sum())} of its {len(copies)} images before unlearning were "
                    "copies of the memorized image"
                )

    def _set_floor(self) -> None:
        """The band's floor: the model's seed-to-seed spread over every watched prompt, the
        median distance between two of all their images before unlearning."""
        pooled = list(self.before.values())
        self.spread_floor = seed_to_seed_spread(torch.cat(pooled)) if pooled else 0.0

    def save(self, path: Any) -> None:
        """The images before unlearning, for a resumed run (main process; atomic)."""
        import json

        with needs("siss-stable-diffusion"):
            from safetensors.torch import save_file

        from siss._files import atomic_path

        names = list(self.before)
        tensors = {f"prompt{i}": self.before[name].contiguous() for i, name in enumerate(names)}
        # one key: safetensors writes several in a per-process hash order (files of two runs
        # with the same seed differed in their bytes)
        watched = {"prompts": names, "train_seeds": self.train_seeds}
        metadata = {"watch": json.dumps(watched)}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)

    def load(self, path: Any) -> None:
        """The images ``save`` wrote (every process reads the seeds; the main the images)."""
        import json

        with needs("siss-stable-diffusion"):
            from safetensors import safe_open

        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata()
            if "watch" in metadata:
                watched = json.loads(metadata["watch"])
            else:  # written by 0.2.0.dev0 before 2026-12-08
                watched = {key: json.loads(metadata[key]) for key in ("prompts", "train_seeds")}
            names, self.train_seeds = watched["prompts"], watched["train_seeds"]
            if self.accelerator.is_main_process:
                self.before = {name: file.get_tensor(f"prompt{i}") for i, name in enumerate(names)}
        self._find_copies()
        self._set_floor()

    def verify_seed(self, row: int) -> int:
        return seed_layout(self.args)["verify"] + row

    def keep_drift(self, tag: str) -> dict[str, dict[str, Any]]:
        """``{prompt: drift(...)}`` for every keep prompt and the training prompt's non-copies
        (main process; ``{}`` on the others)."""
        result = {}
        watched = [(p, self.keep_seeds) for p in self.prompts]
        if self.train_seeds:
            watched.append((self.job.train_prompt, self.train_seeds))
        for prompt, seeds in watched:
            images = self._generate(prompt, seeds, f"keep prompts, {tag}")
            if images is None or prompt in self.not_watched:
                continue
            before = self.before[prompt]
            rows = self.rows.get(prompt)
            if rows is not None:  # a keep prompt's non-copies only
                before, images = before[rows], images[rows]
            result[prompt] = drift(before, images, self.args.keep_band, self.spread_floor)
        return result

    def check(self, step: int, index: int) -> dict[str, Any]:
        """Check ``index`` after ``step`` steps: the copies among up to ``--stop_images`` fresh
        generations (stopping at the first copy with ``--until gone``) and the keep prompts'
        drift. Every process gets the same ``{"copies", "generated", "keep_in_band", ...}``."""
        with needs("siss-stable-diffusion"):
            from accelerate.utils import broadcast_object_list

        import time

        started = time.perf_counter()
        args = self.args
        first = self.first_check_seed + index * args.stop_images
        seeds = list(range(first, first + args.stop_images))
        chunk = args.gen_batch_size * self.accelerator.num_processes
        copies = generated = 0
        for start in range(0, len(seeds), chunk):
            images = self._generate(self.job.train_prompt, seeds[start : start + chunk], "check")
            counted = [0, 0]
            if images is not None:
                counted = [int(self.detector(images).sum()), len(images)]
            if self.accelerator.num_processes > 1:
                broadcast_object_list(counted)
            copies, generated = copies + counted[0], generated + counted[1]
            if copies and args.until != "steps":
                break  # the memorized image is not gone yet: the rest would not change that
        keep = self.keep_drift(f"step {step}")
        outside = [p for p, row in keep.items() if not row["in_band"]]
        shared = [outside]
        if self.accelerator.num_processes > 1:
            broadcast_object_list(shared)
        return {
            "step": step,
            "check": index,
            "copies": copies,
            "generated": generated,
            "first_seed": first,
            "keep": keep,
            "keep_outside": shared[0],
            "wall_s": round(time.perf_counter() - started, 2),
        }


def snapshot(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    """A CPU copy of the trained parameters, to put back if a keep prompt leaves its band."""
    return [p.detach().to("cpu", copy=True) for p in params]


@torch.no_grad()
def restore(params: list[torch.nn.Parameter], saved: list[torch.Tensor]) -> None:
    """Put a ``snapshot`` back into the parameters (each process holds the same values)."""
    for parameter, value in zip(params, saved, strict=True):
        parameter.copy_(value.to(parameter.device, parameter.dtype))
