"""Hierarchical perturbation (Cooper et al., 2022): occlusion saliency on refining grids.

Level 0 occludes each cell of a 4x4 grid with ``isolation_background`` (default: a heavily blurred
copy of the image, its local mean colour): that removes the cell's detail without adding evidence of its own, and unlike noise it
gives the same saliency for any seed (with one noise sample the masks of real photos varied from
better than random cells to worse). Cells whose occlusion drops the class's logit by
more than the level's mid-range ``(max + min) / 2`` are split into four and tested again, down to
``hipe_min_cell`` pixels. Saliency adds up every level's drops over the cells' pixels and is scaled to
[0, 1] per pair. All occlusions of a level, over every (image, class) pair, go through the model as
one batch (in chunks). The saliency is then calibrated into the reported mask like the mask
optimisation's (:func:`leapcore.isolation_methods.calibrate`).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from leapcore import stopping
from leapcore.isolation_methods import (
    IsolationResult,
    blurred_substrate,
    class_logits,
    isolation_method,
    logits_rows,
    make_background,
    no_grad_rows,
    pair_keys,
)
from leapcore.rng import RowKey, Stream

if TYPE_CHECKING:
    from leapcore.config import EngineConfig

__all__ = ["blurred_substrate", "hierarchical_perturbation"]


@isolation_method("hipe", title="hierarchical perturbation")
def hierarchical_perturbation(
    model: torch.nn.Module,
    images: torch.Tensor,
    classes: list[list[int]],
    config: EngineConfig,
    chunk_size: int,
    image_keys: list[RowKey] | None = None,
) -> IsolationResult:
    """Occlusion saliency of ``classes[i]`` in ``images[i]`` on refining grids, all pairs batched."""
    began = time.perf_counter()
    pairs = [(i, c) for i, cs in enumerate(classes) for c in cs]
    device = images.device
    source = images[torch.tensor([p[0] for p in pairs], device=device)]
    cls = torch.tensor([p[1] for p in pairs], device=device)
    n, _, h, w = source.shape
    keys = pair_keys(pairs, image_keys)
    with torch.no_grad():
        substrate = make_background(
            config.isolation_background, source, config.seed + Stream.HIPE_SUBSTRATE, keys
        )
        full_rows = logits_rows(model, source, chunk_size)
        full = full_rows.gather(1, cls[:, None]).squeeze(1)
        saliency = torch.zeros((n, 1, h, w), device=device)
        cell_h, cell_w = max(1, h // 4), max(1, w // 4)
        # Active cells: (pair, top, left) at the current cell size.
        cells = [
            (p, y, x) for p in range(n) for y in range(0, h, cell_h) for x in range(0, w, cell_w)
        ]
        while cells:
            stopping.check()
            pair_idx = torch.tensor([c[0] for c in cells], device=device)
            occluded = source[pair_idx].clone()
            for k, (p, y, x) in enumerate(cells):
                occluded[k, :, y : y + cell_h, x : x + cell_w] = substrate[
                    p, :, y : y + cell_h, x : x + cell_w
                ]
            drop = (
                full[pair_idx] - class_logits(model, occluded, cls[pair_idx], chunk_size)
            ).clamp_min(0)
            for k, (p, y, x) in enumerate(cells):
                saliency[p, :, y : y + cell_h, x : x + cell_w] += drop[k]
            if min(cell_h, cell_w) // 2 < config.hipe_min_cell:
                break
            keep = []
            for p in range(n):
                mine = (pair_idx == p).nonzero().flatten()
                if len(mine) == 0:
                    continue
                d = drop[mine]
                threshold = (d.max() + d.min()) / 2
                keep += [cells[int(k)] for k in mine[d > threshold].tolist()]
            cell_h, cell_w = cell_h // 2, cell_w // 2
            cells = [
                (p, y + dy, x + dx) for p, y, x in keep for dy in (0, cell_h) for dx in (0, cell_w)
            ]
        peak = saliency.flatten(1).max(1).values.clamp_min(1e-12)
        masks = saliency / peak[:, None, None, None]
    return IsolationResult.from_saliency(
        model,
        pairs,
        source,
        cls,
        masks,
        substrate,
        full,
        "hipe",
        began,
        chunk_size,
        config.isolation_keep,
        full_rows=full_rows,
        rows=no_grad_rows(config, chunk_size),
    )
