"""Sample-quality scores on the outputs of an injectable feature extractor.

The paper reports FID (CelebA-HQ, computed with torchmetrics on Inception-v3 features) and an
Inception Score computed with an MNIST classifier instead of Inception-v3 (MNIST T-Shirt,
Table 2). Both are defined here on plain tensors, so that any network can play Inception's
role: :func:`inception_score` takes class logits, :func:`frechet_distance` takes feature
vectors, and :func:`extract` runs a model (an ``nn.Module`` or any callable) over images in
batches. :class:`siss.metrics.DigitClassifier` is the default extractor of the digits example.

References:
    Salimans et al., "Improved Techniques for Training GANs", NeurIPS 2016 (Inception Score).
    Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
    Equilibrium", NeurIPS 2017 (Fréchet Inception Distance).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

__all__ = [
    "ScoreEstimate",
    "extract",
    "fid_score",
    "frechet_distance",
    "frechet_distance_from_statistics",
    "gaussian_statistics",
    "inception_score",
    "is_score",
]


class ScoreEstimate(NamedTuple):
    """A score averaged over splits of the samples.

    Attributes:
        mean: mean of the per-split scores.
        std: population standard deviation of the per-split scores (0 with one split).
    """

    mean: float
    std: float


def _select(output: Any, select: int | str | None) -> torch.Tensor:
    if select is None:
        if not isinstance(output, torch.Tensor):
            raise TypeError(
                f"the extractor returned {type(output).__name__}; pass select= (an index or an "
                "attribute name) to pick a tensor from it"
            )
        return output
    if isinstance(select, str):
        return getattr(output, select) if hasattr(output, select) else output[select]
    return output[select]


@torch.no_grad()
def extract(
    extractor: Callable[[torch.Tensor], Any],
    images: torch.Tensor,
    *,
    select: int | str | None = None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Runs ``extractor`` over ``images`` in batches, without gradients.

    An ``nn.Module`` is put in eval mode for the call and restored afterwards.

    Args:
        extractor: maps a ``(b, C, H, W)`` batch to a tensor ``(b, F)``, or to a tuple /
            NamedTuple / dict holding one (pick it with ``select``).
        images: ``(N, C, H, W)`` images in the range the extractor expects.
        select: index or name of the output to keep, or ``None`` if it is a tensor.
        batch_size: images per call.
        device: where to run the batches (default: the images' device).
        progress: show a tqdm bar.

    Returns:
        ``(N, F)`` float32 outputs on the CPU.
    """
    if images.dim() < 2 or images.shape[0] == 0:
        raise ValueError(f"images must be (N, ...) with N > 0, got {tuple(images.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    was_training = isinstance(extractor, torch.nn.Module) and extractor.training
    if was_training:
        extractor.eval()
    try:
        out = []
        starts = range(0, images.shape[0], batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="extract")
        for start in starts:
            batch = images[start : start + batch_size]
            if device is not None:
                batch = batch.to(device)
            feats = _select(extractor(batch), select)
            out.append(feats.reshape(feats.shape[0], -1).float().cpu())
    finally:
        if was_training:
            extractor.train()
    return torch.cat(out)


def inception_score(logits: torch.Tensor, *, splits: int = 1) -> ScoreEstimate:
    """Inception Score :math:`\\exp(\\mathbb E_x\\, KL(p(y|x) \\,\\|\\, p(y)))` from logits.

    Computed in float64 from ``log_softmax``; ``p(y)`` is the mean prediction of each split.
    It is ``K`` for confident predictions spread evenly over ``K`` classes and 1 when every
    prediction is the same.

    Args:
        logits: ``(N, K)`` unnormalised class scores.
        splits: number of equal, contiguous splits the score is averaged over (the remainder
            of ``N / splits`` samples is dropped).

    Returns:
        A :class:`ScoreEstimate`.

    Example:
        >>> logits = 50.0 * torch.eye(10).repeat(3, 1)  # confident, 3 samples per class
        >>> round(inception_score(logits).mean, 6)
        10.0
    """
    if logits.dim() != 2 or logits.shape[0] == 0:
        raise ValueError(f"logits must be (N, K) with N > 0, got {tuple(logits.shape)}")
    if not 1 <= splits <= logits.shape[0]:
        raise ValueError(f"splits must be in [1, N={logits.shape[0]}], got {splits!r}")
    log_p = torch.log_softmax(logits.to(torch.float64), dim=1)
    size = logits.shape[0] // splits
    scores = []
    for k in range(splits):
        part = log_p[k * size : (k + 1) * size]
        log_py = torch.logsumexp(part, dim=0) - torch.log(part.new_tensor(float(part.shape[0])))
        kl = (part.exp() * (part - log_py)).sum(1)
        scores.append(torch.exp(kl.mean()))
    values = torch.stack(scores)
    return ScoreEstimate(float(values.mean()), float(values.std(unbiased=False)))


def gaussian_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``(F,)`` and unbiased covariance ``(F, F)`` of ``(N, F)`` features, in float64."""
    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be (N, F) with N >= 2, got {tuple(features.shape)}")
    f = features.to(torch.float64)
    mu = f.mean(0)
    centered = f - mu
    return mu, centered.T @ centered / (f.shape[0] - 1)


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix (eigh, clamped)."""
    sym = 0.5 * (matrix + matrix.T)
    evals, evecs = torch.linalg.eigh(sym)
    return (evecs * evals.clamp(min=0).sqrt()) @ evecs.T


def frechet_distance_from_statistics(
    mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor
) -> float:
    """Squared Fréchet (2-Wasserstein) distance between two Gaussians, in float64.

    .. math:: \\|\\mu_1 - \\mu_2\\|^2 + \\operatorname{tr}\\Sigma_1 + \\operatorname{tr}\\Sigma_2
        - 2 \\operatorname{tr}\\big(\\Sigma_1^{1/2} \\Sigma_2 \\Sigma_1^{1/2}\\big)^{1/2}

    The cross term uses the symmetric form, whose eigenvalues are real and non-negative, so no
    complex square root is needed (``tr sqrt(S1 S2)`` equals it since ``S1 S2`` is similar
    to ``S1^{1/2} S2 S1^{1/2}``).

    Args:
        mu1: ``(F,)`` mean of the first set.
        sigma1: ``(F, F)`` covariance of the first set.
        mu2: ``(F,)`` mean of the second set.
        sigma2: ``(F, F)`` covariance of the second set.

    Returns:
        The distance, clamped at 0 against round-off.
    """
    mu1, mu2 = mu1.to(torch.float64), mu2.to(torch.float64)
    s1, s2 = sigma1.to(torch.float64), sigma2.to(torch.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (*mu1.shape, *mu1.shape):
        raise ValueError(
            f"shapes do not match: mu1 {tuple(mu1.shape)}, sigma1 {tuple(s1.shape)}, "
            f"mu2 {tuple(mu2.shape)}, sigma2 {tuple(s2.shape)}"
        )
    root1 = _psd_sqrt(s1)
    cross = torch.linalg.eigvalsh(0.5 * (root1 @ s2 @ root1 + (root1 @ s2 @ root1).T))
    value = (mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * cross.clamp(0).sqrt().sum()
    return max(float(value), 0.0)


def frechet_distance(features1: torch.Tensor, features2: torch.Tensor) -> float:
    """FID-style score: Fréchet distance between Gaussians fitted to two feature sets.

    Args:
        features1: ``(N1, F)`` features of the first image set.
        features2: ``(N2, F)`` features of the second image set.

    Returns:
        The squared Fréchet distance (what FID reports).

    Example:
        >>> f = torch.randn(500, 4, generator=torch.Generator().manual_seed(0))
        >>> frechet_distance(f, f) < 1e-9
        True
    """
    return frechet_distance_from_statistics(
        *gaussian_statistics(features1), *gaussian_statistics(features2)
    )


def is_score(
    extractor: Callable[[torch.Tensor], Any],
    images: torch.Tensor,
    *,
    select: int | str | None = None,
    splits: int = 1,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> ScoreEstimate:
    """Inception-Score-style score of ``images`` under a classifier's logits.

    Args:
        extractor: returns ``(b, K)`` logits, or an output holding them (see ``select``).
        images: ``(N, C, H, W)`` images in the range the classifier expects.
        select: which output holds the logits (e.g. ``"logits"`` for
            :class:`~siss.metrics.DigitClassifier`).
        splits: see :func:`inception_score`.
        batch_size: images per call.
        device: where to run the classifier.
        progress: show a tqdm bar.

    Returns:
        A :class:`ScoreEstimate`.
    """
    logits = extract(
        extractor, images, select=select, batch_size=batch_size, device=device, progress=progress
    )
    return inception_score(logits, splits=splits)


def fid_score(
    extractor: Callable[[torch.Tensor], Any],
    images1: torch.Tensor,
    images2: torch.Tensor,
    *,
    select: int | str | None = None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> float:
    """FID-style score between two image sets under a feature extractor.

    Args:
        extractor: returns ``(b, F)`` features, or an output holding them (see ``select``).
        images1: ``(N1, C, H, W)`` e.g. generated samples.
        images2: ``(N2, C, H, W)`` e.g. reference data.
        select: which output holds the features (``"features"`` for
            :class:`~siss.metrics.DigitClassifier`).
        batch_size: images per call.
        device: where to run the extractor.
        progress: show a tqdm bar.

    Returns:
        The squared Fréchet distance between the fitted Gaussians.
    """
    kwargs = {"select": select, "batch_size": batch_size, "device": device, "progress": progress}
    return frechet_distance(
        extract(extractor, images1, **kwargs), extract(extractor, images2, **kwargs)
    )
