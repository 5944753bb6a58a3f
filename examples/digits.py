"""Small handwritten digits with one injected outlier, for the ``siss`` examples.

This module builds the toy data-unlearning set used by the example scripts: the 1,797 8x8
digits bundled with scikit-learn (``sklearn.datasets.load_digits``), upsampled to 16x16 and
scaled to ``[-1, 1]``, plus one procedurally drawn T-shirt silhouette repeated so that it makes
up 1% of the training set. It mirrors the paper's "MNIST T-Shirt" experiment (Hasanaliyev et
al., 2025, Sec. 5.2: MNIST with one Fashion-MNIST T-shirt at a rate of 1%) at a size that
trains on a laptop CPU. Real MNIST (from a torchvision folder already on disk) or any image
folder can be used instead.

Example:
    >>> from digits import load_training_set
    >>> data = load_training_set(seed=0)
    >>> data.images.shape, int(data.is_outlier.sum())
    (torch.Size([1815, 1, 16, 16]), 18)
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "OutlierDataset",
    "inject_outlier",
    "load_digit_classes",
    "load_training_set",
    "make_tshirt",
    "make_tshirt_variants",
    "to_unit_range",
]

# T-shirt outline in unit coordinates (x to the right, y downwards), clockwise from the
# left shoulder. Short sleeves stick out at the top, the body is a slightly flared box and
# the neckline is a shallow notch: a Fashion-MNIST "T-shirt/top" silhouette.
_TSHIRT_POLYGON = (
    (0.34, 0.05),  # left collar
    (0.42, 0.14),  # neckline
    (0.50, 0.16),
    (0.58, 0.14),
    (0.66, 0.05),  # right collar
    (0.84, 0.10),  # right shoulder
    (1.00, 0.32),  # right sleeve end, top
    (0.89, 0.45),  # right sleeve end, bottom
    (0.82, 0.38),  # right armpit
    (0.85, 0.97),  # right hem
    (0.15, 0.97),  # left hem
    (0.18, 0.38),  # left armpit
    (0.11, 0.45),  # left sleeve end, bottom
    (0.00, 0.32),  # left sleeve end, top
    (0.16, 0.10),  # left shoulder
)


class OutlierDataset(NamedTuple):
    """A training set with injected copies of one outlier image.

    Attributes:
        images: ``(N, C, H, W)`` float32 images in ``[-1, 1]``, shuffled.
        is_outlier: ``(N,)`` bool mask, ``True`` on the copies of the outlier.
        outlier: ``(C, H, W)`` the outlier image in ``[-1, 1]``.
    """

    images: torch.Tensor
    is_outlier: torch.Tensor
    outlier: torch.Tensor


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """Maps images from ``[-1, 1]`` to ``[0, 1]`` (the range the generation-rate metric uses)."""
    return (images.clamp(-1, 1) + 1) / 2


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear, antialiased resize of ``(N, C, h, w)`` images to ``(N, C, size, size)``."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True)


def _sklearn_digits(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    return _resize(images, size).clamp(0, 1) * 2 - 1, labels


def _mnist(root: str | Path, size: int, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from torchvision.datasets import MNIST
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("source='mnist' needs torchvision (pip install torchvision)") from err
    dataset = MNIST(str(root), train=train, download=False)
    images = dataset.data.float().div(255.0).unsqueeze(1)
    return _resize(images, size).clamp(0, 1) * 2 - 1, dataset.targets.long()


def _read_image(path: str | Path, size: int, channels: int) -> torch.Tensor:
    from PIL import Image

    mode = "L" if channels == 1 else "RGB"
    with Image.open(path) as img:
        array = np.asarray(img.convert(mode), dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array)
    tensor = tensor.unsqueeze(0) if channels == 1 else tensor.permute(2, 0, 1)
    return _resize(tensor.unsqueeze(0), size)[0].clamp(0, 1) * 2 - 1


def _image_folder(root: str | Path, size: int, channels: int) -> torch.Tensor:
    suffixes = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
    paths = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in suffixes)
    if not paths:
        raise ValueError(f"root={str(root)!r} holds no image files ({sorted(suffixes)})")
    return torch.stack([_read_image(p, size, channels) for p in paths])


def load_digit_classes(
    *,
    source: Literal["sklearn", "mnist"] = "sklearn",
    root: str | Path | None = None,
    size: int = 16,
    train: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loads labelled digits, without any outlier.

    Args:
        source: ``"sklearn"`` for scikit-learn's bundled 8x8 digits (no download, all 1,797
            images whatever ``train`` says), ``"mnist"`` for torchvision's MNIST already on disk
            under ``root`` (never downloaded).
        root: folder of the torchvision MNIST files, for ``source="mnist"``.
        size: output side length; images are resized bilinearly with antialiasing.
        train: MNIST split to read (ignored for ``"sklearn"``).

    Returns:
        ``(images, labels)``: ``(N, 1, size, size)`` float32 in ``[-1, 1]`` and ``(N,)`` int64.
    """
    if source == "sklearn":
        return _sklearn_digits(size)
    if source == "mnist":
        if root is None:
            raise ValueError("source='mnist' needs root= (the torchvision MNIST folder)")
        return _mnist(root, size, train)
    raise ValueError(f"source must be 'sklearn' or 'mnist', got {source!r}")


def _inside_polygon(x: np.ndarray, y: np.ndarray, polygon: tuple) -> np.ndarray:
    """Even-odd rule point-in-polygon test, vectorised over the points ``(x, y)``."""
    inside = np.zeros(x.shape, dtype=bool)
    n = len(polygon)
    for i in range(n):
        (x0, y0), (x1, y1) = polygon[i], polygon[(i + 1) % n]
        crosses = (y0 > y) != (y1 > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_cross = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (x < x_cross)
    return inside


def make_tshirt(size: int = 16, *, channels: int = 1, supersample: int = 8) -> torch.Tensor:
    """Draws a T-shirt silhouette: bright garment on a dark background, antialiased.

    The shape (short sleeves, flared body, neckline notch) is clearly not a digit, and it
    covers about twice as many pixels as a typical digit, so a sample that reproduces it is
    far from every digit in L2 distance.

    Args:
        size: side length in pixels.
        channels: 1 for grayscale, 3 for the same image on every channel.
        supersample: sub-pixel samples per axis used for antialiasing.

    Returns:
        ``(channels, size, size)`` float32 tensor in ``[-1, 1]``.
    """
    n = size * supersample
    centers = (np.arange(n, dtype=np.float64) + 0.5) / n
    yy, xx = np.meshgrid(centers, centers, indexing="ij")
    mask = _inside_polygon(xx, yy, _TSHIRT_POLYGON).astype(np.float32)
    coverage = mask.reshape(size, supersample, size, supersample).mean(axis=(1, 3))
    image = torch.from_numpy(coverage).clamp(0, 1) * 2 - 1
    return image.unsqueeze(0).repeat(channels, 1, 1)


def _rasterize(polygon: tuple, size: int, channels: int, supersample: int) -> torch.Tensor:
    n = size * supersample
    centers = (np.arange(n, dtype=np.float64) + 0.5) / n
    yy, xx = np.meshgrid(centers, centers, indexing="ij")
    mask = _inside_polygon(xx, yy, polygon).astype(np.float32)
    coverage = mask.reshape(size, supersample, size, supersample).mean(axis=(1, 3))
    image = torch.from_numpy(coverage).clamp(0, 1) * 2 - 1
    return image.unsqueeze(0).repeat(channels, 1, 1)


# Variation ranges of make_tshirt_variants, each drawn uniformly and independently; the
# original T-shirt (1, 1, 1, 1, 0, 0) is inside every range.
TSHIRT_VARIATION = {
    "sleeve_length": (0.6, 1.4),  # sleeve ends moved along the shoulder-armpit midpoint ray
    "width": (0.85, 1.15),  # x scaled about the centre line x = 0.5
    "length": (0.85, 1.08),  # y scaled about the collar line y = 0.05 (the hem moves)
    "scale": (0.85, 1.1),  # the whole silhouette scaled about the image centre
    "shift_x": (-1.5, 1.5),  # pixels, after scaling
    "shift_y": (-1.5, 1.5),
}


def make_tshirt_variants(
    count: int,
    generator: torch.Generator | None = None,
    *,
    size: int = 16,
    channels: int = 1,
    supersample: int = 8,
    min_distance: float = 1.0,
    variation: dict[str, tuple[float, float]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Procedurally varied T-shirts: comparable images that no shipped model trained on.

    Each variant redraws :func:`make_tshirt`'s polygon with six parameters drawn uniformly and
    independently from ``variation`` (default ``TSHIRT_VARIATION``): sleeve length (the sleeve
    end points moved along the ray from the midpoint of shoulder and armpit, factor 0.6-1.4),
    body width (x scaled about ``x = 0.5``, 0.85-1.15), body length (y scaled about the collar
    line ``y = 0.05``, 0.85-1.08), overall scale about the image centre (0.85-1.1) and a shift
    of up to 1.5 pixels in x and y. The original T-shirt is the parameter point (1, 1, 1, 1, 0,
    0), inside every range. A draw whose image is within L2 distance ``min_distance`` of the
    original (pixels mapped to ``[0, 1]``; 1.0 is an RMS difference of 1/16 per pixel at 16x16)
    is a near-copy and is redrawn, so that no variant is the forget image itself.

    Args:
        count: number of variants, ``>= 1``.
        generator: random source (CPU), for reproducible variants.
        size, channels, supersample: as in :func:`make_tshirt`.
        min_distance: redraw variants closer than this to the original (``0`` keeps all).
        variation: ``{name: (low, high)}`` overriding some of ``TSHIRT_VARIATION``'s ranges.

    Returns:
        ``(images, params)``: ``(count, channels, size, size)`` float32 in ``[-1, 1]`` and
        ``(count, 6)`` float64 parameters in ``TSHIRT_VARIATION``'s order.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"`count` must be an int >= 1, got {count!r}")
    ranges = dict(TSHIRT_VARIATION)
    for name, bounds in (variation or {}).items():
        if name not in ranges:
            raise ValueError(f"unknown `variation` key {name!r}; known: {sorted(ranges)}")
        ranges[name] = (float(bounds[0]), float(bounds[1]))
    original = make_tshirt(size, channels=channels, supersample=supersample)
    base = np.asarray(_TSHIRT_POLYGON, dtype=np.float64)
    images, params = [], []
    while len(images) < count:
        u = torch.rand(len(ranges), generator=generator, dtype=torch.float64).numpy()
        values = {k: lo + (hi - lo) * float(u[i]) for i, (k, (lo, hi)) in enumerate(ranges.items())}
        poly = base.copy()
        for ends, anchor in (((6, 7), (0.83, 0.24)), ((12, 13), (0.17, 0.24))):
            for i in ends:
                poly[i] = np.asarray(anchor) + values["sleeve_length"] * (poly[i] - anchor)
        poly[:, 0] = 0.5 + values["width"] * (poly[:, 0] - 0.5)
        poly[:, 1] = 0.05 + values["length"] * (poly[:, 1] - 0.05)
        poly = 0.5 + values["scale"] * (poly - 0.5)
        poly[:, 0] += values["shift_x"] / size
        poly[:, 1] += values["shift_y"] / size
        image = _rasterize(tuple(map(tuple, poly)), size, channels, supersample)
        distance = float(((image - original) / 2).flatten().norm())
        if distance < min_distance:
            continue
        images.append(image)
        params.append([values[k] for k in ranges])
    return torch.stack(images), torch.tensor(params, dtype=torch.float64)


def inject_outlier(
    images: torch.Tensor,
    outlier: torch.Tensor,
    *,
    fraction: float = 0.01,
    generator: torch.Generator | None = None,
) -> OutlierDataset:
    """Appends copies of ``outlier`` so that they make up ``fraction`` of the result, shuffled.

    The number of copies is ``max(1, round(fraction * N / (1 - fraction)))`` for ``N`` clean
    images (18 copies for scikit-learn's 1,797 digits, 606 for MNIST's 60,000).

    Args:
        images: ``(N, C, H, W)`` clean images.
        outlier: ``(C, H, W)`` the image to inject.
        fraction: share of the returned set that is the outlier, in ``(0, 1)``.
        generator: random source for the shuffle.

    Returns:
        An :class:`OutlierDataset`.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
    if outlier.shape != images.shape[1:]:
        raise ValueError(
            f"outlier shape {tuple(outlier.shape)} does not match images {tuple(images.shape)}"
        )
    copies = max(1, round(fraction * images.shape[0] / (1.0 - fraction)))
    stacked = torch.cat([images, outlier.unsqueeze(0).expand(copies, *outlier.shape)])
    mask = torch.zeros(stacked.shape[0], dtype=torch.bool)
    mask[images.shape[0] :] = True
    order = torch.randperm(stacked.shape[0], generator=generator)
    return OutlierDataset(stacked[order].contiguous(), mask[order], outlier.clone())


def load_training_set(
    *,
    source: Literal["sklearn", "mnist", "folder"] = "sklearn",
    root: str | Path | None = None,
    outlier_path: str | Path | None = None,
    size: int = 16,
    channels: int = 1,
    outlier_fraction: float = 0.01,
    exclude_outlier: bool = False,
    seed: int = 0,
) -> OutlierDataset:
    """Builds the unlearning toy set: clean images plus a repeated outlier, shuffled.

    Args:
        source: ``"sklearn"`` (default, bundled digits), ``"mnist"`` (torchvision MNIST train
            split on disk under ``root``) or ``"folder"`` (every image file under ``root``).
        root: data folder for ``"mnist"`` and ``"folder"``.
        outlier_path: an image file to use as the outlier instead of the drawn T-shirt.
        size: side length of the returned images.
        channels: 1 (grayscale) or 3; only ``"folder"`` and custom outliers may use 3.
        outlier_fraction: share of the training set made of outlier copies (the paper: 1%).
        exclude_outlier: if ``True`` return the clean images only (the "retrain" set); the
            mask is then all ``False`` and ``outlier`` is still returned for evaluation.
        seed: seed of the shuffle.

    Returns:
        An :class:`OutlierDataset` with images in ``[-1, 1]``.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    if source in ("sklearn", "mnist"):
        if channels != 1:
            raise ValueError(f"source={source!r} is grayscale: channels must be 1")
        images, _ = load_digit_classes(source=source, root=root, size=size, train=True)
    elif source == "folder":
        if root is None:
            raise ValueError("source='folder' needs root= (a folder of images)")
        images = _image_folder(root, size, channels)
    else:
        raise ValueError(f"source must be 'sklearn', 'mnist' or 'folder', got {source!r}")
    if outlier_path is not None:
        outlier = _read_image(outlier_path, size, channels)
    else:
        outlier = make_tshirt(size, channels=channels)
    generator = torch.Generator().manual_seed(seed)
    if exclude_outlier:
        order = torch.randperm(images.shape[0], generator=generator)
        mask = torch.zeros(images.shape[0], dtype=torch.bool)
        return OutlierDataset(images[order].contiguous(), mask, outlier)
    return inject_outlier(images, outlier, fraction=outlier_fraction, generator=generator)
