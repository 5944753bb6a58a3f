"""Why does Wen et al.'s noise-magnitude score rise after unlearning? (issue 22, section 6)

The score ``d(x_t) = ||eps(x_t, c) - eps(x_t, "")||`` averaged over the first steps of a guided
DDIM run (``siss.audit.memorization.noise_magnitude_score``) is what ``siss-stable-diffusion``
reports at every verification. This script compares the pipeline before unlearning with the
same pipeline after (``--lora`` folder for ``load_lora_weights``, or ``--unet`` folder of a
fine-tuned UNet), on the same seeds, and separates what moves the score:

1. **Model and trajectory.** Each model is scored on its own guided trajectory (what the job
   reports) and on the other model's (fixed ``x_t``, ``guided_trajectory`` +
   ``noise_magnitude_score(trajectory=...)``): ``after on before's x_t - before`` is the
   model's change, ``after - after on before's x_t`` the trajectory's.
2. **Which prediction moved.** On the before-model's trajectory: ``||eps_cond||`` and
   ``||eps_uncond||`` before and after, ``||delta eps_cond||``, ``||delta eps_uncond||``
   (after - before, same ``x_t``) and their cosine; and the cosine between ``delta eps_cond``
   and the before-model's ``eps_cond - eps_uncond``.
3. **What the prompts generate.** With the memorized image (``--memorized-image``, default
   ``<model>/memorized_image.safetensors`` of a planted pipeline): the share of copies (RMS
   pixel distance below ``--copy-threshold``) of the guided prompt, of the empty prompt alone
   (unguided) and of each reference prompt, before and after; and the reference prompts' own
   scores (``--reference-prompts``, default ``planted.json``'s other prompts).

Deterministic: the starting noise comes from ``--seed``; one CPU thread by default. Example
(the planted pipeline of the tests and a LoRA of ``siss-stable-diffusion``, 60 fixed steps with
the keep-prompt stop switched off, as the runs of issue 22 section 6)::

    PYTHONPATH=tests python -c "from conftest import planted_sd_pipeline as p; p('/tmp/ns/pipe')"
    siss-stable-diffusion --pretrained_model_name_or_path /tmp/ns/pipe \\
        --prompt "a photo of a tshirt" --output_dir /tmp/ns/run-lora --device cpu --threads 1 \\
        --sample_steps 10 --num_images 32 --verify_images 32 --max_train_steps 60 --until steps \\
        --train_batch_size 16 --learning_rate 1e-3 --no_progress --keep_band 1000 --keep_prompts
    python benchmarks/noise_score.py --model /tmp/ns/pipe --lora /tmp/ns/run-lora/lora \\
        --prompt "a photo of a tshirt" --out /tmp/ns/lora.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", required=True, help="the pipeline folder before unlearning")
    after = parser.add_mutually_exclusive_group(required=True)
    after.add_argument("--lora", help="LoRA folder of the unlearned model (load_lora_weights)")
    after.add_argument("--unet", help="folder of the unlearned UNet (save_pretrained)")
    parser.add_argument("--prompt", required=True, help="the unlearned prompt")
    parser.add_argument(
        "--reference-prompts",
        nargs="*",
        default=None,
        help="prompts scored for comparison (default: planted.json's other_prompts, if any)",
    )
    parser.add_argument("--out", help="JSON file of all figures (written atomically)")
    parser.add_argument("--generations", type=int, default=16, help="seeds per prompt (16)")
    parser.add_argument("--sample-steps", type=int, default=10, help="DDIM steps (10)")
    parser.add_argument("--noise-steps", type=int, default=None, help="first steps scored (all)")
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memorized-image", help="safetensors, key memorized_image, [-1, 1]")
    parser.add_argument(
        "--copy-threshold",
        type=float,
        default=None,
        help="RMS pixel distance of a copy (default: planted.json's, else 0.6)",
    )
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


def load_pipeline(model: str, lora: str | None = None, unet: str | None = None) -> Any:
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(lora)
    if unet is not None:
        folder = Path(unet)
        if (folder / "unet" / "config.json").is_file():
            folder = folder / "unet"
        pipe.unet = UNet2DConditionModel.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.unet.eval()
    return pipe


class Scorer:
    """One pipeline's noise predictions, trajectories and decoded images for a prompt."""

    def __init__(self, pipe: Any, args: argparse.Namespace):
        from siss.audit._models import resolve_schedule
        from siss.audit.memorization import _inference_indices

        self.pipe, self.args = pipe, args
        self.sched = resolve_schedule(pipe.scheduler, None, torch.device("cpu"))
        self.steps = _inference_indices(self.sched, args.sample_steps)
        self.num_steps = args.noise_steps or args.sample_steps

    def embeds(self, prompt: str) -> tuple[Tensor, Tensor]:
        from siss.adapters.prompts import prompt_conditioning

        cond = prompt_conditioning(self.pipe, prompt, device="cpu", dtype=torch.float32)
        return (
            cond.conditional["encoder_hidden_states"],
            cond.unconditional["encoder_hidden_states"],
        )

    def kwargs(self, guidance: float | None = None) -> dict[str, Any]:
        return {
            "num_inference_steps": self.args.sample_steps,
            "num_steps": self.num_steps,
            "guidance_scale": self.args.guidance_scale if guidance is None else guidance,
        }

    def score(self, prompt: str, latents: Tensor | None, trajectory: Tensor | None = None):
        """``(G, num_steps)`` norms: own guided run from ``latents`` or a fixed trajectory."""
        from siss.audit.memorization import noise_magnitude_score

        embeds, null = self.embeds(prompt)
        return noise_magnitude_score(
            self.pipe.unet, self.pipe.scheduler, latents, embeds, null,
            return_steps=True, trajectory=trajectory, **self.kwargs(),
        )  # fmt: skip

    def trajectory(self, prompt: str, latents: Tensor, guidance: float | None = None) -> Tensor:
        """``(sample_steps, G, C, H, W)``: every ``x_t`` of the guided run (for the image)."""
        from siss.audit.memorization import guided_trajectory

        embeds, null = self.embeds(prompt)
        if prompt == "":
            embeds = null
        kwargs = self.kwargs(guidance) | {"num_steps": self.args.sample_steps}
        return guided_trajectory(
            self.pipe.unet, self.pipe.scheduler, latents, embeds, null, **kwargs
        )

    @torch.no_grad()
    def predictions(self, prompt: str, xs: Tensor) -> tuple[Tensor, Tensor]:
        """``eps(x_t, prompt)`` and ``eps(x_t, "")`` at the first ``num_steps`` of ``xs``."""
        from siss.targets import eps_from_prediction

        embeds, null = self.embeds(prompt)
        conds, nulls = [], []
        for i, index in enumerate(self.steps[: self.num_steps]):
            x = xs[i]
            g = x.shape[0]
            t = self.sched.timesteps[torch.full((g,), index)]
            gamma = self.sched.gamma[torch.full((g,), index)]
            sigma = self.sched.sigma[torch.full((g,), index)]
            kind = self.sched.prediction_type
            for emb, into in ((embeds, conds), (null, nulls)):
                out = self.pipe.unet(x, t, encoder_hidden_states=emb.expand(g, -1, -1)).sample
                into.append(eps_from_prediction(out, x, gamma, sigma, kind).double())
        return torch.stack(conds), torch.stack(nulls)

    @torch.no_grad()
    def image(self, xs: Tensor, prompt: str, guidance: float | None = None) -> Tensor:
        """The decoded image ``(G, 3, H, W)`` in ``[-1, 1]`` of the run ending at ``xs[-1]``."""
        from siss.targets import x0_from_prediction

        embeds, null = self.embeds(prompt)
        if prompt == "":
            embeds = null
        w = self.args.guidance_scale if guidance is None else guidance
        x = xs[-1]
        g = x.shape[0]
        at = torch.full((g,), self.steps[len(xs) - 1])
        t = self.sched.timesteps[at]
        out_c = self.pipe.unet(x, t, encoder_hidden_states=embeds.expand(g, -1, -1)).sample
        out_u = self.pipe.unet(x, t, encoder_hidden_states=null.expand(g, -1, -1)).sample
        guided = out_u + w * (out_c - out_u)
        x0 = x0_from_prediction(guided, x, self.sched.gamma[at], self.sched.sigma[at],
                                self.sched.prediction_type).float()  # fmt: skip
        vae = self.pipe.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        decoded = vae.decode(x0 / vae.config.scaling_factor + shift).sample
        return decoded.clamp(-1, 1)


def mean_se(values: Tensor) -> tuple[float, float]:
    """Mean and standard error over the first dimension (generations) of per-row means."""
    rows = values.reshape(values.shape[0], -1).double().mean(1)
    se = float(rows.std() / math.sqrt(len(rows))) if len(rows) > 1 else float("nan")
    return float(rows.mean()), se


def norms(x: Tensor) -> Tensor:
    """``(steps, G)`` L2 norms over the latent of ``(steps, G, ...)``."""
    return x.flatten(2).norm(dim=2)


def cosine(a: Tensor, b: Tensor) -> Tensor:
    return torch.nn.functional.cosine_similarity(a.flatten(2), b.flatten(2), dim=2)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = Path(args.model)
    planted = {}
    if (model / "planted.json").is_file():
        planted = json.loads((model / "planted.json").read_text())
    references = args.reference_prompts
    if references is None:
        references = list(planted.get("other_prompts", []))
    threshold = args.copy_threshold or planted.get("copy_threshold", 0.6)
    memorized = None
    image_path = args.memorized_image or (model / "memorized_image.safetensors")
    if Path(image_path).is_file():
        from safetensors.torch import load_file

        memorized = load_file(str(image_path))["memorized_image"].double()

    before = Scorer(load_pipeline(args.model), args)
    after = Scorer(load_pipeline(args.model, args.lora, args.unet), args)
    unet = before.pipe.unet
    h = unet.config.sample_size
    shape = (args.generations, unet.config.in_channels, h, h)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed))
    k = before.num_steps

    def copies(images: Tensor) -> dict[str, Any] | None:
        if memorized is None:
            return None
        rms = (images.double() - memorized).flatten(1).square().mean(1).sqrt()
        return {"copies": int((rms < threshold).sum()), "of": len(rms),
                "median_rms": float(rms.median())}  # fmt: skip

    result: dict[str, Any] = {
        "config": {
            "model": args.model, "lora": args.lora, "unet": args.unet, "prompt": args.prompt,
            "generations": args.generations, "sample_steps": args.sample_steps,
            "noise_steps": k, "guidance_scale": args.guidance_scale, "seed": args.seed,
            "copy_threshold": threshold, "reference_prompts": references,
        },
    }  # fmt: skip

    # 1. the score of each model on each model's trajectory
    traj = {"before": before.trajectory(args.prompt, latents),
            "after": after.trajectory(args.prompt, latents)}  # fmt: skip
    scores: dict[str, Any] = {}
    for m_name, m in (("before", before), ("after", after)):
        for t_name, xs in traj.items():
            s = m.score(args.prompt, None, trajectory=xs[:k])
            scores[f"{m_name}@{t_name}"] = {
                "mean_se": mean_se(s), "per_step": [float(v) for v in s.mean(0)],
            }  # fmt: skip
    own = before.score(args.prompt, latents)
    assert torch.allclose(own, before.score(args.prompt, None, trajectory=traj["before"][:k]))
    bb, ab = scores["before@before"]["mean_se"][0], scores["after@before"]["mean_se"][0]
    aa = scores["after@after"]["mean_se"][0]
    result["scores"] = scores
    result["decomposition"] = {
        "reported_change": aa - bb,
        "model_effect_fixed_xt": ab - bb,
        "trajectory_effect": aa - ab,
    }

    # 2. which prediction moved (on the before-model's trajectory and on the after-model's)
    moved: dict[str, Any] = {}
    for t_name, xs in traj.items():
        cb, ub = before.predictions(args.prompt, xs)
        ca, ua = after.predictions(args.prompt, xs)
        dc, du = ca - cb, ua - ub
        moved[t_name] = {
            "eps_cond_before": mean_se(norms(cb).T), "eps_cond_after": mean_se(norms(ca).T),
            "eps_uncond_before": mean_se(norms(ub).T),
            "eps_uncond_after": mean_se(norms(ua).T),
            "delta_eps_cond": mean_se(norms(dc).T), "delta_eps_uncond": mean_se(norms(du).T),
            "cos_delta_cond_delta_uncond": mean_se(cosine(dc, du).T),
            "cos_delta_cond_d_before": mean_se(cosine(dc, cb - ub).T),
            "d_before": mean_se(norms(cb - ub).T), "d_after": mean_se(norms(ca - ua).T),
            "delta_d": mean_se(norms(dc - du).T),
            "delta_eps_cond_per_step": [float(v) for v in norms(dc).mean(1)],
            "delta_eps_uncond_per_step": [float(v) for v in norms(du).mean(1)],
        }  # fmt: skip
    result["predictions"] = moved

    # 3. what the prompts generate, and the reference prompts' scores
    generate: dict[str, Any] = {}
    for m_name, m in (("before", before), ("after", after)):
        row: dict[str, Any] = {}
        xs = traj[m_name]
        row[args.prompt] = {"copies": copies(m.image(xs, args.prompt)),
                            "score": mean_se(m.score(args.prompt, latents))}  # fmt: skip
        uncond = m.trajectory("", latents, guidance=1.0)
        row[""] = {"copies": copies(m.image(uncond, "", guidance=1.0)), "score": None}
        for prompt in references:
            xs = m.trajectory(prompt, latents)
            row[prompt] = {"copies": copies(m.image(xs, prompt)),
                           "score": mean_se(m.score(prompt, latents))}  # fmt: skip
        generate[m_name] = row
    result["prompts"] = generate
    return result


def fmt(pair: Any) -> str:
    if pair is None:
        return "-"
    mean, se = pair
    return f"{mean:.3f} ± {se:.3f}" if math.isfinite(se) else f"{mean:.3f}"


def print_tables(result: dict[str, Any]) -> None:
    cfg = result["config"]
    after = cfg["lora"] or cfg["unet"]
    print(f"# {cfg['model']} -> {after}; prompt {cfg['prompt']!r}; {cfg['generations']} seeds, "
          f"{cfg['noise_steps']} of {cfg['sample_steps']} steps, guidance "
          f"{cfg['guidance_scale']:g}; mean ± SE over seeds")  # fmt: skip
    s = result["scores"]
    print("\n| noise score of \\ on trajectory of | before | after |\n|---|---|---|")
    for m in ("before", "after"):
        print(f"| {m} model | {fmt(s[f'{m}@before']['mean_se'])} "
              f"| {fmt(s[f'{m}@after']['mean_se'])} |")  # fmt: skip
    d = result["decomposition"]
    print(f"\nreported change {d['reported_change']:+.3f} = model effect on fixed x_t "
          f"{d['model_effect_fixed_xt']:+.3f} + trajectory effect "
          f"{d['trajectory_effect']:+.3f}")  # fmt: skip
    p = result["predictions"]
    print("\n| on x_t of | ‖eps_c‖ before → after | ‖eps_u‖ before → after | ‖Δeps_c‖ "
          "| ‖Δeps_u‖ | ‖Δeps_c - Δeps_u‖ | cos(Δeps_c, Δeps_u) | cos(Δeps_c, d_before) |"
          "\n|---|---|---|---|---|---|---|---|")  # fmt: skip
    for t, r in p.items():
        print(f"| {t} | {r['eps_cond_before'][0]:.3f} → {r['eps_cond_after'][0]:.3f} "
              f"| {r['eps_uncond_before'][0]:.3f} → {r['eps_uncond_after'][0]:.3f} "
              f"| {fmt(r['delta_eps_cond'])} | {fmt(r['delta_eps_uncond'])} "
              f"| {fmt(r['delta_d'])} "
              f"| {fmt(r['cos_delta_cond_delta_uncond'])} "
              f"| {fmt(r['cos_delta_cond_d_before'])} |")  # fmt: skip
    g = result["prompts"]
    print("\n| prompt | copies before | copies after | score before | score after |"
          "\n|---|---|---|---|---|")  # fmt: skip
    for prompt in g["before"]:
        b, a = g["before"][prompt], g["after"][prompt]
        c = [f"{x['copies']['copies']}/{x['copies']['of']}" if x["copies"] else "-"
             for x in (b, a)]  # fmt: skip
        label = repr(prompt) + (" (unguided)" if prompt == "" else "")
        print(f"| {label} | {c[0]} | {c[1]} | {fmt(b['score'])} | {fmt(a['score'])} |")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = measure(args)
    print_tables(result)
    if args.out:
        from siss._files import write_json_atomically

        write_json_atomically(args.out, result)
        print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
