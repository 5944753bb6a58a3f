"""A digits model evaluated by its samples: the outlier's generation rate (95% interval), its NLL
in bits/dim, and sample quality (IS- and FID-style scores under ``siss.metrics.DigitClassifier``);
sample grids (``diffusers.utils.make_image_grid``) and what ``--report_to`` logs of an evaluation
(a step's loss terms: ``siss._cli.tracking.step_log``, re-exported here for ``examples/``)."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DModel

from siss._cli.tracking import step_log  # noqa: F401  (examples/unlearn.py imports it here)
from siss._digits.data import to_unit_range
from siss._digits.models import outlier_nll, sample_images
from siss._files import atomic_path
from siss.metrics import (
    DigitClassifier,
    default_threshold,
    fid_score,
    generation_rate,
    is_score,
    l2_distances,
)


def is_near(samples: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``(N,)`` mask of the samples ``(N, C, H, W)`` in ``[-1, 1]`` that the generation-rate
    detector counts as ``target`` ``(C, H, W)``."""
    distances = l2_distances(to_unit_range(samples), to_unit_range(target))
    return distances < default_threshold(target.shape)


def load_classifier(path: Path | None, shape: tuple[int, ...]) -> DigitClassifier | None:
    """The digit classifier at ``path`` for images of ``shape`` ``(1, 16, 16)``; ``None`` for
    other images (its features mean nothing there), or without a file."""
    if path is None or tuple(shape) != (1, 16, 16) or not Path(path).exists():
        return None
    return DigitClassifier.from_file(path)


def outlier_report(
    samples: torch.Tensor, data: Any, classifier: DigitClassifier | None
) -> dict[str, Any]:
    """The outlier rate of ``samples`` ``(N, C, H, W)`` in ``[-1, 1]`` (``data.outlier``), each
    planted shape's for a ``ShapesDataset``, and with a ``classifier`` the IS- and FID-style
    scores of the samples near no outlier against ``data``'s clean images (pretrain.py's)."""
    est = generation_rate(to_unit_range(samples), to_unit_range(data.outlier))
    result: dict[str, Any] = {
        "samples": est.total + est.nonfinite,
        "nonfinite_samples": est.nonfinite,
        "outlier_count": est.count,
        "outlier_rate": est.rate,
        "ci95_clopper_pearson": [est.low, est.high],
    }
    outliers = data.shapes if hasattr(data, "shapes") else data.outlier[None]
    if hasattr(data, "shapes"):  # several planted shapes: the rate of each (T-shirt above)
        result["shape_rates"] = {}
        for name, shape in zip(data.names, data.shapes, strict=True):
            rate = generation_rate(to_unit_range(samples), to_unit_range(shape))
            result["shape_rates"][name] = {"count": rate.count, "ci95": [rate.low, rate.high]}
    if classifier is not None:
        digits_only = samples[~torch.stack([is_near(samples, o) for o in outliers]).any(0)]
        result["inception_score"] = is_score(classifier, digits_only, select="logits").mean
        result["fid_to_digits"] = fid_score(
            classifier, digits_only, data.images[~data.is_outlier], select="features"
        )
    return result


class Evaluator:
    """Outlier generation rate, outlier NLL and sample quality of a model, with fixed seeds.

    The quality scores use the digit classifier at ``classifier``, so they are measured on
    16x16 grayscale data only (digits, MNIST); on other data they are ``None`` (plug in your
    own features with ``siss.metrics.fid_score`` / ``is_score``).

    Args:
        outlier: ``(C, H, W)`` the image whose generation rate and NLL are measured.
        reference: ``(M, C, H, W)`` clean images in ``[-1, 1]``, the FID-style reference.
        classifier: the digit classifier's safetensors file.
        sampler, steps, precision: the sampling of ``siss._digits.models.sample_images``.
        seed: the samples' noise is ``seed + 1``'s, the NLL's probes ``seed + 2``'s.
        nll_probes, nll_tolerance: Hutchinson probes of each NLL and the ODE's rtol = atol.
        progress: a progress bar over the full evaluations' sampling.
    """

    def __init__(
        self,
        outlier: torch.Tensor,
        reference: torch.Tensor,
        *,
        classifier: Path | None,
        sampler: str = "ddpm",
        steps: int = 50,
        precision: str = "fp32",
        seed: int = 0,
        nll_probes: int = 4,
        nll_tolerance: float = 1e-5,
        progress: bool = True,
    ) -> None:
        self.outlier, self.reference = outlier, reference
        self.sampler, self.steps, self.precision = sampler, steps, precision
        self.seed, self.nll_probes, self.nll_tolerance = seed, nll_probes, nll_tolerance
        self.progress = progress
        self.classifier = load_classifier(classifier, outlier.shape)

    @classmethod
    def from_flags(
        cls, args: Any, outlier: torch.Tensor, reference: torch.Tensor, classifier: Path
    ) -> Evaluator:
        """The evaluator of a command's evaluation flags (``siss._cli.add_evaluation_flags``)."""
        return cls(
            outlier,
            reference,
            classifier=classifier,
            sampler=args.eval_sampler,
            steps=args.eval_steps,
            precision=args.eval_precision,
            seed=args.seed,
            nll_probes=args.nll_probes,
            nll_tolerance=args.nll_tolerance,
            progress=not getattr(args, "no_progress", False),
        )

    def samples(
        self,
        unet: UNet2DModel,
        scheduler_config: dict,
        count: int,
        progress: bool = False,
        noise_seed: int | None = None,
    ) -> torch.Tensor:
        """``(count, C, H, W)`` samples in ``[-1, 1]``, from the same noise at every evaluation
        (``noise_seed``: another noise, for the spread over evaluation seeds)."""
        seed = self.seed + 1 if noise_seed is None else noise_seed
        return sample_images(
            unet,
            scheduler_config,
            count,
            sampler=self.sampler,
            num_inference_steps=self.steps,
            generator=torch.Generator().manual_seed(seed),
            progress=progress,
            precision=self.precision,
        )

    def track(self, unet: UNet2DModel, scheduler: Any, count: int) -> dict[str, Any]:
        """The outlier rate alone on ``count`` samples: the cheap in-run evaluation."""
        was_training = unet.training
        unet.eval()
        start = time.perf_counter()
        samples = self.samples(unet, scheduler.config, count)
        unet.train(was_training)
        return {**self.rate(samples), "eval_wall_s": round(time.perf_counter() - start, 1)}

    def rate(self, samples: torch.Tensor) -> dict[str, Any]:
        """The outlier rate of ``samples`` ``(N, C, H, W)`` in [-1, 1], its exact 95% interval,
        and the counts behind it (non-finite samples apart: the rate is then NaN)."""
        rate = generation_rate(to_unit_range(samples), to_unit_range(self.outlier))
        return {
            "outlier_rate": rate.rate,
            "outlier_rate_ci95": [rate.low, rate.high],
            "outlier_count": rate.count,
            "samples": rate.total + rate.nonfinite,
            "nonfinite_samples": rate.nonfinite,
        }

    def quality(self, samples: torch.Tensor) -> dict[str, Any]:
        """Outlier rate (95% interval), IS- and FID-style scores and class counts of ``samples``
        ``(N, C, H, W)`` in [-1, 1]; what could not be measured is None, with the reason under
        ``not_measured``."""
        not_measured: dict[str, str] = {}
        score = fid = class_counts = None
        if self.classifier is not None:
            try:
                score = is_score(self.classifier, samples, select="logits").mean
                # The FID-style score sees a shift in the mix of digits that IS hardly does.
                with torch.no_grad():
                    predicted = self.classifier(samples).logits.argmax(dim=1)
                class_counts = torch.bincount(predicted, minlength=10).tolist()
                fid = fid_score(self.classifier, samples, self.reference, select="features")
            except ValueError as error:
                not_measured["inception_score"] = not_measured["fid"] = str(error)
        return {
            **self.rate(samples),
            "inception_score": score,
            "fid": fid,
            "class_counts": class_counts,
            "not_measured": not_measured,
        }

    def nll(self, unet: UNet2DModel, scheduler: Any, images: torch.Tensor) -> torch.Tensor:
        """``(B,)`` bits/dim of ``images`` ``(B, C, H, W)`` (``models.outlier_nll``) with the
        probes' fixed seed; a ``ValueError`` for a diverged model."""
        return outlier_nll(
            unet,
            scheduler,
            images,
            tolerance=self.nll_tolerance,
            generator=torch.Generator().manual_seed(self.seed + 2),
        )

    def __call__(
        self, unet: UNet2DModel, scheduler: Any, count: int
    ) -> tuple[dict[str, Any], torch.Tensor]:
        """Metrics of ``unet`` on ``count`` samples, and the samples, ``(count, C, H, W)``."""
        was_training = unet.training
        unet.eval()
        start = time.perf_counter()
        samples = self.samples(unet, scheduler.config, count, self.progress)
        metrics = self.quality(samples)
        probes = self.outlier.expand(self.nll_probes, *self.outlier.shape)
        # A diverged model (NaN samples or predictions) has no likelihood or quality: the metrics
        # raise ValueError saying why, recorded here as "not measured", never as a number.
        nll = None
        try:
            nll = self.nll(unet, scheduler, probes)
        except ValueError as error:
            metrics["not_measured"]["outlier_nll_bpd"] = str(error)
        unet.train(was_training)
        return {
            **metrics,  # rate, IS, FID, class counts and what was not measured
            "outlier_nll_bpd": None if nll is None else nll.mean().item(),
            "outlier_nll_bpd_se": (nll.std() / math.sqrt(len(nll))).item()
            if nll is not None and len(nll) > 1
            else None,
            "eval_wall_s": round(time.perf_counter() - start, 1),
        }, samples

    def shapes(
        self,
        unet: UNet2DModel,
        scheduler: Any,
        data: Any,
        count: int,
        noise_seed: int | None = None,
        with_nll: bool = True,
    ) -> dict[str, Any]:
        """Quality on ``count`` samples and every planted shape's rate and NLL (``data``: a
        ``ShapesDataset``); ``noise_seed`` for the quality band's other evaluations."""
        unet.eval()
        start = time.perf_counter()
        samples = self.samples(unet, scheduler.config, count, noise_seed=noise_seed)
        unit = to_unit_range(samples)
        # Quality is that of the digits: samples within the rate's threshold of any planted
        # shape are left out of IS/FID (against a digits-only reference), so that unlearning a
        # shape does not read as a quality gain, nor its return as a loss; the rates count them.
        near_shape = torch.zeros(len(samples), dtype=torch.bool)
        for shape in data.shapes:
            near_shape |= is_near(samples, shape)
        result: dict[str, Any] = {
            "inception_score": None,
            "fid": None,
            "quality_samples": int((~near_shape).sum()),
            "not_measured": {},
        }
        try:
            digits = samples[~near_shape]
            result["inception_score"] = is_score(self.classifier, digits, select="logits").mean
            result["fid"] = fid_score(self.classifier, digits, self.reference, select="features")
        except ValueError as error:  # NaN samples: no quality, said so
            result["not_measured"]["quality"] = str(error)
        if not with_nll:
            return result
        nll, probes = None, self.nll_probes
        try:
            with torch.no_grad():
                images = data.shapes.repeat_interleave(probes, dim=0).to(unet.device)
                nll = self.nll(unet, scheduler, images).view(len(data.names), probes).cpu()
        except ValueError as error:
            result["not_measured"]["nll_bpd"] = str(error)
        result["shapes"] = {}
        for k, name in enumerate(data.names):
            rate = generation_rate(unit, to_unit_range(data.shapes[k]))
            se = None if nll is None or probes < 2 else (nll[k].std() / math.sqrt(probes)).item()
            result["shapes"][name] = {
                "count": rate.count,
                "samples": rate.total + rate.nonfinite,
                "rate": rate.rate,
                "rate_ci95": [rate.low, rate.high],
                "nll_bpd": None if nll is None else nll[k].mean().item(),
                "nll_bpd_se": se,
            }
        result["eval_wall_s"] = round(time.perf_counter() - start, 1)
        return result


def _tiles(images: torch.Tensor, scale: int) -> list[Any]:
    """``(N, C, H, W)`` images in ``[-1, 1]`` as ``N`` grayscale PIL images, framed in grey and
    enlarged ``scale`` times (nearest neighbour)."""
    from PIL import Image

    padded = torch.nn.functional.pad(to_unit_range(images).mean(1), (1, 1, 1, 1), value=0.5)
    pixels = (padded * 255).round().to(torch.uint8).numpy()
    return [
        Image.fromarray(p).resize((p.shape[1] * scale, p.shape[0] * scale), Image.NEAREST)
        for p in pixels
    ]


def save_grid(
    samples: torch.Tensor,
    outlier: torch.Tensor,
    path: Path,
    title: str,
    rows: int = 8,
    scale: int = 3,
) -> None:
    """PNG, written atomically: a grid of samples, and the samples nearest the outlier.

    Left, the first ``rows * rows`` samples ``(N, C, H, W)`` in ``[-1, 1]`` in ``rows`` rows
    (the same noise before and after unlearning, so the two pictures compare tile by tile; the
    last column filled up with black tiles); right, the outlier ``(C, H, W)`` and the
    ``rows - 1`` samples closest to it in L2, which are copies of it while the model still
    generates it. ``title`` is written above.
    """
    from diffusers.utils import make_image_grid
    from PIL import Image, ImageDraw

    def black(count: int) -> torch.Tensor:
        return samples.new_full((count, *samples.shape[1:]), -1.0)

    shown = samples[: rows * rows]
    shown = torch.cat([shown, black(-len(shown) % rows)])
    grid = make_image_grid(_tiles(shown, scale), rows=rows, cols=len(shown) // rows)
    nearest = samples[(samples - outlier).flatten(1).norm(dim=1).argsort()[: rows - 1]]
    column = torch.cat([outlier[None], nearest])
    column = torch.cat([column, black(rows - len(column))])
    side = make_image_grid(_tiles(column, scale), rows=rows, cols=1)
    top, gap = 14, 2 * scale * (samples.shape[-1] + 2) // 4
    canvas = Image.new("RGB", (grid.width + gap + side.width, top + grid.height), "white")
    canvas.paste(grid, (0, top))
    canvas.paste(side, (grid.width + gap, top))
    ImageDraw.Draw(canvas).text((2, 1), f"{title} | right: outlier, nearest samples", fill="black")
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")


def evaluation_log(metrics: dict[str, Any]) -> dict[str, float]:
    """The measured numbers of an evaluation (the outlier rate, its NLL, IS, FID) for
    ``--report_to``; what was not measured is left out, never logged as a number."""
    keys = ("outlier_rate", "outlier_nll_bpd", "inception_score", "fid")
    return {
        f"eval/{key}": float(metrics[key])
        for key in keys
        if isinstance(metrics.get(key), int | float) and math.isfinite(metrics[key])
    }
