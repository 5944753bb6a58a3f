"""Stage 4, verify: does the model still generate the memorized image, and at what quality?

At each verification (before unlearning, every ``--verify_every`` steps, after) ``Verifier``
generates ``--verify_images`` images per prompt, the training one and the original, on the same
fresh seeds every time (never a training image's), counts the copies with the split's own rule
and gives the fraction a Clopper-Pearson interval; it adds Wen et al.'s noise-magnitude score
and, with ``--clip_model``, CLIP-IQA and CLIP score. ``verdict`` applies the paper's success
criterion (no copy among the final generations, CLIP-IQA at or above the floor throughout; "not
determined" without a quality measurement); ``finish`` writes ``metrics.json`` and the plot.
"""

from __future__ import annotations

import argparse
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from siss._files import atomic_path
from siss._optional import needs
from siss.loop import derived_seed
from siss.stable_diffusion.files import Job, image_grid, save_png, training_config, write_json
from siss.stable_diffusion.generate import generate
from siss.stable_diffusion.pipeline import (
    autocast_for,
    denoiser_of,
    guidance_conditioning,
    image_size,
    latent_channels,
)

NOISE_SCORE_NOTE = (
    "reported, never used for a decision: after unlearning it is not a memorization measure, "
    "because fine-tuning the training prompt's prediction makes it depart from the empty "
    "prompt's, which is what this score counts (benchmarks/noise_score.py, "
    "docs/stable_diffusion.md)"
)


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
        self.images: dict[str, torch.Tensor] = {}  # the newest verification's (main process)
        self.copies: dict[str, torch.Tensor] = {}
        self.quality = None
        self.quality_reason = "not measured: no --clip_model (a local CLIP folder) given"
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
            self.images[name], self.copies[name] = images, memorized
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
            second = self.detector.second_rule(images)
            if second is not None:  # the paper's nearer-centre classifier: reported, not deciding
                row["memorized_nearer_centre"] = int(second.sum())
            if self.quality is not None:
                row.update(self.quality(images, prompt))
            else:
                row["quality"] = self.quality_reason
            entry[name] = row
            save_png(
                image_grid(images, memorized),
                self.job.out / "verify" / f"{tag or f'step-{step:05d}'}-{name}.png",
            )
        if self.accelerator.is_main_process:
            self.compare_noise_scores(entry)
        entry["wall_s"] = round(time.perf_counter() - started, 2)
        self.accelerator.wait_for_everyone()
        return entry if self.accelerator.is_main_process else {}

    def compare_noise_scores(self, entry: dict[str, Any]) -> None:
        """Each prompt's noise score against the median of the keep prompts' (``noise_ratio``):
        Wen et al. flag memorization by a score far above other prompts'. The score is reported,
        never used for a decision (``NOISE_SCORE_NOTE``)."""
        rows = [entry[name] for name in self.prompts if name in entry]
        if not rows or not isinstance(rows[0].get("noise_score"), float):
            return
        keep = [p for p in self.args.keep_prompts if p not in self.prompts.values()]
        scores = [self.noise_score(prompt).get("noise_score") for prompt in keep]
        scores = [score for score in scores if isinstance(score, float)]
        if not scores:
            return
        median = float(torch.tensor(scores).median())
        entry["noise_score_keep_median"] = median
        entry["noise_score_note"] = NOISE_SCORE_NOTE
        for row in rows:
            if median > 0:
                row["noise_ratio"] = row["noise_score"] / median

    @torch.no_grad()
    def noise_score(self, prompt: str) -> dict[str, Any]:
        """Wen et al.'s ``||eps(x_t, prompt) - eps(x_t, "")||`` averaged over the first
        ``--noise_steps`` guided DDIM steps, per generation; its mean and standard error."""
        args = self.args
        if args.noise_generations == 0:
            return {"noise_score": "not measured: --noise_generations 0"}
        from siss.adapters.prompts import prompt_conditioning
        from siss.audit.memorization import noise_magnitude_score

        _, denoiser = denoiser_of(self.pipe)
        device = self.accelerator.device
        cond = prompt_conditioning(self.pipe, prompt, device=device, dtype=denoiser.dtype)
        embeds = cond.conditional["encoder_hidden_states"]
        null = cond.unconditional["encoder_hidden_states"]
        guidance = guidance_conditioning(self.pipe, args)  # Flux-dev's guidance embedding
        extra = {k: v for k, v in cond.conditional.items() if k != "encoder_hidden_states"}
        null_extra = {k: v for k, v in cond.unconditional.items() if k != "encoder_hidden_states"}
        extra, null_extra = {**extra, **guidance}, {**null_extra, **guidance}
        channels = latent_channels(self.pipe)
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


def verdict(history: list[dict[str, Any]], which: str, floor: float) -> tuple[str | None, str]:
    """The paper's success (Fig. 6): 0 memorized among the final generations and mean CLIP-IQA
    at least ``floor`` at every verification; and every keep prompt in its band at the end.
    ``(True/False/None, why)``; ``None``: not determined (quality not measured)."""
    final = history[-1].get(which)
    if final is None:
        return None, f"no {which} prompt"
    if final["memorized"] > 0:
        return False, (
            f"failed: {final['memorized']} of {final['total']} final generations are still "
            "memorized"
        )
    outside = [
        f"{prompt!r} ({row['relative']:.2f} > {row['band']:g})"
        for prompt, row in history[-1].get("keep", {}).items()
        if not row["in_band"]
    ]
    if which == "train" and outside:
        return False, (
            f"failed: 0 of {final['total']} memorized, but keep prompts left their band: "
            + ", ".join(outside)
        )
    scores = [entry[which].get("clip_iqa") for entry in history if which in entry]
    if any(score is None for score in scores):
        return None, (
            f"not determined: 0 of {final['total']} memorized, but quality was not measured "
            "(give --clip_model)"
        )
    worst = min(scores)
    if worst < floor:
        return False, f"failed: CLIP-IQA fell to {worst:.3f}, below the floor {floor:g}"
    return True, f"success: 0 of {final['total']} memorized, CLIP-IQA >= {worst:.3f} throughout"


def save_plot(history: list[dict[str, Any]], path: Path, floor: float, title: str) -> None:
    """``metrics.png``: the memorized fraction (with its interval) and CLIP-IQA against the
    step, for each prompt; matplotlib's Agg backend (no display needed)."""
    with needs("siss-stable-diffusion"):
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
        right.text(0.5, 0.5, "quality not measured\n(no --clip_model)", ha="center",
                   va="center", transform=right.transAxes)  # fmt: skip
        right.set_axis_off()
    fig.suptitle(title[:90])
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def finish(args: argparse.Namespace, job: Job, result: dict[str, Any], split: Any) -> dict:
    """The finished run's outputs: the before and after grids, the verdicts, ``metrics.json``
    (returned) and ``metrics.png``."""
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
