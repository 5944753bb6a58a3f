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
checkpoints took 42 minutes of wall time each, run side by side on a busy 2-core machine::

    python -m examples.pretrain                      # -> examples/assets/pretrained/
    python -m examples.pretrain --exclude_outlier    # -> examples/assets/retrain/
    python -m examples.pretrain --eval_only --output_dir examples/assets/pretrained
    python -m examples.pretrain --process flow       # -> examples/assets/flow-pretrained/
    python -m examples.pretrain --process flow --exclude_outlier   # -> .../flow-retrain/
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    UNet2DModel,
)
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from examples.digits import SHAPES, load_training_set, to_unit_range
from siss._cli import (
    CommandParser,
    add_output_flag,
    add_runtime_flags,
    add_training_flags,
    flag,
)
from siss._files import atomic_folder, write_atomically
from siss.loop import rank_generator
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


def build_flow_scheduler(shift: float = 1.0) -> FlowMatchEulerDiscreteScheduler:
    """Rectified flow, 1000 training grid points, ``shift`` 1 (``s`` uniform on the grid)."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


PROCESSES = ("ddpm", "flow")
VP_SAMPLERS = ("ddpm", "ddim", "dpm")
FLOW_SAMPLERS = ("euler",)
SAMPLERS = VP_SAMPLERS + FLOW_SAMPLERS
PRECISIONS = ("fp32", "bf16")  # of the network during sampling; the scheduler stays float32
# Default sampling steps per process. Flow: Euler steps on the scheduler's grid, checked on a
# 1,500-step flow model, 2,000 samples from the same noise: T-shirt count / IS-style / FID-style
# 8 / 8.83 / 22.5 at 50 steps, 9 / 8.86 / 19.0 at 200, 8 / 8.76 / 31.0 at 20. The rate and IS
# hold at 50; the FID-style score is biased up by ~3.5 there, so compare it at equal steps only.
DEFAULT_EVAL_STEPS = {"ddpm": 50, "flow": 50}
DEFAULT_SAMPLER = {"ddpm": "ddpm", "flow": "euler"}
_SCHEDULER_CLASSES = {"DDPMScheduler": "ddpm", "FlowMatchEulerDiscreteScheduler": "flow"}


def process_of(scheduler: object) -> str:
    """``"flow"`` for a ``FlowMatchEulerDiscreteScheduler``, ``"ddpm"`` for a ``DDPMScheduler``."""
    name = type(scheduler).__name__
    if name not in _SCHEDULER_CLASSES:
        raise ValueError(
            f"unsupported scheduler {name}: the digits examples train and unlearn "
            f"{' and '.join(_SCHEDULER_CLASSES)} checkpoints"
        )
    return _SCHEDULER_CLASSES[name]


def checkpoint_process(folder: Path) -> str:
    """The process of a checkpoint folder, read from its ``scheduler_config.json`` (cheap: no
    weights are loaded); ``ValueError`` naming the folder when it has none or an unknown one."""
    path = Path(folder) / "scheduler_config.json"
    if not path.is_file():
        raise ValueError(f"{folder} holds no scheduler_config.json: not a digits checkpoint")
    name = json.loads(path.read_text()).get("_class_name")
    if name not in _SCHEDULER_CLASSES:
        raise ValueError(
            f"{path} names the scheduler {name!r}; the digits examples support "
            f"{' and '.join(_SCHEDULER_CLASSES)}"
        )
    return _SCHEDULER_CLASSES[name]


def load_scheduler(folder: Path) -> DDPMScheduler | FlowMatchEulerDiscreteScheduler:
    """The training scheduler saved with a checkpoint: DDPM or rectified flow."""
    if checkpoint_process(folder) == "flow":
        return FlowMatchEulerDiscreteScheduler.from_pretrained(folder)
    return DDPMScheduler.from_pretrained(folder)


def check_sampler(process: str, sampler: str | None, flag: str = "--sampler") -> str:
    """The sampler for ``process`` (its default for ``None``); ``ValueError`` naming ``flag``
    for a sampler of the other process."""
    if sampler is None:
        return DEFAULT_SAMPLER[process]
    allowed = FLOW_SAMPLERS if process == "flow" else VP_SAMPLERS
    if sampler not in allowed:
        kind = "rectified-flow (FlowMatchEulerDiscreteScheduler)" if process == "flow" else "DDPM"
        raise ValueError(
            f"{flag} {sampler} does not apply to a {kind} model; use one of {', '.join(allowed)}"
        )
    return sampler


def inference_scheduler(scheduler_config: dict, sampler: str = "ddpm"):
    """A fresh sampling scheduler from a training config: for DDPM ``"ddpm"`` (ancestral),
    ``"ddim"`` (eta 0) or ``"dpm"`` (DPM-Solver++ 2M, diffusers' ``DPMSolverMultistepScheduler``);
    for rectified flow ``"euler"`` (``FlowMatchEulerDiscreteScheduler``'s own Euler steps)."""
    # A FlowMatchEulerDiscreteScheduler config has no betas: the two must not be mixed up.
    is_flow = "beta_start" not in scheduler_config
    if is_flow != (sampler in FLOW_SAMPLERS) and sampler in SAMPLERS:
        process = "flow" if is_flow else "ddpm"
        allowed = FLOW_SAMPLERS if is_flow else VP_SAMPLERS
        raise ValueError(
            f"`sampler` {sampler!r} does not apply to a {process} scheduler config; use one of "
            f"{', '.join(allowed)}"
        )
    if sampler == "euler":
        return FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
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
    precision: str = "fp32",
) -> torch.Tensor:
    """Draws ``(num_samples, C, H, W)`` images in ``[-1, 1]`` (see :func:`inference_scheduler`).

    Runs under ``torch.inference_mode``; ``generator`` draws the initial noise of each batch and
    the DDPM noise of every step, so a seed and a batch size give the same samples. The flow
    sampler's Euler steps are deterministic given the initial noise. ``precision="bf16"`` runs
    the network under ``torch.autocast`` in bfloat16 (2.3x faster on a CPU with AMX) while the
    scheduler's update stays in float32; its samples are not bit-identical to fp32's (the
    study's rate check compares the two on the same noise, docs/results.md)."""
    if precision not in PRECISIONS:
        raise ValueError(f"`precision` must be one of {PRECISIONS}, got {precision!r}")
    scheduler = inference_scheduler(scheduler_config, sampler)
    unet.eval()
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    device = getattr(unet, "device", torch.device("cpu"))  # a ModelMixin knows its device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    out = []
    bar = tqdm(total=num_samples, desc=f"sampling ({sampler})", disable=not progress)
    with torch.inference_mode():
        for start in range(0, num_samples, batch_size):
            n = min(batch_size, num_samples - start)
            scheduler.set_timesteps(num_inference_steps)  # resets the multistep solver's state
            x = torch.randn((n, *shape), generator=generator).to(device)
            for t in scheduler.timesteps:
                with autocast:  # eps (DDPM) or the velocity eps - x_0 (flow)
                    prediction = unet(x, t).sample.float()
                x = scheduler.step(prediction, t, x, generator=generator).prev_sample
            out.append(x.clamp(-1, 1).cpu())
            bar.update(n)
    bar.close()
    return torch.cat(out)


def _save_atomically(
    unet: UNet2DModel,
    scheduler: DDPMScheduler | FlowMatchEulerDiscreteScheduler,
    info: dict,
    out: Path,
) -> None:
    """Writes the checkpoint into a temporary sibling folder, then swaps it into place."""
    with atomic_folder(out) as tmp:
        unet.save_pretrained(tmp, safe_serialization=True)
        scheduler.save_pretrained(tmp)
        (tmp / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")


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


def flow_training_batch(
    schedule, x0: torch.Tensor, index: torch.Tensor, eps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rectified-flow training inputs: ``x_s = (1 - s) x0 + s eps`` ``(B, C, H, W)``, the model
    timesteps ``s * T`` ``(B,)`` and the velocity target ``eps - x0``, with ``s`` the noise level
    of grid ``index`` ``(B,)`` in ``schedule`` (``siss.adapters.schedule_from_scheduler``'s, the
    unlearning losses' own: index 0 is pure noise)."""
    s = schedule.sigma[index].view(-1, *([1] * (x0.dim() - 1)))
    return (1 - s) * x0 + s * eps, schedule.timesteps[index], eps - x0


def train(
    args: argparse.Namespace,
) -> tuple[UNet2DModel, DDPMScheduler | FlowMatchEulerDiscreteScheduler, dict]:
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
    if hasattr(data, "shapes"):  # --outlier_shapes K > 1: the rate of each shape (T-shirt above)
        result["shape_rates"] = {}
        for name, shape in zip(data.names, data.shapes, strict=True):
            rate = generation_rate(to_unit_range(samples), to_unit_range(shape))
            result["shape_rates"][name] = {"count": rate.count, "ci95": [rate.low, rate.high]}
    if CLASSIFIER.exists():
        classifier = DigitClassifier.from_file(CLASSIFIER)
        outliers = data.shapes if hasattr(data, "shapes") else data.outlier[None]
        digits_only = samples[~torch.stack([is_near(samples, o) for o in outliers]).any(0)]
        result["inception_score"] = is_score(classifier, digits_only, select="logits").mean
        result["fid_to_digits"] = fid_score(
            classifier, digits_only, data.images[~data.is_outlier], select="features"
        )
    return result


def is_near(samples: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``(N,)`` mask of the samples that the generation-rate detector counts as ``target``."""
    distances = l2_distances(to_unit_range(samples), to_unit_range(target))
    return distances < default_threshold(target.shape)


def add_data_flags(parser: CommandParser, *, outlier_help: str) -> None:
    """``--data``, ``--data_root`` and ``--outlier_image`` (pretrain.py's and this script's),
    checked: ``mnist`` and ``folder`` need an existing ``--data_root``; ``--outlier_image`` an
    existing file."""
    data = parser.add_argument_group("data")
    flag(
        data,
        "--data",
        choices=("sklearn", "mnist", "folder"),
        default="sklearn",
        help="training set: scikit-learn's digits, MNIST from a torchvision folder on disk "
        "(--data_root), or an image folder (--data_root)",
    )
    flag(
        data,
        "--data_root",
        type=Path,
        default=None,
        help="the MNIST or image folder of --data mnist/folder. Default: none (sklearn)",
    )
    flag(data, "--outlier_image", type=Path, default=None, help=outlier_help)

    def check(args: argparse.Namespace) -> None:
        if args.data != "sklearn":
            if args.data_root is None:
                raise ValueError(f"--data {args.data}: needs --data_root (the folder)")
            if not Path(args.data_root).is_dir():
                raise ValueError(f"--data_root {args.data_root}: no such folder")
        if args.outlier_image is not None and not Path(args.outlier_image).is_file():
            raise ValueError(f"--outlier_image {args.outlier_image}: no such file")

    parser.add_check(check)


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
        help="plant the first K of digits.SHAPES (T-shirt, trousers, bag, ankle boot, sneaker) "
        "at 1%% each (examples/sequential.py); 1: the T-shirt alone. --exclude_outlier "
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
        help="where the model goes. Default: examples/assets/{pretrained,retrain}, "
        "examples/assets/flow-{pretrained,retrain} for flow",
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
    evaluation = p.add_argument_group("evaluation")
    flag(
        evaluation,
        "--eval_samples",
        type=int,
        default=2000,
        at_least=0,
        help="samples of the outlier-rate evaluation; 0 skips it",
    )
    flag(
        evaluation,
        "--eval_steps",
        type=int,
        default=None,
        at_least=1,
        help=f"sampling steps. Default: {DEFAULT_EVAL_STEPS['ddpm']} for ddpm, "
        f"{DEFAULT_EVAL_STEPS['flow']} Euler steps for flow",
    )
    flag(
        evaluation,
        "--sampler",
        choices=SAMPLERS,
        default=None,
        help="ddpm, ddim or dpm for a DDPM model (default: ddpm); euler for a flow model",
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
        args.output_dir = ASSETS / (f"flow-{name}" if args.process == "flow" else name)
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
        _save_atomically(unet, scheduler, info, out)
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
