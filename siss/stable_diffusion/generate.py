"""Stage 1, generate: ``--num_images`` images of the training prompt, and the final latent of each.

The training data of the unlearning are the model's own generations for the prompt (the paper's
synthetic data set: the LAION image itself is not at hand). Image ``i`` comes from the seed
``--seed + i`` alone, so an interrupted generation resumes per image and any number of processes
make the same images. Its final latent, the one the pipeline decodes, is kept as the training
point: exactly what the model produced, without a VAE re-encoding's error. The verification
generates with the same function, on seeds never used for training.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from siss._files import atomic_path
from siss._optional import needs
from siss.stable_diffusion.files import StopJob, save_png
from siss.stable_diffusion.pipeline import (
    autocast_for,
    denoiser_of,
    image_size,
    to_uint8,
    unpack_latents,
)


@torch.no_grad()
def decode(pipe: Any, latents: torch.Tensor) -> torch.Tensor:
    """Images ``(N, 3, H, W)`` in [-1, 1] from the denoiser's unpacked latents ``(N, C, h, w)``:
    ``latents / scaling_factor + shift_factor`` (SD3's and Flux's VAEs have a shift), decoded."""
    vae = pipe.vae
    original = vae.dtype
    # SDXL's VAE overflows in float16 (config.force_upcast): decode in float32, as its pipeline
    # does.
    dtype = torch.float32 if getattr(vae.config, "force_upcast", False) else original
    latents = latents.to(vae.device, dtype) / vae.config.scaling_factor
    if getattr(vae.config, "shift_factor", None) is not None:
        latents = latents + vae.config.shift_factor
    if dtype != original:
        vae.to(dtype)
    try:
        with torch.autocast(vae.device.type, enabled=False):
            images = vae.decode(latents, return_dict=False)[0]
    finally:
        if dtype != original:
            vae.to(original)
    return images.float().clamp(-1, 1)


@torch.no_grad()
def sample_batch(
    pipe: Any, prompt: str, seeds: Sequence[int], args: argparse.Namespace, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images ``(B, 3, H, W)`` and float32 final latents ``(B, C, h, w)`` on the CPU for
    ``seeds``, one generator each: image ``i``'s noise depends on its seed only. The latents are
    the denoiser's unpacked ones (Flux's packed output is unpacked), at ``image_size``."""
    generators = [torch.Generator(device).manual_seed(int(s)) for s in seeds]
    _, denoiser = denoiser_of(pipe)
    was_training = denoiser.training
    denoiser.eval()
    height, width = image_size(pipe)
    with autocast_for(pipe, device):
        latents = pipe(
            [prompt] * len(seeds),
            height=height,
            width=width,
            num_inference_steps=args.sample_steps,
            guidance_scale=args.guidance_scale,
            generator=generators,
            output_type="latent",
        ).images
        latents = unpack_latents(pipe, latents, (height, width))
        images = decode(pipe, latents)
    denoiser.train(was_training)
    return to_uint8(images).cpu(), latents.float().cpu()


def generate(
    pipe: Any,
    prompt: str,
    seeds: Sequence[int],
    args: argparse.Namespace,
    accelerator: Any,
    *,
    store: Path | None = None,
    desc: str = "generate",
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Images and latents for ``seeds``, the processes sharing the work.

    With ``store``, image ``i`` goes to ``store/images/{i:05d}.png`` and its latent to
    ``store/latents/{i:05d}.safetensors`` (the main process writes; an image already there is
    not generated again) and nothing is returned; else the main process gets
    ``(uint8 (N, 3, H, W), float32 latents (N, C, h, w))`` in the order of ``seeds``.
    """
    with needs("siss-stable-diffusion"):
        from accelerate.utils import gather_object
        from safetensors.torch import save_file
        from tqdm.auto import tqdm

    indices = list(range(len(seeds)))
    if store is not None:
        indices = [i for i in indices if not image_files_exist(store, i)]
    world, rank = accelerator.num_processes, accelerator.process_index
    chunk = world * args.gen_batch_size
    results: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    bar = tqdm(
        total=len(indices),
        desc=desc,
        disable=args.no_progress or not accelerator.is_main_process or not indices,
    )
    for start in range(0, len(indices), chunk):
        part = indices[start : start + chunk][rank::world]
        mine: list[tuple[int, Any, Any]] = []
        if part:
            images, latents = sample_batch(
                pipe, prompt, [seeds[i] for i in part], args, accelerator.device
            )
            mine = [(i, images[n].numpy(), latents[n].numpy()) for n, i in enumerate(part)]
        gathered = gather_object(mine) if world > 1 else mine  # on every process
        check_finite(gathered, len(seeds), prompt, desc)
        if accelerator.is_main_process:
            for i, image, latent in gathered:
                image, latent = torch.from_numpy(image), torch.from_numpy(latent)
                if store is None:
                    results[i] = (image, latent)
                    continue
                save_png(image.permute(1, 2, 0).numpy(), store / "images" / f"{i:05d}.png")
                with atomic_path(store / "latents" / f"{i:05d}.safetensors") as tmp:
                    # one key: safetensors writes several in a per-process hash order
                    metadata = {"generation": json.dumps({"prompt": prompt, "seed": int(seeds[i])})}
                    save_file({"latent": latent.contiguous()}, str(tmp), metadata=metadata)
            bar.update(len(gathered))
    bar.close()
    accelerator.wait_for_everyone()
    if store is not None or not accelerator.is_main_process:
        return None
    order = range(len(seeds))
    return (
        torch.stack([results[i][0] for i in order]),
        torch.stack([results[i][1] for i in order]),
    )


def check_finite(rows: Sequence[tuple[int, Any, Any]], total: int, prompt: str, desc: str) -> None:
    """``StopJob`` when a generation's final latent is not finite: its image would be decoded to
    black (NaN becomes 0 in uint8) and counted as no copy, a measurement of nothing. Every
    process sees the same gathered ``rows`` ``(index, image, latent)``, so all stop together."""
    import numpy as np

    bad = sum(not np.isfinite(latent).all() for _, _, latent in rows)
    if bad:
        raise StopJob(
            f"{desc}: {bad} of the {len(rows)} generations of {prompt!r} in this batch (of "
            f"{total}) have non-finite latents (NaN or inf), so nothing can be counted on "
            "them: the model's weights or its precision give non-finite outputs (a float16 "
            "overflow: --dtype float32 or bfloat16; a run that diverged: lower "
            "--learning_rate, keep --max_grad_norm)"
        )


def image_files_exist(store: Path, index: int) -> bool:
    """Whether image ``index`` and its latent are both in ``store`` (a resumed generation skips
    it; each file is written atomically, so one that exists is whole)."""
    return (store / "images" / f"{index:05d}.png").is_file() and (
        store / "latents" / f"{index:05d}.safetensors"
    ).is_file()


def load_generated(store: Path, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images ``(N, 3, H, W)`` and float32 latents ``(N, C, h, w)`` from ``store``."""
    import numpy as np

    with needs("siss-stable-diffusion"):
        from PIL import Image
        from safetensors.torch import load_file

    missing = [i for i in range(count) if not image_files_exist(store, i)]
    if missing:
        raise SystemExit(
            f"{store}: images {missing[:5]}{'...' if len(missing) > 5 else ''} are missing; run "
            "the generate stage first (same flags)"
        )
    images, latents = [], []
    for i in range(count):
        with Image.open(store / "images" / f"{i:05d}.png") as image:
            images.append(torch.from_numpy(np.asarray(image.convert("RGB")).copy()))
        latents.append(load_file(str(store / "latents" / f"{i:05d}.safetensors"))["latent"])
    return torch.stack(images).permute(0, 3, 1, 2).contiguous(), torch.stack(latents)
