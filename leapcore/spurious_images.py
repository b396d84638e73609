"""The spurious-feature scan's evidence images: PNG strips of a class's images with their blobs
outlined, and of pastes onto other classes' images (the ``spurious`` table's PNG columns)."""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from leapcore.images import to_uint8


def _tile(image: torch.Tensor, size: int) -> np.ndarray:
    rgb = to_uint8(image.cpu())
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[:, :, None], 3, axis=2)
    elif rgb.shape[2] == 1:
        rgb = np.repeat(rgb, 3, axis=2)
    return np.array(Image.fromarray(rgb[:, :, :3]).resize((size, size), Image.NEAREST))


def _outline(tile: np.ndarray, region: torch.Tensor) -> np.ndarray:
    size = tile.shape[0]
    big = F.interpolate(region.float()[None, None], size=(size, size), mode="nearest")
    eroded = -F.max_pool2d(-big, 5, stride=1, padding=2)  # two pixels in from every side
    edge = ((big > 0) & ~(eroded > 0))[0, 0].numpy()
    out = tile.copy()
    out[edge] = (255, 0, 0)
    return out


def _png(tiles: list[np.ndarray]) -> bytes:
    if not tiles:
        return b""
    gap = np.full((tiles[0].shape[0], 4, 3), 255, dtype=np.uint8)
    row = np.concatenate([part for t in tiles for part in (t, gap)][:-1], axis=1)
    out = io.BytesIO()
    Image.fromarray(row).save(out, format="PNG")  # optimize=True: 10x the time for 1 % less
    return out.getvalue()


def evidence_png(images: list[torch.Tensor], regions: torch.Tensor, size: int = 96) -> bytes:
    """The class's images side by side, each with its blob outlined in red (PNG bytes)."""
    return _png([_outline(_tile(x, size), r) for x, r in zip(images, regions)])


def paste_png(
    pasted: torch.Tensor, flipped: torch.Tensor, per_source: int, size: int = 96, count: int = 6
) -> bytes:
    """Paste examples of the first source (flipped ones first; a red frame marks a flip)."""
    first = pasted[:per_source].cpu()
    flips = flipped[:per_source]
    order = torch.cat([flips.nonzero().flatten(), (~flips).nonzero().flatten()])[:count]
    tiles = []
    for i in order.tolist():
        tile = _tile(first[i], size)
        if flips[i]:
            tile[:3], tile[-3:], tile[:, :3], tile[:, -3:] = 255, 255, 255, 255
            tile[:3, :, 1:], tile[-3:, :, 1:], tile[:, :3, 1:], tile[:, -3:, 1:] = 0, 0, 0, 0
        tiles.append(tile)
    return _png(tiles)
