"""Pretrain the tiny digits DDPM that the unlearning examples start from.

This script shows the "before" half of the paper's MNIST T-Shirt experiment (Hasanaliyev et
al., 2025, Sec. 5.2) at laptop scale: an unconditional ``diffusers.UNet2DModel`` (16x16x1,
about 1M parameters) trained with epsilon prediction on scikit-learn's digits plus a T-shirt
silhouette repeated to make 1% of the set, so that the model learns to generate the T-shirt
at a measurable rate. With ``--exclude-outlier`` it trains the "retrain" gold standard on the
digits alone. The EMA weights and the scheduler configuration are saved with
``save_pretrained`` (safetensors); afterwards the script samples the model and reports how
often it produces the T-shirt with :func:`siss.metrics.generation_rate`.

Run from the repository root. Each run is about 23 minutes of CPU time on one thread for the
4000 training steps (141 epochs) plus 5 for the 2000-sample evaluation; the shipped
checkpoints took 42 minutes of wall time each, run side by side on a busy 2-core machine::

    python examples/pretrain.py                      # -> examples/assets/pretrained/
    python examples/pretrain.py --exclude-outlier    # -> examples/assets/retrain/
    python examples/pretrain.py --eval-only --output-dir examples/assets/pretrained
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from digits import load_training_set, to_unit_range

from siss import rank_generator
from siss.metrics import (
    DigitClassifier,
    default_threshold,
    fid_score,
    generation_rate,
    is_score,
    l2_distances,
)

ASSETS = Path(__file__).resolve().parent / "assets"
CLASSIFIER = ASSETS / "digit_classifier.safetensors"


def build_unet(size: int = 16, channels: int = 1) -> UNet2DModel:
    """The tiny UNet: 3 resolutions (32, 64, 64 channels), one ResNet block each, attention
    only in the 4x4 middle block; about 1.06M parameters at 16x16x1."""
    return UNet2DModel(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )


def build_scheduler() -> DDPMScheduler:
    """DDPM, 1000 steps, linear betas 1e-4..0.02, epsilon prediction (as in the paper)."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        prediction_type="epsilon",
    )


SAMPLERS = ("ddpm", "ddim", "dpm")


def inference_scheduler(scheduler_config: dict, sampler: str = "ddpm"):
    """A fresh sampling scheduler from a DDPM config: ``"ddpm"`` (ancestral), ``"ddim"`` (eta 0)
    or ``"dpm"`` (DPM-Solver++ 2M, diffusers' ``DPMSolverMultistepScheduler``)."""
    if sampler == "ddpm":
        return DDPMScheduler.from_config(scheduler_config)
    if sampler == "ddim":
        return DDIMScheduler.from_config(scheduler_config)
    if sampler == "dpm":
        return DPMSolverMultistepScheduler.from_config(
            scheduler_config, algorithm_type="dpmsolver++", solver_order=2
        )
    raise ValueError(f"`sampler` must be one of {SAMPLERS}, got {sampler!r}")


def sample_images(
    unet: UNet2DModel,
    scheduler_config: dict,
    num_samples: int,
    *,
    sampler: str = "ddpm",
    num_inference_steps: int = 50,
    batch_size: int = 500,
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Draws ``(num_samples, C, H, W)`` images in ``[-1, 1]`` (see :func:`inference_scheduler`).

    Runs under ``torch.inference_mode``; ``generator`` draws the initial noise of each batch and
    the DDPM noise of every step, so a seed and a batch size give the same samples."""
    scheduler = inference_scheduler(scheduler_config, sampler)
    unet.eval()
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    out = []
    bar = tqdm(total=num_samples, desc=f"sampling ({sampler})", disable=not progress)
    with torch.inference_mode():
        for start in range(0, num_samples, batch_size):
            n = min(batch_size, num_samples - start)
            scheduler.set_timesteps(num_inference_steps)  # resets the multistep solver's state
            x = torch.randn((n, *shape), generator=generator)
            for t in scheduler.timesteps:
                eps = unet(x, t).sample
                x = scheduler.step(eps, t, x, generator=generator).prev_sample
            out.append(x.clamp(-1, 1))
            bar.update(n)
    bar.close()
    return torch.cat(out)


def _save_atomically(unet: UNet2DModel, scheduler: DDPMScheduler, info: dict, out: Path) -> None:
    """Writes the checkpoint into a temporary sibling folder, then swaps it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp creates 0700
    try:
        unet.save_pretrained(tmp, safe_serialization=True)
        scheduler.save_pretrained(tmp)
        (tmp / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}-old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def load_data(args: argparse.Namespace, exclude_outlier: bool = False):
    """The training set the flags name: bundled digits (default), MNIST on disk, or a folder."""
    return load_training_set(
        source=args.data,
        root=args.data_root,
        outlier_path=args.outlier_image,
        size=args.size,
        channels=args.channels,
        exclude_outlier=exclude_outlier,
        seed=args.seed,
    )


def train(args: argparse.Namespace) -> tuple[UNet2DModel, DDPMScheduler, dict]:
    torch.manual_seed(args.seed)
    data = load_data(args, exclude_outlier=args.exclude_outlier)
    images = data.images
    unet = build_unet(images.shape[-1], images.shape[1])
    scheduler = build_scheduler()
    ema = EMAModel(
        unet.parameters(),
        decay=args.ema_decay,
        use_ema_warmup=True,
        power=0.75,
        model_cls=UNet2DModel,
        model_config=unet.config,
    )
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)

    def lr_lambda(step: int) -> float:  # linear warmup then cosine decay to 0
        if step < args.warmup_steps:
            return (step + 1) / args.warmup_steps
        progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    alphas_cumprod = scheduler.alphas_cumprod.to(torch.float32)  # read only, never mutated
    # Data order, timesteps and noise: seed + process index (rank 0, the seed itself, in a single
    # process). Model initialisation (torch.manual_seed above) stays the same on every rank.
    generator = rank_generator(args.seed)
    n = images.shape[0]
    order, cursor = torch.randperm(n, generator=generator), 0
    unet.train()
    running = None
    start = time.time()
    bar = tqdm(range(args.steps), desc="pretrain", disable=args.no_progress, mininterval=5)
    for _ in bar:
        if cursor + args.batch_size > n:  # new epoch, drop the last partial batch
            order, cursor = torch.randperm(n, generator=generator), 0
        x0 = images[order[cursor : cursor + args.batch_size]]
        cursor += args.batch_size
        t = torch.randint(
            0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=generator
        )
        eps = torch.randn(x0.shape, generator=generator)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        loss = F.mse_loss(unet(xt, t).sample, eps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        lr_sched.step()
        ema.step(unet.parameters())
        running = loss.item() if running is None else 0.99 * running + 0.01 * loss.item()
        bar.set_postfix(loss=f"{running:.4f}")
    wall = time.time() - start
    ema.copy_to(unet.parameters())
    info = {
        "args": {
            k: str(v) if isinstance(v, Path) else v
            for k, v in vars(args).items()
            if k != "output_dir"
        },
        "train_images": n,
        "outlier_copies": int(data.is_outlier.sum()),
        "epochs": args.steps * args.batch_size / n,
        "final_loss_ema": running,
        "train_wall_s": round(wall, 1),
        "torch_threads": torch.get_num_threads(),
        "weights": "EMA",
    }
    return unet, scheduler, info


def evaluate(unet: UNet2DModel, scheduler_config: dict, args: argparse.Namespace) -> dict:
    """Samples the model and measures how often it generates the T-shirt.

    With the shipped digit classifier present, also reports the Inception-Score-style score of
    the samples (10 is the maximum for 10 classes) and the FID-style distance of their
    classifier features to the clean digits'.
    """
    generator = torch.Generator().manual_seed(args.seed + 1)
    start = time.time()
    samples = sample_images(
        unet,
        scheduler_config,
        args.eval_samples,
        sampler=args.sampler,
        num_inference_steps=args.eval_steps,
        generator=generator,
        progress=not args.no_progress,
    )
    wall = time.time() - start
    data = load_data(args)
    est = generation_rate(to_unit_range(samples), to_unit_range(data.outlier))
    result = {
        "sampler": args.sampler,
        "steps": args.eval_steps,
        "samples": est.total + est.nonfinite,
        "nonfinite_samples": est.nonfinite,
        "outlier_count": est.count,
        "outlier_rate": est.rate,
        "ci95_clopper_pearson": [est.low, est.high],
        "sample_wall_s": round(wall, 1),
    }
    if CLASSIFIER.exists():
        classifier = DigitClassifier.from_file(CLASSIFIER)
        digits_only = samples[~is_near(samples, data.outlier)]
        result["inception_score"] = is_score(classifier, digits_only, select="logits").mean
        result["fid_to_digits"] = fid_score(
            classifier, digits_only, data.images[~data.is_outlier], select="features"
        )
    return result


def is_near(samples: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``(N,)`` mask of the samples that the generation-rate detector counts as ``target``."""
    distances = l2_distances(to_unit_range(samples), to_unit_range(target))
    return distances < default_threshold(target.shape)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--exclude-outlier", action="store_true", help="train the retrain model")
    p.add_argument("--data", choices=("sklearn", "mnist", "folder"), default="sklearn")
    p.add_argument("--data-root", type=Path, default=None, help="MNIST or image folder")
    p.add_argument("--outlier-image", type=Path, default=None, help="default: a drawn T-shirt")
    p.add_argument("--size", type=int, default=16, help="image side length")
    p.add_argument("--channels", type=int, choices=(1, 3), default=1)
    p.add_argument(
        "--output-dir", type=Path, default=None, help="default assets/{pretrained,retrain}"
    )
    p.add_argument("--steps", type=int, default=4000, help="optimizer steps (default 4000)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4, help="peak AdamW learning rate")
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--eval-samples", type=int, default=2000, help="0 skips the evaluation")
    p.add_argument("--eval-steps", type=int, default=50)
    p.add_argument("--sampler", choices=SAMPLERS, default="ddpm")
    p.add_argument("--eval-only", action="store_true", help="load --output-dir and evaluate")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = p.parse_args(argv)
    if args.output_dir is None:
        args.output_dir = ASSETS / ("retrain" if args.exclude_outlier else "pretrained")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    if args.eval_only:
        unet = UNet2DModel.from_pretrained(out)
        scheduler_config = DDPMScheduler.from_pretrained(out).config
        info_path = out / "training_info.json"
        info = json.loads(info_path.read_text()) if info_path.exists() else {}
    else:
        unet, scheduler, info = train(args)
        _save_atomically(unet, scheduler, info, out)
        scheduler_config = scheduler.config
        print(f"saved EMA weights to {out} ({info['train_wall_s']:.0f} s of training)")
    if args.eval_samples > 0:
        result = evaluate(unet, scheduler_config, args)
        info.setdefault("evaluations", []).append(result)
        (out / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
        print(
            f"outlier rate {result['outlier_rate']:.4%} ({result['outlier_count']}/"
            f"{result['samples']}), 95% CI [{result['ci95_clopper_pearson'][0]:.4%}, "
            f"{result['ci95_clopper_pearson'][1]:.4%}]"
        )


if __name__ == "__main__":
    main()
