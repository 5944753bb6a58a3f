"""CLIP-IQA and CLIP score of generated images through torchmetrics, from a local CLIP model.

CLIP-IQA (Wang et al., 2023) is the paper's quality metric for Stable Diffusion unlearning (§5.3:
a run succeeds when the memorized image is gone and CLIP-IQA stays above 0.35). torchmetrics'
``CLIPImageQualityAssessment`` and ``CLIPScore`` do the work; this module loads the CLIP model once
from a local folder (no hub access), adapts transformers 5's ``get_*_features`` (which return a
``ModelOutput``, where torchmetrics 1.9 expects the tensor) and reports a mean with its standard
error.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from typing import Any

import torch

from siss._optional import needs

CLIP_IQA_WEIGHTS = "clip_iqa"


def _tensor_features(model: Any) -> Any:
    """Make ``model.get_text_features``/``get_image_features`` return the projected tensor.

    transformers 5 returns a ``ModelOutput`` (the projection in ``pooler_output``); torchmetrics
    1.9 calls ``.norm`` on the result. Tensors (transformers 4) pass through unchanged.
    """
    for name in ("get_text_features", "get_image_features"):
        method = getattr(model, name)

        @functools.wraps(method)
        def call(*args: Any, _method: Any = method, **kwargs: Any) -> torch.Tensor:
            output = _method(*args, **kwargs)
            return output if isinstance(output, torch.Tensor) else output.pooler_output

        setattr(model, name, call)
    return model


class CLIPQuality:
    """CLIP-IQA per image and CLIP score against a prompt, for uint8 images ``(N, 3, H, W)``.

    Args:
        source: a local folder holding a transformers ``CLIPModel`` and ``CLIPProcessor``
            (``save_pretrained``); or a callable returning ``(model, processor)``; or
            ``"clip_iqa"`` for torchmetrics' own CLIP-IQA weights (needs ``piq`` and its download;
            CLIP score is then not measured, there being no text tower to score with).
        device: where the CLIP model runs (default: the CPU).

    Typical use: ``CLIPQuality("weights/clip-vit-base-patch32", device="cuda")(images,
    "a photo of a cat")`` with a CLIP saved locally.

    Examples:
        A random tiny CLIP built from config (its scores mean nothing):

        >>> import json, tempfile
        >>> from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor
        >>> from transformers import CLIPTokenizer
        >>> folder = tempfile.TemporaryDirectory()
        >>> tokens = ["<|startoftext|>", "<|endoftext|>", *"acost", *(c + "</w>" for c in "acost")]
        >>> with open(f"{folder.name}/vocab.json", "w") as file:
        ...     _ = file.write(json.dumps({token: i for i, token in enumerate(tokens)}))
        >>> with open(f"{folder.name}/merges.txt", "w") as file:
        ...     _ = file.write("#version: 0.2\\n")
        >>> tokenizer = CLIPTokenizer(f"{folder.name}/vocab.json", f"{folder.name}/merges.txt")
        >>> pixels = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32)
        >>> processor = CLIPProcessor(image_processor=pixels, tokenizer=tokenizer)
        >>> tower = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        ...              num_attention_heads=2)
        >>> text = dict(vocab_size=len(tokens), bos_token_id=0, eos_token_id=1, pad_token_id=1)
        >>> config = CLIPConfig(text_config={**text, **tower}, projection_dim=8,
        ...                     vision_config=dict(image_size=32, patch_size=8, **tower))
        >>> _ = torch.manual_seed(0)
        >>> quality = CLIPQuality(lambda: (CLIPModel(config), processor))
        >>> images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
        >>> scores = quality(images, "a cat")
        >>> sorted(scores), 0 <= scores["clip_iqa"] <= 1
        (['clip_iqa', 'clip_iqa_se', 'clip_score'], True)
    """

    def __init__(
        self,
        source: str | os.PathLike[str] | Callable[[], tuple[Any, Any]],
        device: torch.device | str | None = None,
    ):
        with needs("siss.metrics.clip"):
            from torchmetrics.multimodal import CLIPImageQualityAssessment, CLIPScore

        self.device = torch.device(device if device is not None else "cpu")
        if isinstance(source, str) and source == CLIP_IQA_WEIGHTS:
            # piq's model takes [0, 1] images: uint8 / data_range.
            self.iqa = CLIPImageQualityAssessment(CLIP_IQA_WEIGHTS, data_range=255.0)
            self.clip_score = None
        else:
            if callable(source):
                model, processor = source()
            elif isinstance(source, (str, os.PathLike)):
                if not os.path.isdir(source):
                    raise ValueError(
                        f"`source`: no folder {os.fspath(source)!r} (a local CLIPModel + "
                        f"CLIPProcessor, or {CLIP_IQA_WEIGHTS!r} for torchmetrics' weights)"
                    )
                with needs("siss.metrics.clip"):
                    from transformers import CLIPModel, CLIPProcessor

                model = CLIPModel.from_pretrained(source, local_files_only=True)
                processor = CLIPProcessor.from_pretrained(source, local_files_only=True)
            else:
                raise TypeError(
                    f"`source` must be a folder, a callable or {CLIP_IQA_WEIGHTS!r}, got "
                    f"{type(source).__name__}"
                )
            model = _tensor_features(model.eval())

            def load() -> tuple[Any, Any]:  # one model for both metrics
                return model, processor

            # The transformers processor rescales by 1/255 itself: it wants 0..255 values.
            self.iqa = CLIPImageQualityAssessment(load, data_range=1.0)
            self.clip_score = CLIPScore(load)
        self.iqa.to(self.device)
        if self.clip_score is not None:
            self.clip_score.to(self.device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompt: str | None = None) -> dict[str, Any]:
        """Scores of ``images`` (uint8, ``(N, 3, H, W)``, ``N >= 1``).

        Returns:
            ``clip_iqa``: the mean CLIP-IQA in [0, 1] (the probability CLIP gives "Good photo."
            over "Bad photo."); ``clip_iqa_se``: its standard error (``None`` for one image: not
            measurable); ``clip_score``: torchmetrics' CLIP score (100 x cosine, clipped at 0)
            of the images against ``prompt``, or ``None`` with ``clip_score_note`` saying why
            when it was not measured (no prompt, or torchmetrics' CLIP-IQA weights).
        """
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
            raise TypeError(
                "`images` must be a uint8 tensor (N, 3, H, W) in 0..255, got "
                f"{getattr(images, 'dtype', type(images).__name__)}"
            )
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[0] < 1:
            raise ValueError(f"`images` must be (N >= 1, 3, H, W), got {tuple(images.shape)}")
        if prompt is not None and (not isinstance(prompt, str) or not prompt):
            raise ValueError(f"`prompt` must be a non-empty string or None, got {prompt!r}")
        pixels = images.float().to(self.device)
        self.iqa.reset()
        per_image = self.iqa(pixels).reshape(-1).double().cpu()
        result: dict[str, Any] = {
            "clip_iqa": float(per_image.mean()),
            "clip_iqa_se": float(per_image.std() / math.sqrt(len(per_image)))
            if len(per_image) > 1
            else None,
        }
        if self.clip_score is None:
            result["clip_score"] = None
            result["clip_score_note"] = (
                f"not measured: {CLIP_IQA_WEIGHTS!r} weights have no text tower for CLIP score"
            )
        elif prompt is None:
            result["clip_score"] = None
            result["clip_score_note"] = "not measured: no prompt given"
        else:
            self.clip_score.reset()
            result["clip_score"] = float(self.clip_score(pixels, [prompt] * len(pixels)))
        return result
