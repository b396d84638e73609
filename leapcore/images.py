"""Image files: tensors in [0, 1] to PNG and back, written atomically."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image


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
    """Read an image file as ``[C, H, W]`` float in [0, 1], resized to ``size`` (H, W) if given."""
    img = Image.open(path)
    img = img.convert("L" if channels == 1 else "RGB")
    if size is not None:
        img = img.resize((size[1], size[0]), Image.BICUBIC)
    array = np.asarray(img, dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = array[None]
    else:
        array = array.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(array))
