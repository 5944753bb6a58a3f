"""Stage 2, split: the generated images into the memorized copies (A) and the rest (X \\ A).

``siss.audit.split.memorization_split`` decides: by the distance to ``--reference_image`` when
the training image is at hand, else by the paper's 2-means rule; on pixels, VAE latents or an
image encoder's features (``--features``). ``split.json`` records the rule in words, its
statistics and every image's score, and a grid shows each side. A prompt the split finds not
memorized, or memorized in every image (no X \\ A to keep), stops here with ``StopJob`` naming
the flag that would change it. The same rule applied to new images is the verification's
detector.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from siss._cli import FlagError
from siss.stable_diffusion.files import (
    SPLIT_FLAGS,
    Job,
    StopJob,
    image_grid,
    read_json,
    save_png,
    training_config,
    write_json,
)
from siss.stable_diffusion.pipeline import to_signed


def load_reference(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """``(1, 3, H, W)`` in [-1, 1]; a named error when it is not the generated size."""
    image = read_reference(path)
    height, width = image.shape[-2:]
    if (height, width) != size:
        raise FlagError(
            f"--reference_image {path} is {width}x{height} but the pipeline "
            f"generates {size[1]}x{size[0]} images: resize or crop it to {size[1]}x{size[0]}"
        )
    return image[None] * 2 - 1


def read_reference(path: Path) -> torch.Tensor:
    """``--reference_image`` as ``(3, H, W)`` in [0, 1] (``siss._images.read_image``, 8 or 16
    bits); ``FlagError`` naming the flag for a file that is no image."""
    from siss._images import read_image

    try:
        return read_image(path, 3, package="siss-stable-diffusion")
    except (ValueError, OSError) as error:
        raise FlagError(f"--reference_image {path}: {error}") from None


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
        payload = {**split.to_dict(), "threshold_given": args.threshold is not None}
        write_json(path, {**payload, "settings": settings})
        save_split_grids(images, split.memorized.bool().cpu(), job.out)
        detector = CopyRule(split, features or pixel_features)

    accelerator.wait_for_everyone()
    payload = read_json(path)
    check_split(payload, job)
    if split is None:
        split = SavedSplit(payload)
    return split, detector


class CopyRule:
    """The split's rule applied to new uint8 images ``(N, 3, H, W)``: ``(N,)`` bool, True for a
    copy (``MemorizationSplit.classify``: the distance to the memorized centre below the split's
    threshold). One rule decides the split, every verification and the stop."""

    def __init__(self, split: Any, features: Any):
        self.split, self.features = split, features

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.features(to_signed(chunk)) for chunk in images.split(64)])

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.split.classify(self._features(images)).bool().cpu()

    def second_rule(self, images: torch.Tensor) -> torch.Tensor | None:
        """The paper's k-means classifier (the nearer of the two centres), reported beside the
        rule and never deciding; ``None`` where the split had no clustering."""
        if self.split.centres is None:
            return None
        return self.split.classify_nearer_centre(self._features(images)).bool().cpu()


class SavedSplit:
    """What the other processes need of the split: the ``(N,)`` bool mask (from split.json)."""

    def __init__(self, payload: dict[str, Any]):
        self.memorized = torch.tensor(payload["memorized"], dtype=torch.bool)


def check_split(payload: dict[str, Any], job: Job) -> None:
    """``StopJob`` naming the flag to change when ``split.json`` found no copy, or nothing but
    copies (SISS needs both A and X \\ A)."""
    memorized, keep = payload["counts"]["memorized"], payload["counts"]["not_memorized"]
    grids = f"see {job.out}/split_memorized.png and split_not_memorized.png"
    if not payload.get("found", True) or memorized == 0:
        if payload.get("rule") != "reference":
            how = "pass --reference_image (the training image), or raise --tightness"
        elif payload.get("metric") == "cosine":
            how = "give --threshold (a similarity to the reference; lower it to find more)"
        else:
            how = "give --threshold (a distance to the reference; raise it to find more)"
        raise StopJob(
            f"no memorization found among the {memorized + keep} images of {job.train_prompt!r}: "
            f"{payload.get('reason', '')} ({grids}); if it is memorized, {how}"
        )
    if keep == 0:
        if payload.get("threshold_given"):
            which = "lower" if payload.get("metric") != "cosine" else "raise"
            how = f"if some are not copies, {which} --threshold ({payload.get('threshold'):.4g}); "
        else:
            how = ""
        raise StopJob(
            f"all {memorized} images of {job.train_prompt!r} were called copies of the memorized "
            f"image: {how}with no image to keep, SISS has no X \\ A; use a modified, partially "
            f"memorized --train_prompt (the paper's), or raise --num_images ({grids})"
        )


def save_split_grids(images: torch.Tensor, memorized: torch.Tensor, out: Path) -> None:
    """``split_memorized.png`` and ``split_not_memorized.png``: up to 64 images of each side."""
    for name, mask in (("split_memorized", memorized), ("split_not_memorized", ~memorized)):
        save_png(image_grid(images[mask][:64]), out / f"{name}.png")
