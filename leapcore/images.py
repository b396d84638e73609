"""Image files: tensors in [0, 1] to PNG and back, written atomically."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from leapcore.errors import InputError


def to_uint8(
    image: torch.Tensor | np.ndarray, alpha: torch.Tensor | np.ndarray | None = None
) -> np.ndarray:
    """``[C, H, W]`` in [0, 1] (optionally with ``[1, H, W]`` alpha) -> ``[H, W, C]`` uint8."""
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if alpha is not None:
        a = alpha.detach().cpu().numpy() if isinstance(alpha, torch.Tensor) else np.asarray(alpha)
        array = np.concatenate([array, a], axis=0)
    array = np.clip(array, 0.0, 1.0).transpose(1, 2, 0)
    if array.shape[2] == 1:
        array = array[:, :, 0]
    return (array * 255.0 + 0.5).astype(np.uint8)


def save_png(path: str | os.PathLike, image: torch.Tensor | np.ndarray, alpha=None) -> Path:
    """Write a PNG atomically (temp file, then rename): a killed run never leaves half an image."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".png.tmp")
    os.close(fd)
    try:
        Image.fromarray(to_uint8(image, alpha)).save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_image(
    path: str | os.PathLike, size: tuple[int, int] | None = None, channels: int = 3
) -> torch.Tensor:
    """Read an image file as ``[C, H, W]`` float in [0, 1], resized to ``size`` (H, W) if given.

    16-bit and 32-bit greyscale images (``I;16``, ``I``: medical and scientific images) are scaled
    by their bit depth, not clipped to 8 bits.

    Raises:
        InputError: the file is not a readable image (corrupt, truncated, another format), naming
            the file. Reading it again cannot help, so stages do not retry it.
    """
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in _HIGH_DEPTH:
                return _high_depth(img, size, channels)
            img = img.convert("L" if channels == 1 else "RGB")
            if size is not None:
                img = img.resize((size[1], size[0]), Image.BICUBIC)
            array = np.asarray(img, dtype=np.float32) / 255.0
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise InputError(
            f"{os.fspath(path)} is not a readable image ({type(err).__name__}: {err}); replace or "
            "remove the file."
        ) from None
    if array.ndim == 2:
        array = array[None]
    else:
        array = array.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(array))


# Pillow's high bit depth greyscale modes -> the full-scale value of the file's bit depth.
_HIGH_DEPTH = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0, "I": 65535.0}


def _high_depth(img: Image.Image, size: tuple[int, int] | None, channels: int) -> torch.Tensor:
    """A 16-bit greyscale image in [0, 1] (PNG stores 16-bit greyscale, which Pillow opens as I;16
    or I), resized in float so no precision is lost."""
    full_scale = _HIGH_DEPTH[img.mode]
    if img.mode == "I" and np.asarray(img).max(initial=0) > full_scale:
        full_scale = float(2**32 - 1)  # a real 32-bit image
    array = np.asarray(img, dtype=np.float64) / full_scale
    grey = Image.fromarray(array.astype(np.float32))
    if size is not None:
        grey = grey.resize((size[1], size[0]), Image.BICUBIC)
    tensor = torch.from_numpy(np.clip(np.asarray(grey, dtype=np.float32), 0.0, 1.0).copy())[None]
    return tensor.expand(channels, -1, -1).contiguous()
