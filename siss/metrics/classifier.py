"""A tiny digit classifier, the default feature extractor of the digits example.

The paper's MNIST T-Shirt experiment computes its Inception Score with an MNIST classifier in
place of Inception-v3 (Hasanaliyev et al., 2025, Table 2). ``DigitClassifier`` plays that
role for the 16x16 digits of ``examples/``: its logits feed ``siss.metrics.is_score`` and
its penultimate features feed ``siss.metrics.fid_score``. Trained weights ship as
``examples/assets/digit_classifier.safetensors`` (see ``examples/train_classifier.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from siss._optional import needs
from siss.metrics._validate import check_int, check_real, check_tensor

__all__ = ["ClassifierOutput", "DigitClassifier"]


class ClassifierOutput(NamedTuple):
    """Output of ``DigitClassifier``.

    Attributes:
        logits: ``(B, num_classes)`` class scores.
        features: ``(B, feature_dim)`` penultimate activations (after ReLU).

    Examples:
        >>> logits, features = DigitClassifier(feature_dim=32)(torch.zeros(3, 1, 16, 16))
        >>> logits.shape, features.shape
        (torch.Size([3, 10]), torch.Size([3, 32]))
    """

    logits: torch.Tensor
    features: torch.Tensor


class DigitClassifier(nn.Module):
    """Small CNN for square grayscale digits in ``[-1, 1]``.

    Two stages of (3x3 conv, ReLU, 3x3 conv, ReLU, 2x2 max-pool) with 32 and 64 channels, then
    a ``feature_dim`` fully connected layer and a linear classifier (about 0.2M parameters at
    16x16).

    Args:
        image_size: side of the input images, a positive multiple of 4.
        in_channels: input channels, ``>= 1``.
        num_classes: number of classes, ``>= 1``.
        feature_dim: width of the penultimate layer returned as ``features``, ``>= 1``.
        dropout: dropout probability in ``[0, 1]`` before the classifier (training only).

    Ints (numpy ints too, not bools) and a real ``dropout`` are checked; a bad value raises
    ``TypeError`` / ``ValueError`` naming the argument.

    Examples:
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
        image_size = check_int(image_size, "image_size", minimum=4)
        if image_size % 4:
            raise ValueError(f"`image_size` must be a positive multiple of 4, got {image_size!r}")
        in_channels = check_int(in_channels, "in_channels", minimum=1)
        num_classes = check_int(num_classes, "num_classes", minimum=1)
        feature_dim = check_int(feature_dim, "feature_dim", minimum=1)
        dropout = check_real(dropout, "dropout", low=0.0, high=1.0)
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
        """Classifies ``(B, in_channels, image_size, image_size)`` images in ``[-1, 1]``.

        ``x`` must have the model's floating dtype and device (``TypeError`` / ``ValueError``
        naming ``x`` otherwise: convert 8-bit images to ``[-1, 1]`` first). Non-finite pixels
        give non-finite outputs, which ``is_score`` and
        ``fid_score`` report.
        """
        expected = (self.in_channels, self.image_size, self.image_size)
        dims = f"(B, {', '.join(map(str, expected))})"
        x = check_tensor(x, "x", dims=dims, ndim=4)
        if tuple(x.shape[1:]) != expected:
            raise ValueError(f"`x` must be {dims} images, got {tuple(x.shape)}")
        weight = self.head.weight
        if x.dtype != weight.dtype:
            raise TypeError(f"`x` must have the model's dtype {weight.dtype}, got {x.dtype}")
        if x.device != weight.device:
            raise ValueError(f"`x` must be on the model's device {weight.device}, got {x.device}")
        features = self.body(x)
        return ClassifierOutput(self.head(self.dropout(features)), features)

    @classmethod
    def from_file(
        cls, path: str | Path, *, map_location: str | torch.device = "cpu", **kwargs
    ) -> DigitClassifier:
        """Builds a classifier (constructor ``kwargs``) and loads safetensors weights into it.

        The returned model is in eval mode.
        """
        with needs("siss.metrics.classifier"):
            from safetensors.torch import load_file

        model = cls(**kwargs)
        model.load_state_dict(load_file(str(path), device=str(map_location)))
        return model.eval()
