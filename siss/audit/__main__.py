"""``python -m siss.audit``: audit one or more diffusers models against images to forget.

Example (the shipped digits models, see docs/audit.md)::

    python -m siss.audit --model examples/assets/pretrained --model examples/assets/retrain \\
        --forget tshirt.pt --reference tshirt_variants.pt --output_dir outputs/audit

writes, per model, ``OUTPUT_DIR/<name>/audit.json`` (``AuditReport.to_dict``), ``audit.md``
(the table) and ``audit.png`` (the figure), and with two or more models ``OUTPUT_DIR/compare.md``
(the first model against each other one). With ``--reference_model`` (a retrained model, or any
model) that model is audited too and ``compare.md`` says, per statistic, whether each other
model's value lies within its interval and which of the first model and the other is closer to
it (``siss.audit.compare``). The columns are the models' roles (``--roles``, default their folder
names). Every file is written to a temporary name and moved into place.

A text-conditional pipeline folder (``model_index.json``, ``unet/`` or ``transformer/``,
``scheduler/``, its tokenizers and text encoders, ``vae/``) needs ``--prompt``, which is encoded
by the pipeline's own ``encode_prompt`` (``siss.adapters.prompt_conditioning``: Stable Diffusion
1.x/2.x, SDXL with its ``added_cond_kwargs``, SD3 with its ``pooled_projections``); the checks
then run on latents: pixel images are encoded with the folder's VAE
(``siss.adapters.encode_latents``), tensors with the model's ``in_channels`` are taken as latents,
and the audit's data range is the latents' bound (see docs/audit.md).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

from siss._cli import CommandParser, add_output_flag, add_runtime_flags, flag
from siss._files import write_atomically, write_json_atomically
from siss._optional import needs
from siss.audit._models import sample_channels
from siss.audit.run import ALL_CHECKS, DEFAULT_CHECKS, check_option_values, parse_options

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
TENSOR_SUFFIXES = (".pt", ".pth", ".safetensors")


def build_parser() -> CommandParser:
    """The flags, named as the other commands' (diffusers' underscore style; the old hyphenated
    spellings and ``--out`` warn until ``siss._cli.REMOVED_IN``), each checked right after
    parsing: a bad value exits 2 naming it, before any model loads or any file is written."""
    # The installed command (`siss-audit`) or `python -m siss.audit`, whichever was run.
    command = Path(sys.argv[0]).name
    p = CommandParser(
        prog=command if command == "siss-audit" else "python -m siss.audit",
        description=(
            "Audit diffusion models for data unlearning: does each model still hold the forget "
            "images? Runs the generation, likelihood, reconstruction (t=250 and a sweep) and "
            "membership checks (and Wen et al.'s memorization score with --prompt) and writes "
            "audit.json, audit.md and audit.png per model, and compare.md for two or more."
        ),
    )
    flag(
        p,
        "--model",
        action="append",
        required=True,
        metavar="PATH",
        help="a diffusers model folder (config.json + weights, loaded with from_pretrained), or "
        "a pipeline folder with unet/ (or transformer/) and scheduler/ subfolders; repeat for "
        "several models (compare.md puts the first against each other one)",
    )
    flag(
        p,
        "--reference_model",
        metavar="PATH",
        default=None,
        help="a model to compare the others with (e.g. the retrained model), audited with the "
        "same settings; compare.md then says per statistic whether each --model's value lies "
        "within its interval and which of the first --model and the other is closer to it",
    )
    flag(
        p,
        "--roles",
        nargs="+",
        default=None,
        metavar="NAME",
        help="the models' roles as compare.md's column names, one per --model and then one for "
        "--reference_model (e.g. pretrained unlearned retrained); default: the folder names",
    )
    flag(
        p,
        "--scheduler",
        metavar="PATH",
        default=None,
        help="scheduler folder (scheduler_config.json) for a model folder that has none, e.g. "
        "the SISS demo's outputs/.../model; a model's own scheduler is used when present",
    )
    flag(
        p,
        "--forget",
        nargs="+",
        required=True,
        metavar="FILE",
        help="the images to forget: .pt/.pth (a tensor, or a dict with one tensor or an "
        "'images' key) or .safetensors tensors (N, C, H, W) or (C, H, W) already in the model's "
        "data range; image files (PNG, JPEG, ...; 8 or 16 bits a channel, mapped linearly to "
        "--data_range, converted to the model's channels, never resized); or folders of them",
    )
    flag(
        p,
        "--reference",
        nargs="+",
        required=True,
        metavar="FILE",
        help="comparable images the models never trained on (non-members), same formats",
    )
    flag(
        p,
        "--members",
        nargs="+",
        default=None,
        metavar="FILE",
        help="training images of the reference's distribution, for the membership AUC and "
        "TPR@1%%FPR (default: the forget images when there are at least 2)",
    )
    flag(
        p,
        "--prompt",
        default=None,
        metavar="TEXT",
        help="text conditioning to test under, required for a text-conditional model (encoded "
        "by the first --model pipeline folder's own encode_prompt: SD 1.x/2.x, SDXL, SD3; "
        '"" for the unconditional branch); adds the memorization check. With a vae/ in the '
        "folder, pixel images are encoded to latents (tensors with the model's channel count are "
        "taken as latents)",
    )
    add_output_flag(p, default=None, help="output folder (required)", old=("--out",))
    p.add_check(_output_given)
    flag(
        p,
        "--checks",
        nargs="+",
        choices=ALL_CHECKS,
        default=None,
        help=f"checks to run (default: {' '.join(DEFAULT_CHECKS)}, plus memorization with "
        "--prompt)",
    )
    flag(p, "--samples", type=int, default=1000, at_least=1, metavar="N",
         help="samples of the generation check")  # fmt: skip
    flag(p, "--steps", type=int, default=50, at_least=1,
         help="DDIM steps of sampling and of every denoising")  # fmt: skip
    flag(p, "--batch_size", type=int, default=64, at_least=1, help="rows per model call")
    flag(p, "--seed", type=int, default=0, at_least=0, help="seed of every random draw")
    flag(
        p,
        "--data_range",
        nargs=2,
        type=float,
        default=(-1.0, 1.0),
        metavar=("LO", "HI"),
        help="the models' data range; tensors must lie in it, image files are mapped to it",
    )
    p.add_check(_data_range_ordered)
    flag(
        p,
        "--option",
        action="append",
        default=[],
        metavar="CHECK.KEY=VALUE",
        help="a per-check option, VALUE as JSON (e.g. likelihood.repeats=8, "
        "reconstruction_sweep.ts=[100,500], generation.threshold=4.0, sampling.clip_sample=false)",
    )
    flag(p, "--no_figure", action="store_true", help="skip audit.png")
    add_runtime_flags(p)  # --device, --threads, --no_progress
    return p


def _output_given(args: argparse.Namespace) -> None:
    if args.output_dir is None:
        raise ValueError("--output_dir: required (the folder the audit writes into)")


def _data_range_ordered(args: argparse.Namespace) -> None:
    lo, hi = args.data_range
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise ValueError(f"--data_range: must have HI > LO, got {lo:g} {hi:g}")


def _fail(parser: argparse.ArgumentParser, message: str) -> None:
    parser.error(message)


# ------------------------------------------------------------------------------------ loading


def _class_of(folder: Path, config_name: str) -> Any:
    with needs("siss.audit"):
        import diffusers

    config = json.loads((folder / config_name).read_text())
    name = config.get("_class_name")
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"{folder / config_name} names no diffusers class (_class_name={name!r})")
    return cls


def model_folders(path: Path, scheduler: Path | None) -> tuple[Path, Path]:
    """``(model folder, scheduler folder)`` of ``--model path``; a ``ValueError`` naming it."""
    if not path.is_dir():
        raise ValueError(f"--model {path}: not a folder")
    model = path
    for sub in ("unet", "transformer"):
        if (path / sub / "config.json").is_file():
            model = path / sub
            break
    if not (model / "config.json").is_file():
        raise ValueError(f"--model {path}: no config.json (nor unet/ or transformer/ subfolder)")
    for candidate in (path / "scheduler", path, model):
        if (candidate / "scheduler_config.json").is_file():
            return model, candidate
    if scheduler is not None and (scheduler / "scheduler_config.json").is_file():
        return model, scheduler
    raise ValueError(
        f"--model {path}: no scheduler_config.json there (nor in scheduler/); pass --scheduler "
        "with the folder of the scheduler the model was trained with"
        + (f" (--scheduler {scheduler} has none)" if scheduler is not None else "")
    )


def load_model(path: Path, scheduler_path: Path | None) -> tuple[Any, Any]:
    model_dir, scheduler_dir = model_folders(path, scheduler_path)
    model = _class_of(model_dir, "config.json").from_pretrained(model_dir)
    scheduler = _class_of(scheduler_dir, "scheduler_config.json").from_pretrained(scheduler_dir)
    return model.eval(), scheduler


def _read_image(path: Path, channels: int, lo: float, hi: float) -> torch.Tensor:
    from siss._images import read_image

    return lo + (hi - lo) * read_image(path, channels, package="siss.audit")


def _read_tensor(path: Path) -> torch.Tensor:
    if path.suffix == ".safetensors":
        with needs("siss.audit"):
            from safetensors.torch import load_file

        data: Any = load_file(str(path))
    else:
        data = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(data, dict):
        if "images" in data:
            data = data["images"]
        elif len(data) == 1:
            data = next(iter(data.values()))
        else:
            raise ValueError(
                f"{path}: holds {sorted(data)}; expected one tensor or an 'images' key"
            )
    if not isinstance(data, torch.Tensor):
        raise ValueError(f"{path}: holds a {type(data).__name__}, not a tensor")
    if not data.is_floating_point():
        raise ValueError(
            f"{path}: integer tensor ({data.dtype}); save images as floats in the model's range"
        )
    return data.float()


def load_images(
    paths: list[str], flag: str, channels: int, data_range: tuple[float, float]
) -> torch.Tensor:
    """``(N, C, H, W)`` images from ``paths`` (tensors, image files, folders of either)."""
    lo, hi = data_range
    parts: list[torch.Tensor] = []
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(
                p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES + TENSOR_SUFFIXES
            )
            if not found:
                raise ValueError(f"{flag} {path}: a folder with no image or tensor files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"{flag} {path}: no such file or folder")
    for path in files:
        suffix = path.suffix.lower()
        try:
            if suffix in TENSOR_SUFFIXES:
                tensor = _read_tensor(path)
                parts.append(tensor.unsqueeze(0) if tensor.dim() == 3 else tensor)
            elif suffix in IMAGE_SUFFIXES:
                parts.append(_read_image(path, channels, lo, hi).unsqueeze(0))
            else:
                raise ValueError(
                    f"unknown file type {suffix!r} (use {TENSOR_SUFFIXES + IMAGE_SUFFIXES})"
                )
        except ValueError as err:
            raise ValueError(f"{flag} {path}: {err}") from err
    shapes = {tuple(p.shape[1:]) for p in parts}
    if len(shapes) != 1:
        raise ValueError(f"{flag}: the files hold images of different shapes {sorted(shapes)}")
    return torch.cat(parts)


def load_vae(path: Path) -> Any | None:
    """The pipeline folder's ``vae/`` (an ``AutoencoderKL``-like model), or ``None``."""
    folder = path / "vae"
    if not (folder / "config.json").is_file():
        return None
    return _class_of(folder, "config.json").from_pretrained(folder).eval()


def to_latents(
    images: torch.Tensor, flag: str, vae: Any, in_channels: int, seed: int, device: torch.device
) -> torch.Tensor:
    """``images`` in the latent model's input space: pixels with the VAE's channel count are
    encoded (``siss.adapters.encode_latents``, a posterior sample seeded from ``seed``), tensors
    with the model's ``in_channels`` are taken as latents already; anything else is an error."""
    from siss.adapters import encode_latents

    if pixels(images, flag, vae, in_channels):
        generator = torch.Generator(device=device).manual_seed(seed)
        parts = []
        with torch.inference_mode():
            for start in range(0, images.shape[0], 16):
                batch = images[start : start + 16].to(device)
                parts.append(encode_latents(vae, batch, generator).float().cpu())
        return torch.cat(parts)
    return images


def pixels(images: torch.Tensor, flag: str, vae: Any, in_channels: int) -> bool:
    """Whether a latent model's ``images`` are pixels (the VAE's channel count) rather than
    latents (the model's ``in_channels``); a ``ValueError`` naming ``flag`` for neither."""
    pixel_channels = int(getattr(vae.config, "in_channels", 3))
    channels = int(images.shape[1])
    if channels == pixel_channels and channels != in_channels:
        return True
    if channels == in_channels:
        return False
    raise ValueError(
        f"{flag}: images with {channels} channels; this latent model takes {pixel_channels}-"
        f"channel pixels (encoded with its vae/) or {in_channels}-channel latents"
    )


def check_same_shapes(images: dict[str, torch.Tensor | None]) -> None:
    """A ``ValueError`` naming the two flags whose images differ in shape, each with its shape
    (the files as read: pixels, before a latent model's VAE encodes them)."""
    given = {name: tuple(t.shape[1:]) for name, t in images.items() if t is not None}
    (first_name, first), *others = given.items()
    for name, shape in others:
        if shape != first:
            raise ValueError(
                f"{first_name} holds images of {'x'.join(map(str, first))} (channels x height "
                f"x width) and {name} of {'x'.join(map(str, shape))}: every set must have one "
                "shape, the one the model takes"
            )


def check_image_shapes(
    models: list[tuple[str, Any, Any]], images: dict[str, torch.Tensor | None], generates: bool
) -> None:
    """A ``ValueError`` naming the flag whose images the models cannot take: every set must have
    ``--forget``'s shape, the models' ``in_channels``, and (for the checks that compare the
    models' samples with them) the spatial size the models generate (``sample_size``)."""
    check_same_shapes(images)
    first = tuple(images["--forget"].shape[1:])
    for raw, model, _ in models:
        config = model.config
        channels = sample_channels(model)
        if isinstance(channels, int) and first[0] != channels:
            raise ValueError(
                f"--forget: images with {first[0]} channels; --model {raw} takes {channels}"
            )
        size = getattr(config, "sample_size", None)
        size = (size, size) if isinstance(size, int) else size
        if generates and isinstance(size, list | tuple) and tuple(first[1:]) != tuple(size):
            raise ValueError(
                f"--forget: images of {first[1]}x{first[2]}; --model {raw} generates "
                f"{size[0]}x{size[1]} (its config's sample_size): give images of that size"
            )


def latent_range(*parts: torch.Tensor | None) -> tuple[float, float]:
    """The audit's data range in latent space: ``(-b, b)`` with ``b`` the largest absolute
    latent value rounded up to an integer (at least 1)."""
    bound = max(float(p.abs().max()) for p in parts if p is not None)
    bound = float(max(1, math.ceil(bound))) if math.isfinite(bound) else 1.0
    return -bound, bound


def is_text_conditional(model: Any) -> bool:
    """Whether ``model`` takes ``encoder_hidden_states`` (text cross-attention)."""
    forward = getattr(model, "forward", None)
    if forward is None:
        return False
    return "encoder_hidden_states" in inspect.signature(forward).parameters


def load_text_pipeline(path: Path, denoiser: Any, vae: Any | None = None) -> Any:
    """The pipeline folder ``path`` loaded for its text encoders (``DiffusionPipeline``).

    The already loaded ``denoiser`` (and ``vae``) are reused; the components a prompt does not
    need (safety checker, feature extractor, image encoder) are not loaded, and components the
    folder's ``model_index.json`` lists as absent (e.g. SD3 without its T5 encoder) are passed as
    ``None``. A ``ValueError`` naming ``--prompt`` when ``path`` is not a pipeline folder.
    """
    index = path / "model_index.json"
    if not index.is_file():
        raise ValueError(
            f"--prompt needs a diffusers pipeline folder (model_index.json, tokenizer and text "
            f"encoder subfolders) to encode the prompt; {path} has no model_index.json"
        )
    with needs("siss.audit"):
        import diffusers

    entries = json.loads(index.read_text())
    cls = getattr(diffusers, str(entries.get("_class_name")), None)
    if cls is None:
        raise ValueError(
            f"--prompt: {index} names no diffusers pipeline (_class_name="
            f"{entries.get('_class_name')!r})"
        )
    expected = set(inspect.signature(cls.__init__).parameters)
    components: dict[str, Any] = {}
    for name, entry in entries.items():
        absent = isinstance(entry, list | tuple) and (not entry or entry[0] is None)
        if not name.startswith("_") and name in expected and absent:
            components[name] = None
    for name in ("safety_checker", "feature_extractor", "image_encoder"):
        if name in expected:
            components[name] = None
    if "requires_safety_checker" in expected:
        components["requires_safety_checker"] = False
    for name in ("unet", "transformer"):
        if name in expected and (path / name / "config.json").is_file():
            components[name] = denoiser
    if vae is not None and "vae" in expected:
        components["vae"] = vae
    return cls.from_pretrained(str(path), **components)


def encode_prompt(
    path: Path,
    prompt: str,
    device: torch.device,
    *,
    denoiser: Any,
    vae: Any | None = None,
    latent_size: tuple[int, int] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(conditioning, null_conditioning)``: the denoiser's inputs for ``prompt`` and for ``""``.

    Through the pipeline folder's own ``encode_prompt`` (``siss.adapters.prompt_conditioning``),
    so SDXL's ``added_cond_kwargs`` and SD3's ``pooled_projections`` come with the embeddings.
    ``latent_size``: the audited latents' ``(h, w)``; SDXL's ``time_ids`` are those of images
    ``vae_scale_factor`` times larger.
    """
    from siss.adapters import prompt_conditioning

    pipe = load_text_pipeline(path, denoiser, vae)
    size = None
    if latent_size is not None:
        factor = int(getattr(pipe, "vae_scale_factor", 8) or 8)
        size = (int(latent_size[0]) * factor, int(latent_size[1]) * factor)
    try:
        cond = prompt_conditioning(pipe, prompt, device=device, size=size)
    except (TypeError, ValueError) as err:
        raise ValueError(f"--prompt with --model {path}: {err}") from err
    return cond.conditional, cond.unconditional


def _names(paths: list[str]) -> list[str]:
    names: list[str] = []
    for i, raw in enumerate(paths):
        path = Path(raw).resolve()
        name = (
            path.name
            if path.name not in ("model", "unet", "")
            else (f"{path.parent.name}-{path.name}")
        )
        names.append(name if name not in names else f"{name}-{i}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lo, hi = args.data_range
    try:
        options = parse_options(args.option)
    except ValueError as err:
        _fail(parser, str(err))
    device = torch.device(args.device)  # resolved by the --device check
    scheduler_path = Path(args.scheduler) if args.scheduler else None
    out = Path(args.output_dir)
    if scheduler_path is not None and not scheduler_path.exists():
        _fail(parser, f"--scheduler: no folder {scheduler_path}")
    paths = list(args.model) + ([args.reference_model] if args.reference_model else [])
    if args.roles is not None and len(args.roles) != len(paths):
        _fail(
            parser,
            f"--roles: give one per --model (and one for --reference_model): {len(paths)} "
            f"names, got {len(args.roles)}",
        )
    roles = list(args.roles) if args.roles is not None else _names(paths)
    if len(set(roles)) < len(roles):
        _fail(parser, f"--roles: each model needs its own name, got {' '.join(roles)}")

    from siss.audit.report import compare
    from siss.audit.run import audit

    # ---- everything loaded and checked before the first (long) audit
    try:
        models = [(raw, *load_model(Path(raw), scheduler_path)) for raw in paths]
        for raw, _, scheduler in models:  # every model's, before the first audit is written
            try:
                check_option_values(options, scheduler)
            except (TypeError, ValueError) as err:
                raise ValueError(f"--option (--model {raw}): {err}") from None
        channels = int(sample_channels(models[0][1]) or 1)
        vae = load_vae(Path(args.model[0]))
        # image files are read with the VAE's pixel channels for a latent model
        file_channels = int(getattr(vae.config, "in_channels", 3)) if vae else channels
        forget = load_images(args.forget, "--forget", file_channels, (lo, hi))
        reference = load_images(args.reference, "--reference", file_channels, (lo, hi))
        members = (
            load_images(args.members, "--members", file_channels, (lo, hi))
            if args.members
            else None
        )
        given = {"--forget": forget, "--reference": reference, "--members": members}
        if vae is not None:  # each set's channels first: the message says what they can be
            for name, images in given.items():
                if images is not None:
                    pixels(images, name, vae, channels)
        check_same_shapes(given)  # before a VAE encodes them
        audit_range = (lo, hi)
        latent = vae is not None
        if vae is not None:
            vae = vae.to(device)
            forget = to_latents(forget, "--forget", vae, channels, args.seed, device)
            reference = to_latents(reference, "--reference", vae, channels, args.seed + 1, device)
            if members is not None:
                members = to_latents(members, "--members", vae, channels, args.seed + 2, device)
            audit_range = latent_range(forget, reference, members)
        check_image_shapes(
            models,
            {"--forget": forget, "--reference": reference, "--members": members},
            generates=not args.checks or bool({"generation", "memorization"} & set(args.checks)),
        )
        text_models = [raw for raw, model, _ in models if is_text_conditional(model)]
        if args.prompt is not None and len(text_models) < len(models):
            plain = next(raw for raw, *_ in models if raw not in text_models)
            raise ValueError(
                f"--prompt: --model {plain} is not text-conditional (its model takes no "
                "encoder_hidden_states); audit it without --prompt"
            )
        if args.prompt is None and text_models:
            raise ValueError(
                f"--model {text_models[0]} is text-conditional: pass --prompt (the text to "
                'test under; --prompt "" for the unconditional branch)'
            )
        conditioning = null_conditioning = None
        if args.prompt is not None:
            conditioning, null_conditioning = encode_prompt(
                Path(args.model[0]),
                args.prompt,
                device,
                denoiser=models[0][1],
                vae=vae,
                latent_size=tuple(forget.shape[-2:]),
            )
        del vae
    except (ValueError, OSError) as err:
        _fail(parser, str(err))

    reports = []
    names = _names(paths)
    for (raw, model, scheduler), name in zip(models, names, strict=True):
        print(f"auditing {raw}", file=sys.stderr)
        try:
            report = audit(
                model,
                scheduler,
                forget,
                reference,
                members=members,
                conditioning=conditioning,
                null_conditioning=null_conditioning,
                checks=args.checks,
                num_samples=args.samples,
                num_inference_steps=args.steps,
                batch_size=args.batch_size,
                data_range=audit_range,
                seed=args.seed,
                device=device,
                progress=not args.no_progress,
                label=raw,
                **options,
            )
        except (TypeError, ValueError) as err:
            _fail(parser, f"--model {raw}: {err}")
        report.config["command"] = {
            "argv": sys.argv[1:] if argv is None else list(argv),
            "forget": args.forget,
            "reference": args.reference,
            "members": args.members,
            "prompt": args.prompt,
            "scheduler_folder": str(model_folders(Path(raw), scheduler_path)[1]),
            "latent_space": (
                None
                if not latent
                else {
                    "vae": str(Path(args.model[0]) / "vae"),
                    "data_range": list(audit_range),
                    "note": "pixel images were encoded with the VAE (encode_latents, seeded); "
                    "every check ran on latents, data range the latents' bound",
                }
            ),
        }
        folder = out / name
        write_json_atomically(folder / "audit.json", report.to_dict())
        write_atomically(folder / "audit.md", report.to_markdown() + "\n")
        if not args.no_figure:
            from siss.audit.figure import save_figure

            save_figure(report, folder / "audit.png", forget=forget, reference=reference)
        print(report.to_markdown())
        print()
        reports.append(report)
    parts = []
    if args.reference_model:
        *audited, against = reports
        *labels, reference_label = roles
        if len(audited) == 1:
            parts.append(
                compare(
                    None, audited[0], against, labels=(labels[0], labels[0], reference_label)
                ).to_markdown()
            )
        for other, label in zip(audited[1:], labels[1:], strict=True):
            parts.append(
                compare(
                    audited[0], other, against, labels=(labels[0], label, reference_label)
                ).to_markdown()
            )
    else:
        for other, label in zip(reports[1:], roles[1:], strict=True):
            parts.append(compare(reports[0], other, labels=(roles[0], label)).to_markdown())
    if parts:
        text = "\n\n".join(parts) + "\n"
        write_atomically(out / "compare.md", text)
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
