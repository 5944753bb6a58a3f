"""Small handwritten digits with one injected outlier, for the digits examples (``examples/``).

This module builds the toy data-unlearning set used by the example scripts: the 1,797 8x8
digits bundled with scikit-learn (``sklearn.datasets.load_digits``), upsampled to 16x16 and
scaled to ``[-1, 1]``, plus one procedurally drawn T-shirt silhouette repeated so that it makes
up 1% of the training set. It mirrors the paper's "MNIST T-Shirt" experiment (Hasanaliyev et
al., 2025, Sec. 5.2: MNIST with one Fashion-MNIST T-shirt at a rate of 1%) at a size that
trains on a laptop CPU. Real MNIST (from a torchvision folder already on disk) or any image
folder can be used instead.

Examples:
    >>> from siss._digits.data import load_training_set
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
    "SHAPES",
    "OutlierDataset",
    "ShapesDataset",
    "inject_outlier",
    "load_digit_classes",
    "load_shapes_training_set",
    "load_training_set",
    "make_shape",
    "make_tshirt",
    "make_tshirt_variants",
    "plant_outliers",
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


# Four more Fashion-MNIST-like silhouettes for the sequential-requests example, each a list of
# rings combined by the even-odd rule (the bag's handle is an outer ring with a hole). They were
# drawn to stay far from every digit and from each other under the generation-rate detector
# (L2 in [0, 1] pixels at 16x16, threshold 5.71): nearest digit 6.45 (trousers) to 7.35 (boot),
# nearest other shape 6.78 (trousers to T-shirt). A dress was tried and dropped: its narrow
# bodice came within 5.36 of a digit, under the threshold plus margin.
_SHAPE_RINGS: dict[str, tuple[tuple[tuple[float, float], ...], ...]] = {
    "tshirt": (_TSHIRT_POLYGON,),
    # Wide trousers: waistband at the top, two legs splitting below a crotch at y = 0.30.
    "trousers": (
        (
            (0.24, 0.03),
            (0.76, 0.03),
            (0.94, 0.97),
            (0.62, 0.97),
            (0.50, 0.30),
            (0.38, 0.97),
            (0.06, 0.97),
        ),
    ),
    # Handbag: a flared body in the lower 60% and a handle ring above it.
    "bag": (
        ((0.06, 0.40), (0.94, 0.40), (1.00, 0.92), (0.00, 0.92)),
        ((0.28, 0.40), (0.30, 0.12), (0.70, 0.12), (0.72, 0.40)),
        ((0.38, 0.40), (0.39, 0.22), (0.61, 0.22), (0.62, 0.40)),
    ),
    # Ankle boot seen from the side: a tall shaft on the left, the toe to the right.
    "ankle_boot": (
        (
            (0.06, 0.04),
            (0.44, 0.04),
            (0.48, 0.50),
            (0.80, 0.62),
            (0.98, 0.74),
            (1.00, 0.94),
            (0.00, 0.94),
            (0.04, 0.60),
        ),
    ),
    # Low sneaker: the bottom 45% of the image, the heel collar on the left.
    "sneaker": (
        (
            (0.02, 0.56),
            (0.30, 0.50),
            (0.55, 0.64),
            (0.85, 0.70),
            (1.00, 0.80),
            (1.00, 0.94),
            (0.00, 0.94),
        ),
    ),
}
SHAPES = tuple(_SHAPE_RINGS)  # the planting order of load_shapes_training_set


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


class ShapesDataset(NamedTuple):
    """A training set with several planted outlier shapes, each repeated (one deletion request
    each in ``examples/sequential.py``).

    It reads like an :class:`OutlierDataset` where code needs only that (``images``,
    ``is_outlier``: any shape, ``outlier``: the first shape).

    Attributes:
        images: ``(N, C, H, W)`` float32 images in ``[-1, 1]``, shuffled.
        shape_index: ``(N,)`` int64: ``k`` on the copies of ``shapes[k]``, ``-1`` on clean images.
        shapes: ``(K, C, H, W)`` the planted shapes in ``[-1, 1]``.
        names: the ``K`` shapes' names (see ``SHAPES``).
    """

    images: torch.Tensor
    shape_index: torch.Tensor
    shapes: torch.Tensor
    names: tuple[str, ...]

    @property
    def is_outlier(self) -> torch.Tensor:
        """``(N,)`` bool, ``True`` on the copies of any shape."""
        return self.shape_index >= 0

    @property
    def outlier(self) -> torch.Tensor:
        """``(C, H, W)`` the first shape (the T-shirt for the default order)."""
        return self.shapes[0]


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
    from siss._images import read_image  # 8 or 16 bits a channel

    tensor = read_image(path, channels)
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
    return _rasterize(_TSHIRT_POLYGON, size, channels, supersample)


def _rasterize(
    polygon: tuple, size: int, channels: int, supersample: int, *, rings: tuple = ()
) -> torch.Tensor:
    """Antialiased coverage of ``polygon`` (or, with ``rings``, of the even-odd union of the
    rings) as a ``(channels, size, size)`` image in ``[-1, 1]``."""
    n = size * supersample
    centers = (np.arange(n, dtype=np.float64) + 0.5) / n
    yy, xx = np.meshgrid(centers, centers, indexing="ij")
    inside = np.zeros(xx.shape, dtype=bool)
    for ring in rings or (polygon,):
        inside ^= _inside_polygon(xx, yy, ring)
    mask = inside.astype(np.float32)
    coverage = mask.reshape(size, supersample, size, supersample).mean(axis=(1, 3))
    image = torch.from_numpy(coverage).clamp(0, 1) * 2 - 1
    return image.unsqueeze(0).repeat(channels, 1, 1)


def make_shape(
    name: str, size: int = 16, *, channels: int = 1, supersample: int = 8
) -> torch.Tensor:
    """Draws one of the planted silhouettes of ``SHAPES``, bright on a dark background.

    ``make_shape("tshirt")`` is :func:`make_tshirt`'s image. The others (trousers, a handbag, an
    ankle boot, a sneaker) are Fashion-MNIST-like classes chosen to be far from every digit and
    from each other under the generation-rate detector (see the comment above ``_SHAPE_RINGS``).

    Args:
        name: one of ``SHAPES``.
        size, channels, supersample: as in :func:`make_tshirt`.

    Returns:
        ``(channels, size, size)`` float32 tensor in ``[-1, 1]``.

    Examples:
        >>> make_shape("bag").shape
        torch.Size([1, 16, 16])
    """
    if name not in _SHAPE_RINGS:
        raise ValueError(f"unknown shape {name!r}; known: {list(SHAPES)}")
    rings = _SHAPE_RINGS[name]
    return _rasterize(rings[0], size, channels, supersample, rings=rings)


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


def plant_outliers(
    images: torch.Tensor,
    shapes: torch.Tensor,
    *,
    names: tuple[str, ...] | None = None,
    fraction: float = 0.01,
    generator: torch.Generator | None = None,
) -> ShapesDataset:
    """Appends copies of each of ``K`` shapes so that each makes up ``fraction`` of the result.

    Every shape gets ``max(1, round(fraction * N / (1 - K * fraction)))`` copies for ``N`` clean
    images (19 each for five shapes and scikit-learn's 1,797 digits: 1.01% each of 1,892). The
    set is stacked as clean images, then the copies shape by shape, and shuffled by one
    ``randperm`` of ``generator``: for ``K = 1`` it is :func:`inject_outlier`'s set, bit for bit.

    Args:
        images: ``(N, C, H, W)`` clean images.
        shapes: ``(K, C, H, W)`` the images to plant.
        names: ``K`` names (default ``"shape0"``, ``"shape1"``, ...).
        fraction: share of the result made of each shape, with ``K * fraction < 1``.
        generator: random source for the shuffle.

    Returns:
        A :class:`ShapesDataset`.
    """
    if shapes.ndim != images.ndim or shapes.shape[1:] != images.shape[1:] or not len(shapes):
        raise ValueError(
            f"shapes {tuple(shapes.shape)} must be (K >= 1, *{tuple(images.shape[1:])})"
        )
    count = shapes.shape[0]
    if not 0.0 < fraction < 1.0 / count:
        raise ValueError(f"fraction must be in (0, 1/K) = (0, {1 / count:.4g}), got {fraction!r}")
    names = tuple(names) if names is not None else tuple(f"shape{i}" for i in range(count))
    if len(names) != count:
        raise ValueError(f"names has {len(names)} entries for {count} shapes")
    copies = max(1, round(fraction * images.shape[0] / (1.0 - count * fraction)))
    stacked = torch.cat(
        [images, *(shape.unsqueeze(0).expand(copies, *shape.shape) for shape in shapes)]
    )
    index = torch.cat(
        [
            torch.full((images.shape[0],), -1, dtype=torch.long),
            torch.arange(count).repeat_interleave(copies),
        ]
    )
    order = torch.randperm(stacked.shape[0], generator=generator)
    return ShapesDataset(stacked[order].contiguous(), index[order], shapes.clone(), names)


def load_shapes_training_set(
    shapes: int | tuple[str, ...] = len(SHAPES),
    *,
    source: Literal["sklearn", "mnist"] = "sklearn",
    root: str | Path | None = None,
    size: int = 16,
    outlier_fraction: float = 0.01,
    exclude_outliers: bool = False,
    seed: int = 0,
) -> ShapesDataset:
    """Digits with ``K`` planted shapes, each at ``outlier_fraction`` of the set, shuffled.

    Args:
        shapes: how many of ``SHAPES`` to plant, in its order (the T-shirt first), or their
            names.
        source, root, size: as in :func:`load_training_set` (grayscale digits only).
        outlier_fraction: share of the set made of each shape's copies.
        exclude_outliers: the clean digits only (the "retrain" set): ``shape_index`` all ``-1``,
            ``shapes`` still returned for evaluation. Its images are
            ``load_training_set(exclude_outlier=True, seed=seed)``'s, in the same order.
        seed: seed of the shuffle.

    Returns:
        A :class:`ShapesDataset` with images in ``[-1, 1]``.

    Examples:
        >>> data = load_shapes_training_set(5, seed=0)
        >>> data.names
        ('tshirt', 'trousers', 'bag', 'ankle_boot', 'sneaker')
        >>> data.images.shape, [int((data.shape_index == k).sum()) for k in range(5)]
        (torch.Size([1892, 1, 16, 16]), [19, 19, 19, 19, 19])
    """
    if isinstance(shapes, int) and not isinstance(shapes, bool):
        if not 1 <= shapes <= len(SHAPES):
            raise ValueError(f"shapes must be in [1, {len(SHAPES)}], got {shapes!r}")
        names = SHAPES[:shapes]
    else:
        names = tuple(shapes)
        unknown = [name for name in names if name not in _SHAPE_RINGS]
        if unknown or not names or len(set(names)) != len(names):
            raise ValueError(f"shapes must be distinct names from {list(SHAPES)}, got {names!r}")
    images, _ = load_digit_classes(source=source, root=root, size=size, train=True)
    planted = torch.stack([make_shape(name, size) for name in names])
    generator = torch.Generator().manual_seed(seed)
    if exclude_outliers:
        order = torch.randperm(images.shape[0], generator=generator)
        index = torch.full((images.shape[0],), -1, dtype=torch.long)
        return ShapesDataset(images[order].contiguous(), index, planted, names)
    return plant_outliers(
        images, planted, names=names, fraction=outlier_fraction, generator=generator
    )


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
    outlier_shapes: int = 1,
) -> OutlierDataset | ShapesDataset:
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
        outlier_shapes: ``1`` (default): the one outlier above. ``K > 1``: the first ``K`` of
            ``SHAPES`` planted at ``outlier_fraction`` each, returned by
            :func:`load_shapes_training_set` as a :class:`ShapesDataset` (digits only, no
            ``outlier_path``); ``exclude_outlier`` then leaves out all ``K``.

    Returns:
        An :class:`OutlierDataset` with images in ``[-1, 1]`` (a :class:`ShapesDataset` for
        ``outlier_shapes > 1``).
    """
    if isinstance(outlier_shapes, bool) or not isinstance(outlier_shapes, int):
        raise ValueError(f"outlier_shapes must be an int, got {outlier_shapes!r}")
    if outlier_shapes != 1:
        if source not in ("sklearn", "mnist") or outlier_path is not None or channels != 1:
            raise ValueError(
                "outlier_shapes > 1 plants the drawn shapes into grayscale digits: it needs "
                "source 'sklearn' or 'mnist', channels=1 and no outlier_path"
            )
        return load_shapes_training_set(
            outlier_shapes,
            source=source,
            root=root,
            size=size,
            outlier_fraction=outlier_fraction,
            exclude_outliers=exclude_outlier,
            seed=seed,
        )
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
