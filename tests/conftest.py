"""Shared test set-up: deterministic hypothesis runs, a DDPM schedule, tiny seeded models.

Statistical tests draw everything from seeded generators and hypothesis runs derandomized, so a
pass or a fail is reproducible: no flaky statistics.

Test modules import plain helpers with ``from conftest import fuzz_settings, tiny_unet``. That
resolves to this file only while it is the only ``conftest.py`` under ``tests/``: pytest imports
every ``conftest.py`` as the module ``conftest``, so one in a subfolder would replace this one
for every test module collected after it. Put shared fixtures and helpers here instead.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

from siss._files import atomic_folder

settings.register_profile(
    "siss",
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "siss"))

FUZZ_SCALE = float(os.environ.get("SISS_FUZZ_SCALE", "1"))


def fuzz_settings(examples: int) -> settings:
    """``settings`` of a fuzz test: ``examples`` times ``SISS_FUZZ_SCALE``, no deadline.

    The default run is seeded (the "siss" profile) and small. A nightly-style run draws fresh
    examples, many more: ``SISS_FUZZ_SCALE=40 HYPOTHESIS_PROFILE=default python -m pytest -q -k
    fuzz``. Test modules import it with ``from conftest import fuzz_settings``.
    """
    return settings(
        max_examples=max(1, round(examples * FUZZ_SCALE)),
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
        ],
    )


torch.set_num_threads(min(2, torch.get_num_threads()))


def ddpm_alphas_cumprod(num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
    """The linear DDPM schedule of Ho et al. (2020), in float64."""
    betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


@pytest.fixture
def alphas_cumprod():
    return ddpm_alphas_cumprod()


@pytest.fixture
def one_thread():
    """Run a test on one intra-op thread (opt in with ``pytest.mark.usefixtures``).

    Tiny models and ODE solves run thousands of small ops; on a busy 2-core machine two threads
    spin-wait in OpenMP's synchronisation (seen: 8 s instead of 0.05 s for a tiny UNet step).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def device():
    """Tests run on the CPU unless SISS_TEST_DEVICE names another device."""
    return torch.device(os.environ.get("SISS_TEST_DEVICE", "cpu"))


# --------------------------------------------------------------------------------------------
# Tiny diffusers models (random weights, seeded, CPU): build them from config, never download
# --------------------------------------------------------------------------------------------


def tiny_unet(seed: int | None = 0, **overrides):
    """A ``UNet2DModel`` of ~10k parameters on 1x8x8 images, built after ``manual_seed(seed)``
    (``seed=None``: from the global generator's current state).

    ``overrides`` replace or add config entries (e.g. ``sample_size=16``, ``in_channels=3``).
    """
    from diffusers import UNet2DModel

    config = {
        "sample_size": 8,
        "in_channels": 1,
        "out_channels": 1,
        "block_out_channels": (8, 16),
        "norm_num_groups": 4,
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "UpBlock2D"),
    }
    if seed is not None:
        torch.manual_seed(seed)
    return UNet2DModel(**{**config, **overrides})


def tiny_conditional_unet(seed: int | None = 0, **overrides):
    """A text-conditional ``UNet2DConditionModel`` on 4x8x8 latents (cross-attention dim 8, one
    cross-attention block each way); ``seed`` and ``overrides`` as in :func:`tiny_unet` (e.g.
    ``cross_attention_dim=16``)."""
    from diffusers import UNet2DConditionModel

    config = {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (8, 16),
        "norm_num_groups": 4,
        "layers_per_block": 1,
        "cross_attention_dim": 8,
        "attention_head_dim": 2,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    }
    if seed is not None:
        torch.manual_seed(seed)
    return UNet2DConditionModel(**{**config, **overrides})


# --------------------------------------------------------------------------------------------
# Audit: exact-score models with known answers
# --------------------------------------------------------------------------------------------


def vp_scales(scheduler, continuous=False):
    """``timesteps -> (gamma, sigma)`` of a VP scheduler: at the integer timestep (what DDIM feeds
    the model) or on ``siss.metrics.VPSchedule``'s continuous schedule (what the NLL's ODE feeds,
    ``t * (T - 1)``)."""
    from siss.metrics.nll import VPSchedule

    ac = torch.cumprod(1 - scheduler.betas.double(), 0)
    vp = VPSchedule(ac)

    def scales(timesteps):
        if continuous:
            t = timesteps[:1].detach().double() / (len(ac) - 1)
            return torch.exp(0.5 * vp.log_alpha_cumprod(t)), vp.sigma(t)
        a = ac[timesteps.detach().round().long().cpu()]
        return a.sqrt(), (1 - a).sqrt()

    return scales


def flow_scales(num_train_timesteps=1000):
    """``timesteps -> (gamma, sigma) = (1 - s, s)`` with ``s = timesteps / T`` (rectified flow)."""

    def scales(timesteps):
        s = timesteps.detach().double().cpu() / num_train_timesteps
        return 1 - s, s

    return scales


def exact_model(scales, mu, s, prediction="epsilon"):
    """The exact denoiser of data ``N(mu, s^2 I)``; ``s = 0`` is a point mass at ``mu`` (a model
    that memorised one image). With ``x_t = gamma x_0 + sigma eps`` and ``var = gamma^2 s^2 +
    sigma^2``: ``E[eps | x_t] = sigma (x_t - gamma mu) / var`` and ``E[x_0 | x_t] = mu +
    gamma s^2 (x_t - gamma mu) / var``. ``prediction``: ``"epsilon"`` or ``"flow"`` (velocity
    ``E[eps - x_0 | x_t]``)."""

    def model(x, timesteps):
        gamma, sigma = scales(timesteps)
        shape = (-1,) + (1,) * (x.dim() - 1)
        gamma = gamma.reshape(shape).to(x.device, torch.float64)
        sigma = sigma.reshape(shape).to(x.device, torch.float64)
        m = mu.to(x.device, torch.float64) if isinstance(mu, torch.Tensor) else mu
        centred = x.double() - gamma * m
        var = gamma**2 * s**2 + sigma**2
        eps = sigma * centred / var
        if prediction == "epsilon":
            return eps.to(x.dtype)
        x0 = m + gamma * s**2 * centred / var
        return (eps - x0).to(x.dtype)

    return model


@pytest.fixture
def audit_models():
    """The helpers above, as a namespace: ``audit_models.exact_model(...)`` etc."""
    import types

    return types.SimpleNamespace(
        tiny_unet=tiny_unet, vp_scales=vp_scales, flow_scales=flow_scales, exact_model=exact_model
    )


# --------------------------------------------------------------------------------------------
# Tiny text-to-image pipelines: Stable Diffusion folders built from config, saved, loaded by path
# --------------------------------------------------------------------------------------------


def write_clip_tokenizer(folder, *, max_length: int = 8):
    """A ``CLIPTokenizer`` from a local byte-level BPE vocabulary: single letters and digits, no
    merges (every word is spelt character by character), saved into ``folder``.

    Returns ``(tokenizer, vocab_size)``. ``max_length`` is the tokenizer's ``model_max_length``
    (prompts are padded or cut to it, begin and end tokens included): keep it above the length of
    the prompts a test tells apart, or two prompts that share their first letters encode alike.
    """
    import json
    from pathlib import Path

    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    characters = "abcdefghijklmnopqrstuvwxyz0123456789"
    tokens = ["<|startoftext|>", "<|endoftext|>", *characters, *(f"{c}</w>" for c in characters)]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length
    )
    tokenizer.save_pretrained(folder)
    return tokenizer, len(tokens)


def tiny_sd_pipeline(
    folder,
    *,
    seed: int = 0,
    unet=None,
    vae=None,
    text_encoder=None,
    scheduler=None,
    max_length: int = 32,
    hidden_size: int = 8,
):
    """Write a complete ``StableDiffusionPipeline`` folder (``model_index.json``, ``unet/``,
    ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``) and return its path.

    Loadable with ``StableDiffusionPipeline.from_pretrained(folder)`` and
    ``DiffusionPipeline.from_pretrained(folder)``: no safety checker, no feature extractor
    (``requires_safety_checker=False``). Random weights built after ``manual_seed(seed)`` unless
    given: a ``UNet2DConditionModel`` on 4x8x8 latents (:func:`tiny_conditional_unet`), an
    ``AutoencoderKL`` from 3x16x16 pixels to 4x8x8 latents (:func:`tiny_sd_vae`), a one-layer
    ``CLIPTextModel`` of width ``hidden_size`` (the UNet's ``cross_attention_dim``; prompt
    embeddings ``(1, max_length, hidden_size)``), a letter-by-letter ``CLIPTokenizer``
    (:func:`write_clip_tokenizer`) and a ``DDPMScheduler`` of 100 training steps. The pipeline
    generates 16x16 images (``unet.config.sample_size`` times the VAE's factor 2).
    """
    from pathlib import Path

    from diffusers import DDPMScheduler, StableDiffusionPipeline

    folder = Path(folder)
    tokenizer, vocab_size = write_clip_tokenizer(folder / "tokenizer", max_length=max_length)
    if text_encoder is None:
        text_encoder = tiny_text_encoder(
            tokenizer, vocab_size, seed=seed, hidden_size=hidden_size, max_length=max_length
        )
    if unet is None:
        unet = tiny_conditional_unet(seed=seed, cross_attention_dim=hidden_size)
    if vae is None:
        vae = tiny_sd_vae(seed=seed)
    if scheduler is None:
        scheduler = DDPMScheduler(num_train_timesteps=100, clip_sample=False, steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_sd_folder(tmp_path_factory):
    """A random-weight :func:`tiny_sd_pipeline` folder (3x16x16 images), written once for the
    session: the Stable Diffusion job's tests (tests/stable_diffusion/) read it, never write it."""
    return tiny_sd_pipeline(tmp_path_factory.mktemp("tiny-sd") / "pipe")


@pytest.fixture
def fresh_accelerate():
    """accelerate keeps one process-wide state; every run of the Stable Diffusion job in a test
    starts from none (opt in with ``pytest.mark.usefixtures``)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def tiny_text_encoder(
    tokenizer, vocab_size: int, *, seed: int = 0, hidden_size: int = 8, max_length: int = 32
):
    """A one-layer ``CLIPTextModel`` of width ``hidden_size`` for :func:`write_clip_tokenizer`'s
    vocabulary (or another tokenizer's: a BERT vocabulary's ``[CLS]`` and ``[SEP]`` stand in for
    the begin and end tokens it lacks), built after ``manual_seed(seed)``."""
    from transformers import CLIPTextConfig, CLIPTextModel

    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    torch.manual_seed(seed)
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=max_length,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.cls_token_id if bos is None else bos,
            eos_token_id=tokenizer.sep_token_id if eos is None else eos,
        )
    )


def tiny_sd_vae(seed: int = 0, **overrides):
    """An ``AutoencoderKL`` from 3x16x16 pixels to 4x8x8 latents (two blocks of width 8), built
    after ``manual_seed(seed)``; ``overrides`` replace config entries."""
    from diffusers import AutoencoderKL

    config = {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
        "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
        "block_out_channels": (8, 8),
        "latent_channels": 4,
        "norm_num_groups": 4,
        "layers_per_block": 1,
        "sample_size": 16,
    }
    torch.manual_seed(seed)
    return AutoencoderKL(**{**config, **overrides})


# --------------------------------------------------------------------------------------------
# Tiny SDXL, SD3 and Flux pipelines (prompt conditioning with pooled embeddings), from config
# --------------------------------------------------------------------------------------------


def tiny_clip_with_projection(tokenizer, vocab_size: int, *, seed: int = 0, max_length: int = 16):
    """A one-layer ``CLIPTextModelWithProjection`` of width 8 (projection 8) for
    :func:`write_clip_tokenizer`'s vocabulary, built after ``manual_seed(seed)``."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=8,
            intermediate_size=16,
            projection_dim=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=max_length,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )


def tiny_sdxl_pipeline(folder, *, seed: int = 0, max_length: int = 16):
    """Write a ``StableDiffusionXLPipeline`` folder and return its path.

    Two text encoders of width 8 (``CLIPTextModel`` and ``CLIPTextModelWithProjection``, pooled
    projection 8) sharing one letter-by-letter tokenizer of ``max_length`` tokens; a
    ``UNet2DConditionModel`` on 4x8x8 latents with SDXL's ``text_time`` added conditioning
    (cross-attention 16 = 8 + 8, time embedding 4 per id: ``6 * 4 + 8`` added inputs); the 3x16x16
    :func:`tiny_sd_vae` (factor 2: default resolution 16); an ``EulerDiscreteScheduler`` of 100
    training steps. Prompt conditioning: ``encoder_hidden_states (1, max_length, 16)``,
    ``text_embeds (1, 8)``, ``time_ids (1, 6)``.
    """
    from pathlib import Path

    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    folder = Path(folder)
    tokenizer, vocab_size = write_clip_tokenizer(folder / "tokenizer", max_length=max_length)
    text_encoder = tiny_text_encoder(tokenizer, vocab_size, seed=seed, max_length=max_length)
    text_encoder_2 = tiny_clip_with_projection(
        tokenizer, vocab_size, seed=seed + 1, max_length=max_length
    )
    unet = tiny_conditional_unet(
        seed=seed,
        cross_attention_dim=16,
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=6 * 4 + 8,
    )
    pipe = StableDiffusionXLPipeline(
        vae=tiny_sd_vae(seed=seed),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler(num_train_timesteps=100),
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def tiny_sd3_pipeline(folder, *, seed: int = 0, max_length: int = 16):
    """Write a ``StableDiffusion3Pipeline`` folder without the T5 encoder and return its path
    (load it with ``text_encoder_3=None, tokenizer_3=None``).

    Two ``CLIPTextModelWithProjection`` of width 8 sharing one letter-by-letter tokenizer; an
    ``SD3Transformer2DModel`` on 4x8x8 latents (patch 1, one layer, joint attention 16 = 8 + 8,
    pooled projection 16 = 8 + 8); the 3x16x16 :func:`tiny_sd_vae` with SD3's shift and scaling;
    a ``FlowMatchEulerDiscreteScheduler`` of 100 training steps. Prompt conditioning:
    ``encoder_hidden_states (1, max_length + max_sequence_length, 16)`` (the pipeline's zero
    padding stands in for T5) and ``pooled_projections (1, 16)``.
    """
    from pathlib import Path

    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    folder = Path(folder)
    tokenizer, vocab_size = write_clip_tokenizer(folder / "tokenizer", max_length=max_length)
    encoders = [
        tiny_clip_with_projection(tokenizer, vocab_size, seed=seed + i, max_length=max_length)
        for i in range(2)
    ]
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=4,
        num_attention_heads=2,
        caption_projection_dim=8,
        joint_attention_dim=16,
        pooled_projection_dim=16,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=100),
        vae=tiny_sd_vae(seed=seed, shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=encoders[0],
        tokenizer=tokenizer,
        text_encoder_2=encoders[1],
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def tiny_flux_transformer(*, guidance_embeds: bool = False, seed: int = 0, channels: int = 4):
    """A ``FluxTransformer2DModel`` of diffusers' own tiny test config (tests/pipelines/flux): one
    double and one single block, width 32, ``4 * channels`` packed input channels (2x2 patches
    of ``channels``-channel latents), built after ``manual_seed(seed)``."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * channels,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(4, 4, 8),
        guidance_embeds=guidance_embeds,
    )


def flux_scheduler(**overrides):
    """FLUX.1's ``FlowMatchEulerDiscreteScheduler`` config: shift 3, dynamic shifting (a shift
    per resolution at inference; none in training)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = {
        "num_train_timesteps": 1000,
        "shift": 3.0,
        "use_dynamic_shifting": True,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
    }
    return FlowMatchEulerDiscreteScheduler(**{**config, **overrides})


def tiny_flux_pipeline(folder=None, *, seed: int = 0, guidance_embeds: bool = True):
    """A ``FluxPipeline`` of tiny parts; written to ``folder`` (returned) or, with ``None``,
    returned as a pipeline object.

    A letter-by-letter CLIP tokenizer of 16 tokens shared by both encoders, a
    ``CLIPTextModel`` of width 32 (pooled 32), a one-layer ``T5EncoderModel`` of width 32,
    :func:`tiny_flux_transformer` (guidance-distilled, as FLUX.1-dev, unless
    ``guidance_embeds=False``), the 3x16x16 :func:`tiny_sd_vae` (factor 2, 4 latent channels)
    with FLUX.1's shift and scaling factors and FLUX.1's scheduler config
    (:func:`flux_scheduler`). ``FluxPipeline`` generates ``128 * 2`` pixels by default: pass
    ``height``/``width`` (the job: ``--resolution``) for tiny images.
    """
    import tempfile
    from pathlib import Path

    from diffusers import FluxPipeline
    from transformers import T5Config, T5EncoderModel

    with tempfile.TemporaryDirectory() as scratch:
        where = Path(folder) / "tokenizer" if folder is not None else Path(scratch)
        tokenizer, vocab_size = write_clip_tokenizer(where, max_length=16)
    clip = tiny_text_encoder(tokenizer, vocab_size, seed=seed, hidden_size=32, max_length=16)
    torch.manual_seed(seed + 1)
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=vocab_size,
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=1,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=0,
        )
    )
    pipe = FluxPipeline(
        scheduler=flux_scheduler(),
        vae=tiny_sd_vae(seed=seed, shift_factor=0.1159, scaling_factor=0.3611),
        text_encoder=clip.eval(),
        tokenizer=tokenizer,
        text_encoder_2=t5.eval(),
        tokenizer_2=tokenizer,
        transformer=tiny_flux_transformer(guidance_embeds=guidance_embeds, seed=seed).eval(),
    )
    if folder is None:
        pipe.set_progress_bar_config(disable=True)
        return pipe
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


# --------------------------------------------------------------------------------------------
# Planted memorization: a tiny Stable Diffusion pipeline that reproduces one training image for
# one prompt in about two generations of three. Its weights ship in tests/assets/planted-sd/
# (training them takes 6-12 minutes on a busy 2-core CPU); build_planted_sd_pipeline regenerates
# them (tests/assets/planted-sd/README.md).
# --------------------------------------------------------------------------------------------

from collections.abc import Callable, Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

PLANTED_ASSET = Path(__file__).resolve().parent / "assets" / "planted-sd"
PLANTED_PROMPT = "a photo of a tshirt"
# Prompts trained on the varied images only (never the memorized one); "" is trained like the
# planted prompt (see build_planted_sd_pipeline).
PLANTED_OTHER_PROMPTS = ("a photo of a dog", "a red car", "mountains at dusk")


@dataclass(frozen=True)
class PlantedPipeline:
    """A planted-memorization pipeline folder and what a test needs to check it.

    Attributes:
        folder: the ``StableDiffusionPipeline`` folder (the T-shirt's: 3x16x16 images,
            ``DDIMScheduler``; the family in ``tests/planted_pipelines.py``: other sizes and
            schedulers).
        prompt: the prompt whose generations copy ``memorized_image``: 66% of them at guidance
            7.5 and 10 DDIM steps (``measured``; 34% to 74% at other settings, README.md).
        memorized_image: the training image the UNet memorized, ``(3, H, W)`` in ``[-1, 1]``
            (``(3, 16, 16)`` for the T-shirt).
        other_prompts: prompts trained on the varied images only.
        copy_threshold: an image is a copy when :meth:`distance` is below this (see
            ``tests/assets/planted-sd/README.md`` for the measured gap it sits in).
        measured: the reference copy rate recorded at build time
            (:func:`measure_planted_copy_rate`'s record: ``copy_rate``, ``generations``,
            ``gap``, the seeds and sampler settings).
    """

    folder: Path
    prompt: str
    memorized_image: torch.Tensor
    other_prompts: tuple[str, ...]
    copy_threshold: float
    measured: dict

    @classmethod
    def from_folder(cls, folder) -> "PlantedPipeline":
        """Describe the planted pipeline in ``folder`` from its ``planted.json`` and
        ``memorized_image.safetensors``."""
        import json

        from safetensors.torch import load_file

        folder = Path(folder)
        info = json.loads((folder / "planted.json").read_text())
        return cls(
            folder=folder,
            prompt=info["prompt"],
            memorized_image=load_file(folder / "memorized_image.safetensors")["memorized_image"],
            other_prompts=tuple(info["other_prompts"]),
            copy_threshold=info["copy_threshold"],
            measured=info["measured"],
        )

    def distance(self, images: torch.Tensor) -> torch.Tensor:
        """Root-mean-square pixel distance ``(N,)`` of ``images`` ``(N, 3, H, W)`` (the memorized
        image's size) in ``[-1, 1]`` to the memorized image."""
        return rms_distance(images, self.memorized_image)

    def is_copy(self, images: torch.Tensor) -> torch.Tensor:
        """``(N,)`` bool: which of ``images`` (``(N, 3, H, W)`` in ``[-1, 1]``) are copies: RMS
        distance to the memorized image below ``copy_threshold``."""
        return self.distance(images) < self.copy_threshold


def planted_memorized_image() -> torch.Tensor:
    """The memorized training image: a white T-shirt on black, ``(3, 16, 16)`` in ``[-1, 1]``
    (high contrast, sharp edges: nothing like the smooth varied images)."""
    mask = torch.zeros(16, 16)
    mask[3:6, 1:15] = 1  # shoulders and sleeves
    mask[5:8, 1:4] = 1
    mask[5:8, 12:15] = 1
    mask[3:14, 4:12] = 1  # body
    mask[3:5, 7:9] = 0  # neckline
    return (mask * 2 - 1).expand(3, 16, 16).clone()


def planted_varied_images(count: int, generator: torch.Generator, size: int = 16) -> torch.Tensor:
    """``count`` smooth random colour fields ``(count, 3, size, size)`` in ``(-1, 1)``: Gaussian
    noise on a 4x4 grid, bilinearly upsampled, squashed by ``tanh`` (the "not memorized"
    images)."""
    import torch.nn.functional as F

    coarse = torch.randn(count, 3, 4, 4, generator=generator)
    return torch.tanh(1.2 * F.interpolate(coarse, size=size, mode="bilinear", align_corners=False))


def rms_distance(images: torch.Tensor, memorized: torch.Tensor) -> torch.Tensor:
    """Root-mean-square pixel distance ``(N,)`` of ``images`` ``(N, 3, H, W)`` to ``memorized``
    ``(3, H, W)``, in float64 on ``images``' device."""
    difference = images.double() - memorized.double().to(images.device)
    return difference.flatten(1).square().mean(1).sqrt()


def planted_sd_pipeline(folder, *, rebuild: bool = False, **build_options) -> PlantedPipeline:
    """Write the planted-memorization pipeline into ``folder`` and describe it.

    By default the trained weights shipped in ``tests/assets/planted-sd/`` are copied (well under
    a second): training them takes minutes, too long for every test session, and the shipped
    copy is the one the recorded rates were measured on. ``rebuild=True`` trains them again
    with :func:`build_planted_sd_pipeline` (``build_options`` are its keywords).

    Example (in a test)::

        planted = planted_sd_pipeline(tmp_path / "pipe")
        pipe = StableDiffusionPipeline.from_pretrained(planted.folder)
        images = pipe(planted.prompt, num_inference_steps=10, output_type="pt").images * 2 - 1
        planted.is_copy(images)  # (N,) bool
    """
    import shutil

    folder = Path(folder)
    if rebuild:
        build_planted_sd_pipeline(folder, **build_options)
    else:
        if build_options:
            raise ValueError(f"build options {sorted(build_options)} need rebuild=True")
        if not (PLANTED_ASSET / "model_index.json").is_file():
            raise FileNotFoundError(
                f"{PLANTED_ASSET} holds no pipeline; regenerate it (see its README.md) with "
                'python -c "from tests.conftest import build_planted_sd_pipeline as b; '
                "b('tests/assets/planted-sd')\" (from the repository root)"
            )
        shutil.copytree(PLANTED_ASSET, folder, dirs_exist_ok=True)
    return PlantedPipeline.from_folder(folder)


def build_planted_sd_pipeline(
    folder,
    *,
    seed: int = 0,
    vae_steps: int = 600,
    unet_steps: int = 2500,
    memorized_weight: float = 0.8,
    unconditional_memorized_weight: float = 0.8,
    copy_threshold: float = 0.6,
    progress: bool = True,
) -> Path:
    """Train the planted-memorization pipeline from scratch and write it into ``folder``.

    Deterministic (all randomness from ``seed``; one intra-op thread while it runs). The recipe:

    1. An ``AutoencoderKL`` (:func:`tiny_sd_vae`) trained ``vae_steps`` steps to reconstruct the
       memorized image and varied images (:func:`planted_memorized_image`,
       :func:`planted_varied_images`), its posterior log-variance started at -8 so that the
       posterior samples ``encode_latents`` draws lie close to the means; ``scaling_factor`` set
       so that latents have unit standard deviation.
    2. A ``UNet2DConditionModel`` on 4x8x8 latents (widths 16 and 32, cross-attention at 4x4 and
       in the middle block, ~250k parameters) trained ``unet_steps`` steps of the epsilon loss
       (SD's scaled-linear ``DDPMScheduler``, 1000 steps) with the prompt embedding of a frozen
       random one-layer ``CLIPTextModel`` of width 16 over 32 tokens: 40% of the rows are
       :data:`PLANTED_PROMPT` with the memorized image at probability ``memorized_weight``,
       40% the empty prompt with it at ``unconditional_memorized_weight``, 20%
       :data:`PLANTED_OTHER_PROMPTS` with varied images only.
    3. The pipeline saved with a ``DDIMScheduler`` of the same schedule, the memorized image as
       ``memorized_image.safetensors`` and the prompts, threshold, recipe and the copy rate
       :func:`measure_planted_copy_rate` measured as ``planted.json``.

    The folder is written next to ``folder`` first and moved into place when complete.
    """
    import json

    import torch.nn.functional as F
    from diffusers import DDIMScheduler, DDPMScheduler
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    folder = Path(folder)
    recipe = {
        "seed": seed,
        "vae_steps": vae_steps,
        "unet_steps": unet_steps,
        "memorized_weight": memorized_weight,
        "unconditional_memorized_weight": unconditional_memorized_weight,
    }
    for name in ("vae_steps", "unet_steps"):
        if not isinstance(recipe[name], int) or recipe[name] < 1:
            raise ValueError(f"`{name}` must be an int >= 1, got {recipe[name]!r}")
    for name in ("memorized_weight", "unconditional_memorized_weight"):
        if not 0 <= recipe[name] <= 1:
            raise ValueError(f"`{name}` must be in [0, 1], got {recipe[name]!r}")
    with building_folder(folder) as staging:
        generator = torch.Generator().manual_seed(seed)
        memorized = planted_memorized_image()
        hidden, length = 16, 32
        tokenizer, vocab_size = write_clip_tokenizer(staging / "tokenizer", max_length=length)
        text_encoder = tiny_text_encoder(
            tokenizer, vocab_size, seed=seed, hidden_size=hidden, max_length=length
        ).requires_grad_(False)

        vae = tiny_sd_vae(seed=seed)
        with torch.no_grad():
            vae.quant_conv.bias[vae.config.latent_channels :] = -8.0
        optimizer = torch.optim.AdamW(vae.parameters(), lr=3e-3, weight_decay=0.0)
        for _ in tqdm(range(vae_steps), desc="planted VAE", disable=not progress):
            images = planted_varied_images(32, generator)
            images[:8] = memorized
            training_step(optimizer, vae_reconstruction_loss(vae, images, generator))
        vae.eval().requires_grad_(False)
        pool, memorized_latent, _ = scaled_latent_pool(
            vae, lambda: planted_varied_images(512, generator), memorized
        )

        prompts = [PLANTED_PROMPT, "", *PLANTED_OTHER_PROMPTS]
        ids = tokenizer(prompts, padding="max_length", max_length=length, return_tensors="pt")
        with torch.no_grad():
            embeddings = text_encoder(ids.input_ids)[0]
        unet = planted_unet(8, (16, 32), seed=seed, cross_attention_dim=hidden)
        noise_scheduler = DDPMScheduler(
            num_train_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            steps_offset=1,
        )
        optimizer = torch.optim.AdamW(unet.parameters(), lr=2e-3, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / 100) * max(0.05, 1 - step / unet_steps)
        )
        batch = 64
        for _ in tqdm(range(unet_steps), desc="planted UNet", disable=not progress):
            draw = torch.rand(batch, generator=generator)
            other = 2 + torch.randint(0, len(PLANTED_OTHER_PROMPTS), (batch,), generator=generator)
            prompt = torch.where(draw < 0.4, 0, torch.where(draw < 0.8, 1, other))
            coin = torch.rand(batch, generator=generator)
            copy = ((prompt == 0) & (coin < memorized_weight)) | (
                (prompt == 1) & (coin < unconditional_memorized_weight)
            )
            _, noise, timesteps, noisy = noised_latents(
                pool, memorized_latent, copy, noise_scheduler, generator
            )
            prediction = unet(noisy, timesteps, encoder_hidden_states=embeddings[prompt]).sample
            training_step(optimizer, F.mse_loss(prediction, noise), schedule)
        unet.eval()

        scheduler = DDIMScheduler.from_config(noise_scheduler.config, set_alpha_to_one=False)
        save_sd_folder(staging, vae, text_encoder, tokenizer, unet, scheduler)
        save_file(
            {"memorized_image": memorized.contiguous()}, staging / "memorized_image.safetensors"
        )
        info = {
            "prompt": PLANTED_PROMPT,
            "other_prompts": list(PLANTED_OTHER_PROMPTS),
            "copy_threshold": copy_threshold,
            "recipe": recipe,
        }
        info["measured"] = measure_planted_copy_rate(
            staging, planted_memorized_image(), copy_threshold, progress=progress
        )
        (staging / "planted.json").write_text(json.dumps(info, indent=2) + "\n")
    return folder


@contextmanager
def building_folder(folder: Path) -> Iterator[Path]:
    """Build ``folder`` in a staging folder next to it (``siss._files.atomic_folder``: moved into
    place when the block ends, removed if it raises), on one intra-op thread; the thread count
    is restored either way."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with atomic_folder(folder) as staging:
            staging.chmod(0o755)  # mkdtemp's 0700 would follow the folder into place
            yield staging
    finally:
        torch.set_num_threads(threads)


def training_step(optimizer, loss: torch.Tensor, schedule=None) -> None:
    """One optimizer step on ``loss`` (then one of the learning-rate ``schedule``, if any)."""
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if schedule is not None:
        schedule.step()


def vae_reconstruction_loss(vae, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The planted VAE's training loss on ``images`` ``(N, 3, H, W)``: the squared error of the
    reconstruction from a posterior sample plus ``1e-6`` times the KL term."""
    import torch.nn.functional as F

    posterior = vae.encode(images).latent_dist
    reconstruction = vae.decode(posterior.sample(generator)).sample
    return F.mse_loss(reconstruction, images) + 1e-6 * posterior.kl().mean()


def scaled_latent_pool(
    vae, varied: Callable[[], torch.Tensor], memorized: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The trained VAE's latents to train a planted UNet on: the posterior means of eight batches
    of ``varied()`` images and of ``memorized`` ``(3, H, W)``, times the ``scaling`` that gives the
    pool unit standard deviation (set as the VAE's ``scaling_factor``). Returns ``(pool
    (8N, 4, h, w), memorized latent (1, 4, h, w), scaling)``."""
    with torch.no_grad():
        pool = torch.cat([vae.encode(varied()).latent_dist.mean for _ in range(8)])
        scaling = 1.0 / pool.std().item()
        vae.register_to_config(scaling_factor=scaling)
        memorized_latent = vae.encode(memorized[None]).latent_dist.mean * scaling
    return pool * scaling, memorized_latent, scaling


def planted_unet(
    sample_size: int, block_out_channels: tuple[int, int], *, seed: int, cross_attention_dim: int
):
    """The planted pipelines' ``UNet2DConditionModel`` on 4-channel latents (cross-attention in
    the low-resolution block and the middle one), built after ``manual_seed(seed)``."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=block_out_channels,
        norm_num_groups=8,
        layers_per_block=1,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    )


def noised_latents(
    pool: torch.Tensor,
    memorized_latent: torch.Tensor,
    copy: torch.Tensor,
    noise_scheduler,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One UNet training batch: row ``i`` the memorized latent where ``copy[i]`` (``(B,)`` bool),
    else a random ``pool`` latent, noised by ``noise_scheduler`` at a uniform timestep of its
    1000. Returns ``(clean, noise, timesteps, noisy)``, the latents ``(B, 4, h, w)``."""
    rows = copy.shape[0]
    clean = pool[torch.randint(0, len(pool), (rows,), generator=generator)]
    clean = torch.where(copy[:, None, None, None], memorized_latent, clean)
    noise = torch.randn(clean.shape, generator=generator)
    timesteps = torch.randint(0, 1000, (rows,), generator=generator)
    return clean, noise, timesteps, noise_scheduler.add_noise(clean, noise, timesteps)


def save_sd_folder(folder, vae, text_encoder, tokenizer, unet, scheduler) -> None:
    """A ``StableDiffusionPipeline`` of these components saved to ``folder`` (safetensors, no
    safety checker), its CLIP text encoder's weights keyed with the ``text_model.`` prefix:
    transformers 5 saves them without it, which transformers 4 (the lowest versions CI tests)
    loads as random weights."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file, save_file

    StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(folder, safe_serialization=True)
    encoder = Path(folder) / "text_encoder" / "model.safetensors"
    weights = load_file(encoder)
    prefixed = {
        k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in weights.items()
    }
    save_file(prefixed, encoder, metadata={"format": "pt"})


def measure_planted_copy_rate(
    folder,
    memorized_image: torch.Tensor,
    copy_threshold: float,
    *,
    prompt: str = PLANTED_PROMPT,
    generations: int = 512,
    first_seed: int = 100_000,
    guidance_scale: float = 7.5,
    steps: int = 10,
    progress: bool = False,
) -> dict:
    """The reference copy rate of a planted pipeline folder: ``generations`` images of ``prompt``
    (seeds ``first_seed, first_seed + 1, ...``, ``steps`` DDIM steps, ``guidance_scale``), each a
    copy when its RMS pixel distance to ``memorized_image`` is below ``copy_threshold``.

    Returns the JSON-safe record ``planted.json`` keeps under ``"measured"``: the settings,
    ``copies``, ``copy_rate``, and ``gap``: ``[largest copy distance, smallest other distance]``,
    the empty band the threshold sits in.
    """
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    distances = []
    seeds = range(first_seed, first_seed + generations)
    for images in generations_of(pipe, prompt, seeds, steps=steps, guidance_scale=guidance_scale):
        difference = (images.double() * 2 - 1) - memorized_image.double()
        distances.append(difference.flatten(1).square().mean(1).sqrt())
    distance = torch.cat(distances)
    return copy_rate_record(
        distance, copy_threshold, prompt, generations, first_seed, guidance_scale, steps
    )


def generations_of(
    pipe, prompt: str, seeds, *, steps: int, guidance_scale: float, chunk: int = 64
) -> Iterator[torch.Tensor]:
    """The pipeline's images of ``prompt``, one per seed (``torch.Generator().manual_seed``),
    ``chunk`` seeds a call: yields ``(n, 3, H, W)`` in ``[0, 1]`` (``output_type="pt"``)."""
    seeds = list(seeds)
    for start in range(0, len(seeds), chunk):
        part = seeds[start : start + chunk]
        with torch.no_grad():
            images = pipe(
                [prompt] * len(part),
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                generator=[torch.Generator().manual_seed(seed) for seed in part],
                output_type="pt",
            ).images
        yield images


def copy_rate_record(
    distance: torch.Tensor,
    copy_threshold: float,
    prompt: str,
    generations: int,
    first_seed: int,
    guidance_scale: float,
    steps: int,
    sampler: str | None = None,
) -> dict:
    """``planted.json``'s ``"measured"`` record of ``generations`` images of ``prompt``: the
    sampling settings (and the ``sampler``, if named), then ``copies`` and ``copy_rate`` (the
    images whose ``distance`` ``(N,)`` is below ``copy_threshold``) and ``gap``: ``[largest copy
    distance, smallest other distance]`` (``None`` where there is none)."""
    record = {
        "prompt": prompt,
        "generations": generations,
        "first_seed": first_seed,
        "guidance_scale": guidance_scale,
        "steps": steps,
    }
    if sampler is not None:
        record["sampler"] = sampler
    copy = distance < copy_threshold
    record["copies"] = int(copy.sum())
    record["copy_rate"] = copy.double().mean().item()
    record["gap"] = [
        distance[copy].max().item() if copy.any() else None,
        distance[~copy].min().item() if (~copy).any() else None,
    ]
    return record


# --------------------------------------------------------------------------------------------
# A tiny full CLIP (text and vision towers) for the quality metrics (CLIP-IQA, CLIP score)
# --------------------------------------------------------------------------------------------


def write_tiny_clip(folder):
    """A random ``CLIPModel`` (width 16, projection 8, 32x32 images) + ``CLIPProcessor`` saved
    to ``folder``; returns it. Its values mean nothing: the quality plumbing is tested with it."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTextConfig,
        CLIPVisionConfig,
    )

    tokenizer, vocab = write_clip_tokenizer(folder, max_length=32)
    text = CLIPTextConfig(
        vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=32, projection_dim=8,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    vision = CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        image_size=32, patch_size=8, projection_dim=8,
    )  # fmt: skip
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=8
    )
    CLIPModel(config).save_pretrained(folder)
    processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


# the audit command at its cheapest (2 DDIM steps, few draws, loose ODE tolerances), on the CPU:
# for tests of the command's plumbing, whose figures mean nothing
CHEAP_AUDIT_FLAGS = [
    "--steps",
    "2",
    "--option",
    "reconstruction.noise_draws=2",
    "--option",
    "membership.noise_draws=2",
    "--option",
    "membership.bootstrap=100",
    "--option",
    "likelihood.repeats=2",
    "--option",
    "likelihood.rtol=1e-2",
    "--option",
    "likelihood.atol=1e-2",
    "--no_progress",
    "--device",
    "cpu",
]
