"""Reading an image file as a tensor, whatever its bit depth: the one reader of the commands
(``siss-audit``'s folders, ``siss-stable-diffusion``'s ``--reference_image``) and the digits
examples' image folders.

PIL's ``convert("L")`` / ``convert("RGB")`` clips a 16-bit grayscale image (mode ``I;16``, what
a 16-bit PNG opens as) at 255, so that almost every pixel read as white; such an image is
scaled by 65535 here. A 32-bit integer or float image (modes ``I``, ``F``: TIFFs) has no range
to scale by and is refused.
"""

from __future__ import annotations

from pathlib import Path

import torch

from siss._optional import needs


def read_image(path: str | Path, channels: int, *, package: str = "siss") -> torch.Tensor:
    """``(channels, H, W)`` float32 in ``[0, 1]`` from the image file ``path``.

    8-bit modes (``L``, ``RGB``, ``RGBA``, ``P``, ``1``, ``CMYK``, ...) go through PIL's
    conversion to ``L`` (``channels=1``) or ``RGB`` (3) and are divided by 255; 16-bit grayscale
    (``I;16*``) is divided by 65535 (and repeated for 3 channels).

    Args:
        path: the file.
        channels: 1 or 3.
        package: named in the message when PIL is missing (``siss._optional.needs``).

    Raises:
        ValueError: not an image PIL can read, or a 32-bit image (the caller names the file
            and its flag).
        FileNotFoundError: no file at ``path``.
    """
    import numpy as np

    with needs(package):
        from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            mode = image.mode
            if mode in ("I", "F"):
                kind = "integer" if mode == "I" else "float"
                raise ValueError(
                    f"a 32-bit {kind} image (mode {mode}), whose range is unknown: save it with "
                    "8 or 16 bits a channel"
                )
            if mode.startswith("I;16"):
                array = np.asarray(image).astype(np.float32) / 65535.0
                array = np.repeat(array[..., None], channels, axis=-1)
            else:
                array = np.asarray(image.convert("L" if channels == 1 else "RGB"))
                array = array.astype(np.float32) / 255.0
                if channels == 1:
                    array = array[..., None]
    except FileNotFoundError:
        raise
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"not an image that PIL can read ({error})") from None
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
