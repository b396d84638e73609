"""Small penalties on image or mask batches; each returns one value per batch row."""

from __future__ import annotations

import torch


def high_frequency(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of neighbouring pixels: horizontal, vertical and both diagonals."""
    diffs = (
        x[..., :, 1:] - x[..., :, :-1],
        x[..., 1:, :] - x[..., :-1, :],
        x[..., 1:, 1:] - x[..., :-1, :-1],
        x[..., 1:, :-1] - x[..., :-1, 1:],
    )
    # An image one pixel wide or high has no neighbours in that direction: those terms are 0, not NaN.
    return sum(d.abs().flatten(1).sum(1) / max(d[0].numel(), 1) for d in diffs) / 4


def coverage(mask: torch.Tensor) -> torch.Tensor:
    """Mean mask value per row: the share of the image kept."""
    return mask.flatten(1).mean(1)


def centre_weighted_coverage(mask: torch.Tensor) -> torch.Tensor:
    """Coverage weighted by squared distance from the centre: favours centred, compact masks."""
    h, w = mask.shape[-2:]
    ys = torch.linspace(-1, 1, h, device=mask.device, dtype=mask.dtype)[:, None]
    xs = torch.linspace(-1, 1, w, device=mask.device, dtype=mask.dtype)[None, :]
    weight = (xs**2 + ys**2) / 2
    return (mask * weight).flatten(1).mean(1)


def diversity(images: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity of each row to the other rows of its group (0 for a row alone).

    Args:
        images: ``[B, ...]`` batch.
        groups: ``[B]`` integer group id per row (the target it belongs to).
    """
    flat = images.flatten(1)
    flat = flat - flat.mean(dim=1, keepdim=True)
    flat = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-8)
    sim = flat @ flat.T
    same = (groups[:, None] == groups[None, :]) & ~torch.eye(
        len(groups), dtype=torch.bool, device=images.device
    )
    count = same.sum(1).clamp_min(1)
    return (sim * same).sum(1) / count
