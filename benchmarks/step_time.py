"""SISS step time against a plain diffusers fine-tuning step of the same model and batch.

The point of SISS is one forward pass per step (the paper, §4): a SISS step should cost what a
plain denoising fine-tuning step costs. This script times both on a small ``UNet2DModel`` with
``DDPMScheduler``, interleaved pair by pair so that machine noise hits both alike, and prints the
medians, their spread and the SISS/plain ratio (target <= 1.05).

    python -m benchmarks.step_time                  # CPU, 32x32x3, batch 16
    python -m benchmarks.step_time --device cuda --batch-size 64 --resolution 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel

from siss import SISSLoss


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.step_time", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--channels", type=int, nargs="+", default=[32, 64, 64])
    parser.add_argument("--pairs", type=int, default=25, help="timed (plain, SISS) step pairs")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    return parser.parse_args(argv)


def make_model(channels: list[int], resolution: int, device: torch.device) -> UNet2DModel:
    blocks = len(channels)
    return UNet2DModel(
        sample_size=resolution,
        in_channels=3,
        out_channels=3,
        block_out_channels=tuple(channels),
        layers_per_block=1,
        down_block_types=("DownBlock2D",) * (blocks - 1) + ("AttnDownBlock2D",),
        up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (blocks - 1),
        norm_num_groups=8,
    ).to(device)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = make_model(args.channels, args.resolution, device)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    loss_fn = SISSLoss(scheduler.alphas_cumprod, lam=0.5, superfactor=0.1).to(device)
    shape = (args.batch_size, 3, args.resolution, args.resolution)
    x0 = torch.rand(shape, device=device) * 2 - 1
    a0 = torch.rand(shape, device=device) * 2 - 1
    generator = torch.Generator(device).manual_seed(args.seed)

    def plain_step() -> None:
        noise = torch.randn(shape, device=device, generator=generator)
        timesteps = torch.randint(0, 1000, (shape[0],), device=device, generator=generator)
        noisy = scheduler.add_noise(x0, noise, timesteps)
        prediction = model(noisy, timesteps).sample
        F.mse_loss(prediction.float(), noise.float()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def siss_step() -> None:
        draw = loss_fn.sample(x0, a0, generator=generator)
        prediction = model(draw.noisy, draw.timesteps).sample
        loss_fn(prediction, draw).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def timed(step) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(args.warmup):
        plain_step()
        siss_step()
    plain, siss, ratios = [], [], []
    for pair in range(args.pairs):
        # alternate which goes first so that neither always follows the other
        if pair % 2:
            s, p = timed(siss_step), timed(plain_step)
        else:
            p, s = timed(plain_step), timed(siss_step)
        plain.append(p)
        siss.append(s)
        ratios.append(s / p)

    def spread(values: list[float]) -> tuple[float, float]:
        q = statistics.quantiles(values, n=4)
        return q[0], q[2]

    result = {
        "device": str(device),
        "batch": list(shape),
        "pairs": args.pairs,
        "plain_median_ms": 1e3 * statistics.median(plain),
        "siss_median_ms": 1e3 * statistics.median(siss),
        "ratio_median": statistics.median(ratios),
        "ratio_iqr": spread(ratios),
        "ratio_of_medians": statistics.median(siss) / statistics.median(plain),
    }
    if args.json:
        print(json.dumps(result))
    else:
        p_lo, p_hi = spread(plain)
        s_lo, s_hi = spread(siss)
        r_lo, r_hi = result["ratio_iqr"]
        print(f"device {device}, batch {tuple(shape)}, {args.pairs} interleaved pairs")
        print(
            f"plain diffusers step : {result['plain_median_ms']:8.1f} ms  "
            f"(IQR {1e3 * p_lo:.1f}–{1e3 * p_hi:.1f})"
        )
        print(
            f"SISS step            : {result['siss_median_ms']:8.1f} ms  "
            f"(IQR {1e3 * s_lo:.1f}–{1e3 * s_hi:.1f})"
        )
        print(
            f"SISS / plain         : {result['ratio_median']:8.3f}     "
            f"(IQR {r_lo:.3f}–{r_hi:.3f}; ratio of medians {result['ratio_of_medians']:.3f}; "
            "target <= 1.05)"
        )
    return result


if __name__ == "__main__":
    main()
