"""Image files: bad files give one clear InputError naming the file; 16-bit greyscale keeps its scale."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from leapcore.errors import InputError
from leapcore.images import load_image


def _jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 120, np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("notes.png", b"this is a text file, not a PNG\n"),
        ("corrupt.jpg", _jpeg_bytes()[:40] + b"\x00garbage" * 20),
        ("empty.png", b""),
    ],
)
def test_an_unreadable_image_raises_input_error_naming_the_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InputError, match=name) as caught:
        load_image(path, (8, 8), 3)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("channels", [1, 3])
def test_a_16_bit_png_is_scaled_by_its_bit_depth(tmp_path, channels):
    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    path = tmp_path / "scan.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")  # really stored with 16 bits
    image = load_image(path, None, channels)
    assert image.shape == (channels, 32, 32)
    expected = torch.from_numpy(ramp.astype(np.float32) / 65535.0)
    torch.testing.assert_close(image[0], expected, atol=1e-6, rtol=0)
    assert float((image >= 0.999).float().mean()) < 0.01  # main read 99 % of this as white
    resized = load_image(path, (16, 16), channels)
    assert resized.shape == (channels, 16, 16)
    assert 0.45 < float(resized.mean()) < 0.55
