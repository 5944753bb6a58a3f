"""A tiny digit classifier, the default feature extractor of the digits example.

The paper's MNIST T-Shirt experiment computes its Inception Score with an MNIST classifier in
place of Inception-v3 (Hasanaliyev et al., 2025, Table 2). :class:`DigitClassifier` plays that
role for the 16x16 digits of ``examples/``: its logits feed :func:`siss.metrics.is_score` and
its penultimate features feed :func:`siss.metrics.fid_score`. Trained weights ship as
``examples/assets/digit_classifier.safetensors`` (see ``examples/train_classifier.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

__all__ = ["ClassifierOutput", "DigitClassifier"]


class ClassifierOutput(NamedTuple):
    """Output of :class:`DigitClassifier`.

    Attributes:
        logits: ``(B, num_classes)`` class scores.
        features: ``(B, feature_dim)`` penultimate activations (after ReLU).
    """

    logits: torch.Tensor
    features: torch.Tensor


class DigitClassifier(nn.Module):
    """Small CNN for square grayscale digits in ``[-1, 1]``.

    Two stages of (3x3 conv, ReLU, 3x3 conv, ReLU, 2x2 max-pool) with 32 and 64 channels, then
    a ``feature_dim`` fully connected layer and a linear classifier (about 0.2M parameters at
    16x16).

    Args:
        image_size: side of the input images, a multiple of 4.
        in_channels: input channels.
        num_classes: number of classes.
        feature_dim: width of the penultimate layer returned as ``features``.
        dropout: dropout before the classifier (training only).

    Example:
        >>> model = DigitClassifier()
        >>> out = model(torch.zeros(2, 1, 16, 16))
        >>> tuple(out.logits.shape), tuple(out.features.shape)
        ((2, 10), (2, 128))
    """

    def __init__(
        self,
        image_size: int = 16,
        in_channels: int = 1,
        num_classes: int = 10,
        feature_dim: int = 128,
        dropout: float = 0.25,
    ) -> None:
        super().__init__()
        if image_size < 4 or image_size % 4:
            raise ValueError(f"image_size must be a positive multiple of 4, got {image_size!r}")
        self.image_size = image_size
        self.in_channels = in_channels
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * (image_size // 4) ** 2, feature_dim),
            nn.ReLU(),
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> ClassifierOutput:
        """Classifies ``(B, in_channels, image_size, image_size)`` images in ``[-1, 1]``."""
        expected = (self.in_channels, self.image_size, self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"expected (B, {expected}) images, got {tuple(x.shape)}")
        features = self.body(x)
        return ClassifierOutput(self.head(self.dropout(features)), features)

    @classmethod
    def from_file(
        cls, path: str | Path, *, map_location: str | torch.device = "cpu", **kwargs
    ) -> DigitClassifier:
        """Builds a classifier (constructor ``kwargs``) and loads safetensors weights into it.

        The returned model is in eval mode.
        """
        from safetensors.torch import load_file

        model = cls(**kwargs)
        model.load_state_dict(load_file(str(path), device=str(map_location)))
        return model.eval()
