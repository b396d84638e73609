"""Gaps in the evidence map filled from their neighbours (``isolation_map: evidence``, issue 19).

The evidence map (:func:`leapcore.isolation.evidence_map`) ranks the pixels inside the soft mask by
their first-order evidence, ``gradient . (image - background)`` of the class log-probability. That is
what removing one pixel alone does. Inside a uniform patch (a planted marker, a flat part of an
object) removing one pixel leaves the patch's edges in place, so the gradient there is small or even
negative, while removing the whole patch removes the class: the patch's edges rank first and its
inside ranks among the background. Deletion, which removes the top pixels first, then leaves the
inside of the patch and the class with it (marker C: 70 % of the marker among the top 64 pixels,
against Occlusion's 88 %).

:func:`fill_gaps` raises each pixel to a share of the map's grey-scale closing (a dilation followed by
an erosion, :data:`FILL_SIZE` pixels square): a pixel whose neighbours on every side rank high gets a
share of their value, while the outer edge of a region does not grow (a closing never raises a pixel
that has no high neighbours on two sides). The share is :data:`FILL_SHARE` times the pair's mask peak
to the power :data:`FILL_POWER`: a mask that reached ~1 found a region that keeps the class, and its
gaps are filled; a mask that stayed soft (real photos after 10 steps) found no such region and its map
is left nearly as it was. It costs a few elementwise maxima and minima per map (0.004 ms per 32 px
pair, 1.1 ms per 224 px pair on the CPU) and no pass through the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["FILL_POWER", "FILL_SHARE", "FILL_SIZE", "closing", "fill_gaps"]

# Measured (issue 19, helper h19f; 30 images of each of 6 marker CNNs: A, B, C and the held-out D, E,
# F of benchmarks/fidelity.py; 4 + 8 Lite0 photo views); see /work/notes/issue-19-fidelity4.md.
FILL_SIZE = 3
FILL_SHARE = 1.0
FILL_POWER = 16


def closing(maps: torch.Tensor, size: int = FILL_SIZE) -> torch.Tensor:
    """Grey-scale closing of ``[P, 1, H, W]`` non-negative maps with a ``size`` square (odd).

    Outside the image counts as 0 (no evidence), so the closing does not raise the pixels along the
    border either. Computed as shifted maxima and minima along each axis (a square is separable):
    on the CPU ``max_pool2d`` at stride 1 took 30x as long on 32 px maps.
    """
    pad = size // 2
    padded = F.pad(maps, (2 * pad, 2 * pad, 2 * pad, 2 * pad), value=0.0)
    dilated = _filter(padded, size, torch.maximum)
    return _filter(dilated, size, torch.minimum)


def _filter(maps: torch.Tensor, size: int, pick) -> torch.Tensor:
    """``pick`` (max or min) over each ``size`` square that fits inside ``maps``: each side shrinks
    by ``size - 1``."""
    for dim in (-1, -2):
        length = maps.shape[dim] - size + 1
        out = maps.narrow(dim, 0, length)
        for shift in range(1, size):
            out = pick(out, maps.narrow(dim, shift, length))
        maps = out
    return maps


def fill_gaps(saliency: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``max(saliency, share * closing(saliency))`` with ``share = FILL_SHARE * peak ** FILL_POWER``.

    Args:
        saliency: ``[P, 1, H, W]`` non-negative maps.
        masks: ``[P, 1, H, W]`` the soft masks in [0, 1] the maps were made with; ``peak`` is each
            pair's largest mask value.

    Returns:
        ``[P, 1, H, W]``, never below ``saliency``.
    """
    peak = masks.flatten(1).amax(1)[:, None, None, None]
    share = FILL_SHARE * peak**FILL_POWER
    return torch.maximum(saliency, share * closing(saliency))
