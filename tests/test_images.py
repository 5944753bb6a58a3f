"""``siss._images.read_image``: every bit depth read to ``[0, 1]``, or refused by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from siss._images import read_image


def test_a_16_bit_image_reads_as_its_8_bit_copy(tmp_path):
    """PIL's ``convert("L")`` clips a 16-bit image at 255: nearly every pixel read as white."""
    gray = np.random.default_rng(0).integers(0, 256, (8, 12), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "8.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "16.png")
    assert Image.open(tmp_path / "16.png").mode.startswith("I;16")
    for channels in (1, 3):
        eight = read_image(tmp_path / "8.png", channels)
        sixteen = read_image(tmp_path / "16.png", channels)
        assert eight.shape == sixteen.shape == (channels, 8, 12)
        assert eight.dtype == sixteen.dtype == torch.float32
        torch.testing.assert_close(sixteen, eight, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["RGBA", "P", "LA", "1", "CMYK"])
def test_8_bit_modes_read_through_pil_conversion(tmp_path, mode):
    image = Image.new(mode, (5, 4), 1 if mode == "1" else None)
    path = tmp_path / ("a.tiff" if mode == "CMYK" else "a.png")
    image.save(path)
    expected = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    torch.testing.assert_close(read_image(path, 3), torch.from_numpy(expected).permute(2, 0, 1))


def test_what_has_no_known_range_or_is_no_image_is_refused(tmp_path):
    Image.fromarray(np.zeros((4, 4), dtype=np.float32), mode="F").save(tmp_path / "f.tiff")
    with pytest.raises(ValueError, match="32-bit float image"):
        read_image(tmp_path / "f.tiff", 1)
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="not an image that PIL can read"):
        read_image(tmp_path / "text.png", 3)
    with pytest.raises(FileNotFoundError):
        read_image(tmp_path / "missing.png", 3)
