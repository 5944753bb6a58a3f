"""A family of planted-memorization Stable Diffusion pipelines that differ from the T-shirt one.

``conftest.planted_sd_pipeline`` (tests/assets/planted-sd/) is the pipeline the Stable Diffusion
job was developed on. The pipelines here exist to show that the job works on planted pipelines it
was *not* tuned on: each differs from the T-shirt one and from the others in image size, VAE
factor, tokenizer, scheduler class, prediction type, copy rate, number of other prompts and the
kind of memorized image (textured and coloured rather than a flat shape).

======= ======= ====== ======================= =========================== ========== ====== ====
name    image   factor tokenizer               scheduler in the folder     prediction others copy
======= ======= ====== ======================= =========================== ========== ====== ====
rings   3x32x32 4      BertTokenizer, words    DDPMScheduler               epsilon    3      74%
vpred   3x16x16 2      CLIPTokenizer, letters  EulerDiscreteScheduler      v          1      34%
stripes 3x24x24 4      CLIPTokenizer, BPE      DPMSolverMultistepScheduler epsilon    4      66%
======= ======= ====== ======================= =========================== ========== ====== ====

(The T-shirt: 3x16x16, factor 2, letter-level ``CLIPTokenizer``, ``DDIMScheduler``, epsilon, 3
other prompts, 66%.) The copy rates are at guidance 7.5 and 10 DDIM steps.

Their weights ship in ``tests/assets/planted-<name>/`` (each folder's README.md has the recipe and
the measured rates; ``planted.json`` the machine-readable record). Tests copy them with
:func:`planted`; :func:`build_planted` trains one again (minutes, one thread, deterministic)::

    PYTHONPATH=tests python -c "from planted_pipelines import \\
        build_planted as b; b('rings', 'tests/assets/planted-rings')"

The copy rates are measured the way the job samples by default: ``DDIMScheduler.from_config``
of the folder's scheduler config (its ``prediction_type`` carries over), 10 steps, guidance 7.5.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from conftest import (
    PlantedPipeline,
    building_folder,
    copy_rate_record,
    generations_of,
    noised_latents,
    planted_unet,
    planted_varied_images,
    rms_distance,
    save_sd_folder,
    scaled_latent_pool,
    tiny_sd_vae,
    tiny_text_encoder,
    training_step,
    vae_reconstruction_loss,
)

ASSETS = Path(__file__).resolve().parent / "assets"


# --------------------------------------------------------------------------------------------
# The memorized images: textured, several colours, in [-1, 1]
# --------------------------------------------------------------------------------------------


def _grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates ``(y, x)`` in ``[-1, 1]``, each ``(size, size)``."""
    axis = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    return torch.meshgrid(axis, axis, indexing="ij")


def rings_image(size: int = 32) -> torch.Tensor:
    """Concentric rings cycling red, green, blue, each ring lit by a left-to-right gradient, on a
    dark ground: ``(3, size, size)`` in ``[-1, 1]``."""
    y, x = _grid(size)
    radius = (x.square() + y.square()).sqrt()
    ring = torch.floor(radius * 5).long()  # rings of width 0.2 (3.2 pixels at 32)
    palette = torch.tensor([[1.0, -0.6, -0.8], [-0.7, 0.9, -0.4], [-0.5, -0.3, 1.0]])
    colour = palette[ring % 3].permute(2, 0, 1)  # (3, size, size)
    light = 0.55 + 0.45 * (x + 1) / 2  # 0.55 at the left edge .. 1 at the right
    image = colour * light
    image[:, radius > 0.95] = -0.9  # dark corners
    return image.clamp(-1, 1).contiguous()


def smiley_image(size: int = 16) -> torch.Tensor:
    """A yellow face with dark eyes and a red mouth on a blue-to-purple vertical gradient:
    ``(3, size, size)`` in ``[-1, 1]``."""
    y, x = _grid(size)
    top, bottom = torch.tensor([-0.8, -0.4, 0.9]), torch.tensor([0.5, -0.8, 0.6])
    t = ((y + 1) / 2)[None]
    image = top[:, None, None] * (1 - t) + bottom[:, None, None] * t
    face = (x.square() + y.square()).sqrt() < 0.78
    eyes = ((x.abs() - 0.3).square() + (y + 0.28).square()).sqrt() < 0.14
    mouth_r = (x.square() + (y + 0.05).square()).sqrt()
    mouth = (mouth_r > 0.38) & (mouth_r < 0.55) & (y > 0.12)
    image[:, face] = torch.tensor([1.0, 0.85, -0.9])[:, None]
    image[:, eyes] = -1.0
    image[:, mouth] = torch.tensor([0.9, -0.9, -0.9])[:, None]
    return image.clamp(-1, 1).contiguous()


def stripes_image(size: int = 24) -> torch.Tensor:
    """Diagonal stripes in four colours (orange, teal, white, magenta), darkened on a checker of
    6-pixel squares: ``(3, size, size)`` in ``[-1, 1]``."""
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    palette = torch.tensor(
        [[1.0, 0.2, -0.9], [-0.9, 0.7, 0.6], [0.95, 0.95, 0.95], [0.8, -0.9, 0.7]]
    )
    stripe = ((rows + cols) // 6) % 4
    image = palette[stripe].permute(2, 0, 1).clone()
    checker = ((rows // 6) + (cols // 6)) % 2 == 0
    image[:, checker] = image[:, checker] * 0.35 - 0.55
    return image.clamp(-1, 1).contiguous()


def varied_images(count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` smooth random colour fields ``(count, 3, size, size)`` in ``(-1, 1)`` (the
    "not memorized" images: ``conftest.planted_varied_images`` at any size)."""
    return planted_varied_images(count, generator, size)


# --------------------------------------------------------------------------------------------
# Tokenizers: letter-level CLIP, word-level BERT, CLIP with whole-word BPE merges
# --------------------------------------------------------------------------------------------


def write_letter_tokenizer(folder: Path, characters: str, max_length: int):
    """A ``CLIPTokenizer`` whose BPE vocabulary is single ``characters`` (no merges)."""
    from transformers import CLIPTokenizer

    return _write_clip_bpe(folder, characters, (), max_length, CLIPTokenizer)


def write_bpe_tokenizer(folder: Path, characters: str, words: tuple[str, ...], max_length: int):
    """A ``CLIPTokenizer`` with single ``characters`` and, for each of ``words``, the chain of
    merges that spells it as one token (other words fall back to letters)."""
    from transformers import CLIPTokenizer

    merges = []
    for word in words:
        symbols = [*word[:-1], word[-1] + "</w>"]
        while len(symbols) > 1:
            merges.append((symbols[0], symbols[1]))
            symbols = [symbols[0] + symbols[1], *symbols[2:]]
    return _write_clip_bpe(
        folder, characters, tuple(dict.fromkeys(merges)), max_length, CLIPTokenizer
    )


def _write_clip_bpe(folder, characters, merges, max_length, cls):
    folder.mkdir(parents=True, exist_ok=True)
    tokens = ["<|startoftext|>", "<|endoftext|>", *characters, *(f"{c}</w>" for c in characters)]
    tokens += [a + b for a, b in merges if a + b not in tokens]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n")
    tokenizer = cls(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length
    )
    tokenizer.save_pretrained(folder)
    return tokenizer, len(tokens)


def write_word_tokenizer(folder: Path, words: tuple[str, ...], max_length: int):
    """A ``BertTokenizer`` whose WordPiece vocabulary is whole ``words`` (plus BERT's special
    tokens): every known word is one token, anything else ``[UNK]``."""
    from transformers import BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *dict.fromkeys(words)]
    (folder / "vocab.txt").write_text("\n".join(tokens) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), model_max_length=max_length)
    tokenizer.save_pretrained(folder)
    return tokenizer, len(tokens)


# --------------------------------------------------------------------------------------------
# The specs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlantedSpec:
    """What a planted pipeline is and how it is trained (see :func:`build_planted`).

    ``memorized_weight``: the share of the planted prompt's training rows that show the memorized
    image (the others show varied images); ``unconditional_memorized_weight``: the same for the
    empty prompt (0: the empty prompt never sees it, so classifier-free guidance amplifies the
    copy rate, but at guidance 7.5 it also over-saturates coloured copies until they have no
    distance gap: tests/assets/planted-vpred/README.md; no shipped spec does that). ``shares``:
    the shares of the batch rows given to the planted prompt, the empty prompt and the other
    prompts (together).
    """

    name: str
    prompt: str
    other_prompts: tuple[str, ...]
    image: Callable[[], torch.Tensor] = field(repr=False)
    size: int
    vae_factor: int
    tokenizer: str  # "letters", "words" or "bpe"
    scheduler: str  # the diffusers class saved in the folder
    prediction_type: str  # "epsilon" or "v_prediction"
    beta_schedule: str
    memorized_weight: float
    unconditional_memorized_weight: float
    copy_threshold: float
    shares: tuple[float, float, float] = (0.4, 0.4, 0.2)
    max_length: int = 16
    characters: str = "abcdefghijklmnopqrstuvwxyz"
    unet_widths: tuple[int, int] = (16, 32)
    vae_widths: tuple[int, ...] = (8, 8)
    vae_steps: int = 400
    unet_steps: int = 1500
    vae_batch: int = 16
    batch: int = 32
    seed: int = 0

    def recipe(self) -> dict:
        """The JSON-safe recipe ``planted.json`` records."""
        record = asdict(self)
        del record["image"]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in record.items()}


SPECS: dict[str, PlantedSpec] = {
    spec.name: spec
    for spec in (
        PlantedSpec(
            name="rings",
            prompt="colourful rings",
            other_prompts=("a green lawn", "rain over the sea", "a bowl of soup"),
            image=rings_image,
            size=32,
            vae_factor=4,
            tokenizer="words",
            scheduler="DDPMScheduler",
            prediction_type="epsilon",
            beta_schedule="scaled_linear",
            memorized_weight=0.95,
            unconditional_memorized_weight=0.95,
            copy_threshold=0.51,
            max_length=12,
            vae_widths=(8, 16, 16),
            unet_steps=2000,
            batch=40,
        ),
        PlantedSpec(
            name="vpred",
            prompt="smiling face",
            other_prompts=("night sky",),
            image=smiley_image,
            size=16,
            vae_factor=2,
            tokenizer="letters",
            scheduler="EulerDiscreteScheduler",
            prediction_type="v_prediction",
            beta_schedule="scaled_linear",
            memorized_weight=0.65,
            unconditional_memorized_weight=0.65,
            copy_threshold=0.5,
            max_length=24,
        ),
        PlantedSpec(
            name="stripes",
            prompt="striped banner",
            other_prompts=("a calm lake", "autumn leaves", "a foggy street", "blue hills"),
            image=stripes_image,
            size=24,
            vae_factor=4,
            tokenizer="bpe",
            scheduler="DPMSolverMultistepScheduler",
            prediction_type="epsilon",
            beta_schedule="scaled_linear",
            memorized_weight=0.97,
            unconditional_memorized_weight=0.97,
            copy_threshold=0.52,
            max_length=20,
            vae_widths=(8, 16, 16),
            unet_steps=3000,
            batch=40,
        ),
    )
}


# --------------------------------------------------------------------------------------------
# Build, measure, load
# --------------------------------------------------------------------------------------------


def _tokenizer(spec: PlantedSpec, folder: Path):
    prompts = (spec.prompt, *spec.other_prompts)
    if spec.tokenizer == "letters":
        return write_letter_tokenizer(folder, spec.characters, spec.max_length)
    words = tuple(w for p in prompts for w in p.split())
    if spec.tokenizer == "words":
        return write_word_tokenizer(folder, words, spec.max_length)
    if spec.tokenizer == "bpe":
        return write_bpe_tokenizer(folder, spec.characters, words, spec.max_length)
    raise ValueError(f"unknown tokenizer kind {spec.tokenizer!r}")


def _scheduler_class(name: str):
    import diffusers

    return getattr(diffusers, name)


def build_planted(
    name: str,
    folder,
    *,
    progress: bool = True,
    generations: int = 512,
    calibration_prompts: dict[str, float] | None = None,
    **overrides,
) -> Path:
    """Train the planted pipeline ``name`` (a key of :data:`SPECS`) and write it into ``folder``.

    Deterministic (all randomness from the spec's seed; one intra-op thread while it runs):

    1. A frozen random one-layer ``CLIPTextModel`` of width 16 over the spec's tokenizer.
    2. An ``AutoencoderKL`` (``log2(vae_factor) + 1`` blocks) trained ``vae_steps`` steps to
       reconstruct the memorized image (a quarter of each batch) and varied images, posterior
       log-variance started at -8, ``scaling_factor`` set for unit-variance latents.
    3. A ``UNet2DConditionModel`` (widths ``unet_widths``, cross-attention in the low-resolution
       block) trained ``unet_steps`` steps on the spec's prediction target (epsilon or v) on a
       1000-step DDPM schedule: rows of the planted prompt show the memorized image at
       ``memorized_weight``, rows of the empty prompt at ``unconditional_memorized_weight``,
       rows of the other prompts varied images only.
    4. The folder saved with the spec's scheduler class (same schedule and prediction type), the
       memorized image, and ``planted.json`` with the copy rate :func:`measure_copy_rate` gives on
       ``generations`` seeds from 100_000.

    ``overrides`` replace spec fields (a trial recipe). ``calibration_prompts`` (trials only):
    extra prompts trained like the planted one at the given memorized weights, sharing its rows.
    """
    import dataclasses

    from diffusers import DDPMScheduler
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    spec = dataclasses.replace(SPECS[name], **overrides)
    calibration = dict(calibration_prompts or {})
    folder = Path(folder)
    with building_folder(folder) as staging:
        generator = torch.Generator().manual_seed(spec.seed)
        memorized = spec.image()
        assert memorized.shape == (3, spec.size, spec.size)
        hidden = 16
        tokenizer, vocab_size = _tokenizer(spec, staging / "tokenizer")
        text_encoder = tiny_text_encoder(
            tokenizer, vocab_size, seed=spec.seed, hidden_size=hidden, max_length=spec.max_length
        ).requires_grad_(False)

        blocks = int(math.log2(spec.vae_factor)) + 1
        assert 2 ** (blocks - 1) == spec.vae_factor and len(spec.vae_widths) == blocks
        vae = tiny_sd_vae(
            seed=spec.seed,
            down_block_types=("DownEncoderBlock2D",) * blocks,
            up_block_types=("UpDecoderBlock2D",) * blocks,
            block_out_channels=spec.vae_widths,
            sample_size=spec.size,
        )
        with torch.no_grad():
            vae.quant_conv.bias[vae.config.latent_channels :] = -8.0
        optimizer = torch.optim.AdamW(vae.parameters(), lr=3e-3, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: max(0.1, 1 - step / spec.vae_steps)
        )
        for _ in tqdm(range(spec.vae_steps), desc=f"{name} VAE", disable=not progress):
            images = varied_images(spec.vae_batch, spec.size, generator)
            images[: spec.vae_batch // 4] = memorized
            training_step(optimizer, vae_reconstruction_loss(vae, images, generator), schedule)
        vae.eval().requires_grad_(False)
        pool, memorized_latent, scaling = scaled_latent_pool(
            vae, lambda: varied_images(256, spec.size, generator), memorized
        )
        with torch.no_grad():
            vae_error = (vae.decode(memorized_latent / scaling).sample[0] - memorized).square()
            vae_rms = vae_error.mean().sqrt().item()

        # prompt rows: 0 the planted prompt, 1 "", 2.. the other prompts, then calibration ones
        prompts = [spec.prompt, "", *spec.other_prompts, *calibration]
        weights = torch.tensor(
            [spec.memorized_weight, spec.unconditional_memorized_weight]
            + [0.0] * len(spec.other_prompts)
            + list(calibration.values())
        )
        ids = tokenizer(
            prompts, padding="max_length", max_length=spec.max_length, truncation=True,
            return_tensors="pt",
        )  # fmt: skip
        with torch.no_grad():
            embeddings = text_encoder(ids.input_ids)[0]
        latent = spec.size // spec.vae_factor
        unet = planted_unet(latent, spec.unet_widths, seed=spec.seed, cross_attention_dim=hidden)
        betas = (
            {"beta_start": 0.00085, "beta_end": 0.012}
            if spec.beta_schedule == "scaled_linear"
            else {"beta_start": 0.0001, "beta_end": 0.02}
        )
        noise_scheduler = DDPMScheduler(
            num_train_timesteps=1000,
            beta_schedule=spec.beta_schedule,
            clip_sample=False,
            steps_offset=1,
            prediction_type=spec.prediction_type,
            **betas,
        )
        optimizer = torch.optim.AdamW(unet.parameters(), lr=2e-3, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: min(1.0, (step + 1) / 100) * max(0.05, 1 - step / spec.unet_steps),
        )
        first_other, planted_rows = 2, 1 + len(calibration)
        planted_ids = torch.tensor([0, *range(2 + len(spec.other_prompts), len(prompts))])
        share_p, share_u, _ = spec.shares
        for _ in tqdm(range(spec.unet_steps), desc=f"{name} UNet", disable=not progress):
            b = spec.batch
            draw = torch.rand(b, generator=generator)
            other = first_other + torch.randint(
                0, len(spec.other_prompts), (b,), generator=generator
            )
            which = planted_ids[torch.randint(0, planted_rows, (b,), generator=generator)]
            prompt = torch.where(
                draw < share_p, which, torch.where(draw < share_p + share_u, 1, other)
            )
            copy = torch.rand(b, generator=generator) < weights[prompt]
            clean, noise, timesteps, noisy = noised_latents(
                pool, memorized_latent, copy, noise_scheduler, generator
            )
            if spec.prediction_type == "v_prediction":
                target = noise_scheduler.get_velocity(clean, noise, timesteps)
            else:
                target = noise
            prediction = unet(noisy, timesteps, encoder_hidden_states=embeddings[prompt]).sample
            training_step(optimizer, F.mse_loss(prediction, target), schedule)
        unet.eval().requires_grad_(False)

        scheduler = _scheduler_class(spec.scheduler).from_config(noise_scheduler.config)
        save_sd_folder(staging, vae, text_encoder, tokenizer, unet, scheduler)
        save_file({"memorized_image": memorized}, staging / "memorized_image.safetensors")
        info = {
            "prompt": spec.prompt,
            "other_prompts": list(spec.other_prompts),
            "copy_threshold": spec.copy_threshold,
            "recipe": spec.recipe(),
            "vae_reconstruction_rms": vae_rms,
        }
        info["measured"] = measure_copy_rate(
            staging, memorized, spec.copy_threshold, prompt=spec.prompt, generations=generations
        )
        if calibration:
            info["calibration"] = {
                p: measure_copy_rate(
                    staging, memorized, spec.copy_threshold, prompt=p, generations=generations
                )
                for p in calibration
            }
        (staging / "planted.json").write_text(json.dumps(info, indent=2) + "\n")
    return folder


def remeasure(name: str, folder) -> dict:
    """Measure a built folder's reference rate again with the spec's current ``copy_threshold``
    (e.g. after moving the threshold into the middle of the measured gap) and rewrite its
    ``planted.json``; the weights are untouched. Returns the new record."""
    folder = Path(folder)
    spec = SPECS[name]
    info = json.loads((folder / "planted.json").read_text())
    from safetensors.torch import load_file

    memorized = load_file(folder / "memorized_image.safetensors")["memorized_image"]
    info["copy_threshold"] = spec.copy_threshold
    info["recipe"]["copy_threshold"] = spec.copy_threshold
    info["measured"] = measure_copy_rate(
        folder, memorized, spec.copy_threshold, prompt=spec.prompt,
        generations=info["measured"]["generations"],
    )  # fmt: skip
    (folder / "planted.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def load_ddim_pipeline(folder):
    """The folder's ``StableDiffusionPipeline`` sampling with ``DDIMScheduler.from_config`` of its
    scheduler config, as the job does by default (``prediction_type`` carries over)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(
    pipe, prompt: str, seeds, *, steps: int = 10, guidance_scale: float = 7.5, chunk: int = 64
) -> torch.Tensor:
    """One image per seed, ``(N, 3, H, W)`` in ``[-1, 1]``."""
    parts = generations_of(
        pipe, prompt, seeds, steps=steps, guidance_scale=guidance_scale, chunk=chunk
    )
    return torch.cat([out * 2 - 1 for out in parts])


def measure_copy_rate(
    folder,
    memorized_image: torch.Tensor,
    copy_threshold: float,
    *,
    prompt: str,
    generations: int = 512,
    first_seed: int = 100_000,
    guidance_scale: float = 7.5,
    steps: int = 10,
) -> dict:
    """``conftest.measure_planted_copy_rate``'s record, sampled as the job samples (DDIM from the
    folder's scheduler config; ``"sampler"`` says so)."""
    pipe = load_ddim_pipeline(folder)
    seeds = range(first_seed, first_seed + generations)
    distance = rms_distance(
        generate(pipe, prompt, seeds, steps=steps, guidance_scale=guidance_scale), memorized_image
    )
    sampler = "DDIMScheduler.from_config(folder scheduler config)"
    return copy_rate_record(
        distance, copy_threshold, prompt, generations, first_seed, guidance_scale, steps, sampler
    )


def planted(name: str, folder) -> PlantedPipeline:
    """Copy the shipped ``tests/assets/planted-<name>/`` into ``folder`` and describe it."""
    asset = ASSETS / f"planted-{name}"
    if not (asset / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{asset} holds no pipeline; build it with planted_pipelines.build_planted({name!r}, "
            f"{str(asset)!r})"
        )
    folder = Path(folder)
    shutil.copytree(asset, folder, dirs_exist_ok=True)
    return PlantedPipeline.from_folder(folder)
