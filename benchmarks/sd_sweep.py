"""The sweep that chose the Stable Diffusion job's CPU defaults (issue 22), over planted pipelines.

For every planted pipeline (a folder with ``planted.json``: the prompt, the planted image's copy
threshold and the prompts trained without it, as ``tests/assets/planted-*`` hold) and every
setting (flags added to the command: a learning rate, ``--full``, a keep target), this runs the
documented CPU command unchanged but for the model, the prompt, the output folder and the
setting under test::

    siss-stable-diffusion --pretrained_model_name_or_path P --prompt "..." --output_dir O \\
        --device cpu --sample_steps 10 --num_images 64 --verify_images 128 \\
        --train_batch_size 16 --gradient_accumulation_steps 1 --learning_rate 1e-3 [SETTING]

then checks the result **independently of the job's own rule**: the unlearned weights are loaded
into a fresh pipeline, ``--independent_images`` images of the prompt are generated on seeds no
stage of the job used (900_000 and up), and a copy is an image whose RMS pixel distance to the
planted image is below the pipeline's recorded copy threshold. The prompts the pipeline was
trained on without the planted image (its "other prompts") are generated on 8 fixed seeds before
and after, and their drift is measured as the job measures its keep prompts (mean distance of
each seed's image from its before-image over the median distance between two before-images).
The cost of the checks is reported as the run's wall time over the same time without the checks
(what a fixed-step run of as many steps costs); with ``--cost``, each setting is also run a second
time with ``--until steps`` for the number of steps the first run took and no checks, and the
ratio of the two wall times is reported instead.

Results go to ``<out>/sweep.json`` (atomically, after every run; a rerun skips what is there)
and a Markdown table is printed. Example::

    python benchmarks/sd_sweep.py --pipelines tests/assets/planted-sd tests/assets/planted-rings \\
        --settings "lora=" "lora-3e-3=--learning_rate 3e-3" "full=--full --learning_rate 1e-4" \\
        --out outputs/sd-sweep --cost
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from siss._files import write_json_atomically

SEED = 900_000  # the independent check's first seed: beyond every range the job uses
OTHER_SEEDS = range(800_000, 800_008)


def documented_command(folder: Path, prompt: str, out: Path, setting: dict[str, Any]) -> list:
    """The documented CPU command for ``folder`` and ``prompt``, then the setting's flags (the
    later of two equal flags wins)."""
    return [
        sys.executable, "-m", "siss.stable_diffusion",
        "--pretrained_model_name_or_path", str(folder), "--prompt", prompt,
        "--output_dir", str(out), "--device", "cpu", "--sample_steps", "10",
        "--num_images", "64", "--verify_images", "128", "--train_batch_size", "16",
        "--gradient_accumulation_steps", "1", "--learning_rate", "1e-3", "--no_progress",
        *setting["flags"], *setting.get("extra", []),
    ]  # fmt: skip


def load_pipeline(folder: Path, run: Path | None, full: bool) -> Any:
    """The planted pipeline with DDIM (the job's sampler), and the unlearned weights of ``run``."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    pipe = StableDiffusionPipeline.from_pretrained(
        folder, safety_checker=None, requires_safety_checker=False
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if run is not None and full:
        pipe.unet = UNet2DConditionModel.from_pretrained(run / "unet")
    elif run is not None:
        pipe.load_lora_weights(run / "lora")
    return pipe


@torch.no_grad()
def generate(pipe: Any, prompt: str, seeds: range) -> torch.Tensor:
    """``(N, 3, H, W)`` in ``[-1, 1]``: 10 DDIM steps, guidance 7.5, one generator per seed."""
    images = []
    seeds = list(seeds)
    for start in range(0, len(seeds), 32):
        chunk = seeds[start : start + 32]
        generators = [torch.Generator().manual_seed(s) for s in chunk]
        out = pipe([prompt] * len(chunk), num_inference_steps=10, guidance_scale=7.5,
                   generator=generators, output_type="pt").images  # fmt: skip
        images.append(out * 2 - 1)
    return torch.cat(images)


def rms(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    return (first.double() - second.double()).flatten(1).square().mean(1).sqrt()


def relative_drift(before: torch.Tensor, after: torch.Tensor) -> float:
    """Mean paired distance over the median distance between two different before-images."""
    flat = before.double().flatten(1)
    pairs = torch.triu_indices(len(flat), len(flat), offset=1)
    spread = (torch.cdist(flat, flat) / flat.shape[1] ** 0.5)[pairs[0], pairs[1]].median()
    return float(rms(after, before).mean() / spread)


def independent_check(
    folder: Path, info: dict, run: Path, full: bool, count: int
) -> dict[str, Any]:
    """Copies among ``count`` fresh generations, and the other prompts' drift."""
    from safetensors.torch import load_file

    memorized = load_file(folder / "memorized_image.safetensors")["memorized_image"]
    before, after = load_pipeline(folder, None, full), load_pipeline(folder, run, full)
    distances = rms(generate(after, info["prompt"], range(SEED, SEED + count)), memorized[None])
    drift = {
        prompt: relative_drift(generate(before, prompt, OTHER_SEEDS), generate(after, prompt,
                                                                             OTHER_SEEDS))
        for prompt in info["other_prompts"]
    }  # fmt: skip
    return {
        "copies": int((distances < info["copy_threshold"]).sum()),
        "generations": count,
        "nearest": float(distances.min()),
        "other_prompts_drift": drift,
    }


def run_setting(
    folder: Path, info: dict, out: Path, setting: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    """One run of the documented command, its independent check and (``--cost``) its cost."""
    metrics_path = out / "metrics.json"
    wall = None
    if not metrics_path.is_file():
        started = time.perf_counter()
        done = subprocess.run(documented_command(folder, info["prompt"], out, setting),
                              capture_output=True, text=True)  # fmt: skip
        wall = time.perf_counter() - started
        if done.returncode:
            return {"error": done.stderr[-2000:], "wall_s": wall}
    metrics = json.loads(metrics_path.read_text())
    result = {
        "job_copies_before": metrics["before"]["train"]["memorized"],
        "job_copies_after": metrics["after"]["train"]["memorized"],
        "job_total": metrics["after"]["train"]["total"],
        "steps": metrics["stop"]["steps"],
        "stop": metrics["stop"]["text"],
        "keep": {p: round(r["relative"], 3) for p, r in metrics["after"].get("keep", {}).items()},
        "keep_in_band": all(r["in_band"] for r in metrics["after"].get("keep", {}).values()),
        "split": metrics["split"],
        "wall_s": wall,
        "train_wall_s": metrics["train_wall_s"],
        "checks_wall_s": sum(
            e.get("wall_s", 0.0) for e in metrics["history"] if e.get("check") is not None
        ),
    }
    if wall is not None:  # the same run without its checks: what a fixed-step run costs
        result["cost_ratio"] = wall / (wall - result["checks_wall_s"])
    result["independent"] = independent_check(
        folder, info, out, setting["full"], args.independent_images
    )
    if args.cost and wall is not None:
        steps = str(max(result["steps"], 1))
        extra = ["--until", "steps", "--verify_every", "0", "--max_train_steps", steps]
        fixed_out = out.with_name(out.name + "-fixed")
        command = documented_command(folder, info["prompt"], fixed_out, {**setting, "extra": extra})
        started = time.perf_counter()
        subprocess.run(command, capture_output=True, text=True)
        result["fixed_wall_s"] = time.perf_counter() - started
        result["cost_ratio"] = wall / result["fixed_wall_s"]
    return result


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| pipeline | setting | copies (job) before → after | steps | stop | independent "
        "copies | keep prompts in band (worst drift) | other prompts' worst drift | cost / "
        "fixed-step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, row in results.items():
        pipeline, setting = key.split("::")
        if "error" in row:
            lines.append(f"| {pipeline} | {setting} | error | | | | | | |")
            continue
        independent = row["independent"]
        worst_keep = max(row["keep"].values()) if row["keep"] else float("nan")
        worst_other = max(independent["other_prompts_drift"].values())
        cost = f"{row['cost_ratio']:.2f}" if row.get("cost_ratio") else "-"
        lines.append(
            f"| {pipeline} | {setting} | {row['job_copies_before']}/{row['job_total']} → "
            f"{row['job_copies_after']}/{row['job_total']} | {row['steps']} | "
            f"{row['stop'].split(':')[0]} | {independent['copies']}/{independent['generations']} "
            f"| {'yes' if row['keep_in_band'] else 'NO'} ({worst_keep:.2f}) | "
            f"{worst_other:.2f} | {cost} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipelines", nargs="+", type=Path, required=True,
                        help="planted pipeline folders (each with planted.json)")  # fmt: skip
    parser.add_argument("--settings", nargs="+", metavar="NAME=FLAGS",
                        default=["lora=", "full=--full --learning_rate 1e-4"],
                        help="each a name and the flags it adds to the command")  # fmt: skip
    parser.add_argument("--independent_images", type=int, default=128,
                        help="fresh generations of the independent copy check")  # fmt: skip
    parser.add_argument(
        "--cost",
        action="store_true",
        help="also time a fixed-step run of the same steps, without checks",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    path = args.out / "sweep.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    settings = []
    for text in args.settings:
        name, _, flags = text.partition("=")
        settings.append({"name": name, "flags": flags.split(), "full": "--full" in flags.split()})
    for folder in args.pipelines:
        info = json.loads((folder / "planted.json").read_text())
        for setting in settings:
            key = f"{folder.name}::{setting['name']}"
            if key in results and "error" not in results[key]:
                continue
            out = args.out / folder.name / setting["name"]
            print(f"{key} ...", flush=True)
            results[key] = run_setting(folder, info, out, setting, args)
            write_json_atomically(path, results)
            print(json.dumps(results[key])[:400], flush=True)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
