"""Faithfulness of saliency maps: RISE deletion / insertion AUC.

PRIVATE COPY in branch h19 with the signature agreed in HELPERS.md; helper h16 owns this module and
its version replaces this one at merge (h19 only calls ``deletion_insertion_auc``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def _substrate(images: torch.Tensor, substrate: str | torch.Tensor) -> torch.Tensor:
    if isinstance(substrate, torch.Tensor):
        return substrate.to(images).expand_as(images)
    if substrate == "zero":
        return torch.zeros_like(images)
    if substrate == "mean":
        return images.mean((2, 3), keepdim=True).expand_as(images)
    if substrate == "blur":
        h, w = images.shape[-2:]
        sigma = max(1.0, min(h, w) / 16)
        radius = int(3 * sigma)
        x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
        kernel = torch.exp(-(x**2) / (2 * sigma**2))
        kernel = kernel / kernel.sum()
        c = images.shape[1]
        out = F.pad(images, (radius, radius, radius, radius), mode="replicate")
        out = F.conv2d(out, kernel.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
        return F.conv2d(out, kernel.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)
    raise ValueError(f"unknown substrate {substrate!r}; use 'blur', 'mean', 'zero' or a tensor")


@torch.no_grad()
def deletion_insertion_auc(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    maps: torch.Tensor,
    targets: list[int],
    *,
    steps: int = 16,
    substrate: str | torch.Tensor = "blur",
    batch_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RISE deletion and insertion AUC of saliency ``maps`` for ``targets``.

    Args:
        logits_fn: images ``[n, C, H, W]`` in [0, 1] -> logits ``[n, K]``.
        images: ``[N, C, H, W]`` in [0, 1].
        maps: ``[N, H, W]``, higher = more important.
        targets: the class of each image.
        steps: equal pixel budgets; the curve has ``steps + 1`` points.
        substrate: what removed pixels show ('blur', 'mean', 'zero' or a tensor).
        batch_size: images per model call (default: all points of one image).

    Returns:
        ``(deletion [N], insertion [N])``: the mean class probability over the curve's points
        (trapezoid rule), as the most important pixels are replaced by the substrate (deletion: lower
        is better) or revealed from it, most important first (insertion: higher is better).
    """
    n, c, h, w = images.shape
    base = _substrate(images, substrate)
    order = maps.reshape(n, -1).argsort(1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(h * w, device=order.device).expand(n, -1))
    rank = rank.view(n, 1, h, w)
    budgets = [round(k * h * w / steps) for k in range(steps + 1)]
    target = torch.as_tensor(targets, device=images.device)
    size = batch_size or (steps + 1)
    curves = {"deletion": [], "insertion": []}
    for i in range(n):
        for kind in curves:
            views = []
            for b in budgets:
                top = (rank[i] < b).to(images.dtype)
                if kind == "deletion":
                    views.append(images[i] * (1 - top) + base[i] * top)
                else:
                    views.append(base[i] * (1 - top) + images[i] * top)
            batch = torch.stack(views)
            probs = torch.cat(
                [logits_fn(batch[j : j + size]).softmax(1) for j in range(0, len(batch), size)]
            )[:, target[i]]
            curve = probs.float()
            curves[kind].append(((curve[1:] + curve[:-1]) / 2).mean())
    return torch.stack(curves["deletion"]).cpu(), torch.stack(curves["insertion"]).cpu()


def sparseness(maps: torch.Tensor) -> torch.Tensor:
    """Gini index of each map's absolute values (as Quantus' Sparseness)."""
    x = maps.flatten(1).abs().sort(1).values + 1e-12
    d = x.shape[1]
    k = torch.arange(1, d + 1, dtype=x.dtype, device=x.device)
    return ((2 * k - d - 1) * x).sum(1) / (d * x.sum(1))


def pointing_game(maps: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """1.0 where each map's maximum falls inside its box ``(top, left, bottom, right)``, else 0.0."""
    n, h, w = maps.shape
    flat = maps.reshape(n, -1).argmax(1)
    y, x = flat // w, flat % w
    top, left, bottom, right = boxes.unbind(1)
    return ((y >= top) & (y < bottom) & (x >= left) & (x < right)).float()
