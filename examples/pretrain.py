"""Pretrain the tiny digits DDPM (or rectified-flow model) that the unlearning examples start from.

This script shows the "before" half of the paper's MNIST T-Shirt experiment (Hasanaliyev et
al., 2025, Sec. 5.2) at laptop scale: an unconditional ``diffusers.UNet2DModel`` (16x16x1,
about 1M parameters) trained with epsilon prediction on scikit-learn's digits plus a T-shirt
silhouette repeated to make 1% of the set, so that the model learns to generate the T-shirt
at a measurable rate. With ``--exclude_outlier`` it trains the "retrain" gold standard on the
digits alone. The EMA weights and the scheduler configuration are saved with
``save_pretrained`` (safetensors); afterwards the script samples the model and reports how
often it produces the T-shirt with :func:`siss.metrics.generation_rate`.

``--process flow`` trains the same UNet as a rectified-flow model instead (diffusers'
``FlowMatchEulerDiscreteScheduler``, as SD3 and Flux): ``x_s = (1 - s) x_0 + s eps`` with the
model predicting the velocity ``eps - x_0``, ``s`` drawn uniformly from the scheduler's training
grid (``--flow_shift`` 1) exactly as ``siss.adapters.loss_from_scheduler``'s flow loss draws it,
so that unlearning fine-tunes the objective the model was trained on. It samples with the
scheduler's own Euler steps (``--sampler euler``, the default for flow).

Run from the repository root. Each run is about 23 minutes of CPU time on one thread for the
4000 training steps (141 epochs) plus 5 for the 2000-sample evaluation; the shipped
checkpoints took 42 minutes of wall time each, run side by side on a busy 2-core machine. The
model goes under ``outputs/pretrain/``; only an explicit ``--output_dir examples/assets/NAME``
replaces a shipped checkpoint (the way each of them was made)::

    python -m examples.pretrain                      # -> outputs/pretrain/pretrained/
    python -m examples.pretrain --exclude_outlier    # -> outputs/pretrain/retrain/
    python -m examples.pretrain --eval_only --output_dir outputs/pretrain/pretrained
    python -m examples.pretrain --process flow       # -> outputs/pretrain/flow-pretrained/
    python -m examples.pretrain --process flow --exclude_outlier   # -> .../flow-retrain/
    python -m examples.pretrain --output_dir examples/assets/pretrained   # the shipped one
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from siss._cli import (
    CommandParser,
    add_data_flags,
    add_evaluation_flags,
    add_output_flag,
    add_runtime_flags,
    add_training_flags,
    flag,
)
from siss._digits import DEFAULT_EVAL_STEPS, PROCESSES
from siss._digits.data import SHAPES, load_training_set
from siss._digits.evaluate import load_classifier, outlier_report
from siss._digits.models import (
    build_flow_scheduler,
    build_scheduler,
    build_unet,
    check_sampler,
    checkpoint_process,
    flow_training_batch,
    load_scheduler,
    sample_images,
    save_model,
)
from siss._files import write_atomically
from siss.loop import rank_generator

ASSETS = Path(__file__).resolve().parent / "assets"
CLASSIFIER = ASSETS / "digit_classifier.safetensors"
OUTPUTS = Path("outputs/pretrain")  # the default --output_dir's parent (shipped: ASSETS)


def load_data(args: argparse.Namespace, exclude_outlier: bool = False):
    """The training set the flags name: bundled digits (default), MNIST on disk, or a folder."""
    return load_training_set(
        source=args.data,
        root=args.data_root,
        outlier_path=args.outlier_image,
        size=args.resolution,
        channels=args.channels,
        exclude_outlier=exclude_outlier,
        seed=args.seed,
        outlier_shapes=getattr(args, "outlier_shapes", 1),
    )


def train(
    args: argparse.Namespace,
) -> tuple[UNet2DModel, Any, dict]:
    torch.manual_seed(args.seed)
    data = load_data(args, exclude_outlier=args.exclude_outlier)
    images = data.images
    unet = build_unet(images.shape[-1], images.shape[1])
    flow = args.process == "flow"
    scheduler = build_flow_scheduler(args.flow_shift) if flow else build_scheduler()
    if flow:
        from siss.adapters import schedule_from_scheduler

        # The unlearning losses' own schedule (siss.adapters): grid index i has noise level
        # sigma_i (descending: index 0 is pure noise) and model timestep sigma_i * T.
        flow_schedule = schedule_from_scheduler(scheduler)
    ema = EMAModel(
        unet.parameters(),
        decay=args.ema_decay,
        use_ema_warmup=True,
        power=0.75,
        model_cls=UNet2DModel,
        model_config=unet.config,
    )
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.learning_rate, weight_decay=0.0)
    warmup, steps, batch = args.lr_warmup_steps, args.max_train_steps, args.train_batch_size

    def lr_lambda(step: int) -> float:  # linear warmup then cosine decay to 0
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    if not flow:
        alphas_cumprod = scheduler.alphas_cumprod.to(torch.float32)  # read only, never mutated
    # Data order, timesteps and noise: seed + process index (rank 0, the seed itself, in a single
    # process). Model initialisation (torch.manual_seed above) stays the same on every rank.
    generator = rank_generator(args.seed)
    n = images.shape[0]
    order, cursor = torch.randperm(n, generator=generator), 0
    unet.train()
    running = None
    start = time.time()
    bar = tqdm(range(steps), desc="pretrain", disable=args.no_progress, mininterval=5)
    for _ in bar:
        if cursor + batch > n:  # new epoch, drop the last partial batch
            order, cursor = torch.randperm(n, generator=generator), 0
        x0 = images[order[cursor : cursor + batch]]
        cursor += batch
        t = torch.randint(
            0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=generator
        )
        eps = torch.randn(x0.shape, generator=generator)
        if flow:  # t is a grid index, drawn uniformly as siss.adapters' flow loss draws it
            xt, timesteps, target = flow_training_batch(flow_schedule, x0, t, eps)
            loss = F.mse_loss(unet(xt, timesteps).sample, target)
        else:
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
        "epochs": steps * batch / n,
        "final_loss_ema": running,
        "train_wall_s": round(wall, 1),
        "torch_threads": torch.get_num_threads(),
        "weights": "EMA",
        "process": args.process,
    }
    return unet, scheduler, info


def evaluate(unet: UNet2DModel, scheduler_config: dict, args: argparse.Namespace) -> dict:
    """Samples the model and measures how often it generates the T-shirt (each shape's rate
    with ``--outlier_shapes``); with the shipped digit classifier, also the IS-style score of
    the samples (10 at most) and the FID-style distance of their features to the digits'."""
    start = time.time()
    samples = sample_images(
        unet,
        scheduler_config,
        args.eval_samples,
        sampler=args.sampler,
        num_inference_steps=args.eval_steps,
        generator=torch.Generator().manual_seed(args.seed + 1),
        progress=not args.no_progress,
    )
    wall = round(time.time() - start, 1)
    classifier = load_classifier(CLASSIFIER, samples.shape[1:])
    report = outlier_report(samples, load_data(args), classifier)
    return {"sampler": args.sampler, "steps": args.eval_steps, **report, "sample_wall_s": wall}


def build_parser() -> CommandParser:
    """This script's flags (diffusers' names where diffusers has the flag) and their checks."""
    p = CommandParser(prog="python -m examples.pretrain", description=__doc__.split("\n\n")[0])
    flag(p, "--exclude_outlier", action="store_true", help="train the retrain model")
    flag(
        p,
        "--process",
        choices=PROCESSES,
        default="ddpm",
        help="ddpm (epsilon prediction, the paper's) or flow (rectified flow with diffusers' "
        "FlowMatchEulerDiscreteScheduler, velocity prediction)",
    )
    flag(
        p,
        "--flow_shift",
        type=float,
        default=1.0,
        above=0,
        help="--process flow: the scheduler's shift (1: s uniform on [0, 1])",
    )
    add_data_flags(p, outlier_help="the outlier image to plant. Default: a drawn T-shirt")
    flag(
        p,
        "--outlier_shapes",
        type=int,
        default=1,
        at_least=1,
        at_most=len(SHAPES),
        help="plant the first K of siss._digits.data.SHAPES (T-shirt, trousers, bag, ankle boot, "
        "sneaker) at 1%% each (examples/sequential.py); 1: the T-shirt alone. --exclude_outlier "
        "leaves out all K",
    )
    flag(
        p,
        "--resolution",
        old=("--size",),
        type=int,
        default=16,
        at_least=4,
        help="image side length (a multiple of 4: the UNet halves it twice)",
    )
    flag(p, "--channels", type=int, choices=(1, 3), default=1, help="image channels")
    add_output_flag(
        p,
        default=None,
        help="where the model goes. Default: outputs/pretrain/{pretrained,retrain}, "
        "outputs/pretrain/flow-{pretrained,retrain} for flow (the shipped checkpoints were made "
        "with --output_dir examples/assets/<that name>)",
    )
    add_training_flags(
        p,
        max_train_steps=4000,
        train_batch_size=64,
        learning_rate=5e-4,
        lr_warmup_steps=100,
        seed=0,
        helps={
            "learning_rate": "peak AdamW learning rate (linear warmup, then cosine to 0)",
            "seed": "seed of the model's initialisation, the data order, timesteps and noise",
        },
        old={"lr_warmup_steps": ("--warmup-steps",)},
    )
    flag(
        p,
        "--ema_decay",
        type=float,
        default=0.999,
        at_least=0,
        below=1,
        help="largest decay of the EMA of the weights that is saved (warmup power 0.75)",
    )
    evaluation = add_evaluation_flags(
        p,
        eval_samples=2000,
        samples_help="samples of the outlier-rate evaluation; 0 skips it",
        at_least=0,
        sampler_flag="--sampler",
        precision=False,
        nll=False,
    )
    flag(
        evaluation,
        "--eval_only",
        action="store_true",
        help="load --output_dir and evaluate it",
    )
    add_runtime_flags(p, device=False, threads=1)
    p.add_check(check_pretrain)
    return p


def check_pretrain(args: argparse.Namespace) -> None:
    """The checks across flags: planted shapes and their data, the resolution, the output
    folder's default, and the sampler and steps of the process (``--eval_only``: the process
    of the checkpoint in ``--output_dir``, whatever ``--process`` says)."""
    if args.outlier_shapes > 1 and (args.outlier_image is not None or args.data == "folder"):
        raise ValueError(
            f"--outlier_shapes {args.outlier_shapes}: plants drawn shapes into digits, "
            "without --outlier_image or --data folder"
        )
    if args.resolution % 4:
        raise ValueError(f"--resolution {args.resolution}: must be a multiple of 4")
    if args.output_dir is None:
        name = "retrain" if args.exclude_outlier else "pretrained"
        args.output_dir = OUTPUTS / (f"flow-{name}" if args.process == "flow" else name)
    process = args.process
    if args.eval_only:
        try:
            process = checkpoint_process(args.output_dir)
        except ValueError as error:
            raise ValueError(f"--eval_only --output_dir: {error}") from None
    args.sampler = check_sampler(process, args.sampler)
    if args.eval_steps is None:
        args.eval_steps = DEFAULT_EVAL_STEPS[process]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The checked flags of one run (``error``, exit code 2, on a bad one)."""
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    if args.eval_only:
        unet = UNet2DModel.from_pretrained(out)
        scheduler_config = load_scheduler(out).config
        info_path = out / "training_info.json"
        info = json.loads(info_path.read_text()) if info_path.exists() else {}
    else:
        unet, scheduler, info = train(args)
        save_model(out, unet, scheduler, info)
        scheduler_config = scheduler.config
        print(f"saved EMA weights to {out} ({info['train_wall_s']:.0f} s of training)")
    if args.eval_samples > 0:
        result = evaluate(unet, scheduler_config, args)
        info.setdefault("evaluations", []).append(result)
        write_atomically(out / "training_info.json", json.dumps(info, indent=2) + "\n")
        print(
            f"outlier rate {result['outlier_rate']:.4%} ({result['outlier_count']}/"
            f"{result['samples']}), 95% CI [{result['ci95_clopper_pearson'][0]:.4%}, "
            f"{result['ci95_clopper_pearson'][1]:.4%}]"
        )


if __name__ == "__main__":
    main()
