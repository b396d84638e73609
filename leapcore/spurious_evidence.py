"""The spurious-feature scan's evidence maps: occlusion saliency on refining grids, at a cost cap.

The scan (:mod:`leapcore.spurious`) needs one raw saliency map per (image, class) to cut its blob
from. It uses the occlusion of hierarchical perturbation (:mod:`leapcore.hipe`, Cooper et al.,
2022): each cell of a 4x4 grid is replaced by ``isolation_background`` (default a heavy blur of
the image), cells whose occlusion drops the class's logit by more than the level's mid-range
``(max + min) / 2`` are split into four and tested again, and every level's drops add up over the
cells' pixels; each map is scaled to max 1. All occlusions of a level, over every image, go through
the model as one stream (in chunks of ``chunk_size``).

Two things make it cheaper than calling the isolation method ``hipe``, with the same maps where
they refine equally far:

- only the saliency is computed. The isolation method also calibrates a mask and scores it (an
  isolated image, two probabilities and 32 deletion/insertion images per pair, for its table);
  the scan uses none of that. On EfficientNet-Lite0 at 224 px that tail was about as many
  forwards as the occlusion itself.
- refinement stops at ``finest`` pixels, which the scan sets from the image size
  (:attr:`~leapcore.spurious.ScanSettings.evidence_cell_share`): a blob of 5 % of the image needs
  no cells much finer than its own side. At 224 px two levels (56 and 28 px cells) instead of
  three (down to 14 px with ``hipe_min_cell`` 8); at 32 px nothing changes (one 8 px level).
"""

from __future__ import annotations

import math

import torch

from leapcore import stopping
from leapcore.config import EngineConfig
from leapcore.isolation_methods import class_logits, make_background, pair_keys
from leapcore.rng import Stream


def finest_cell(shape: tuple[int, int], config: EngineConfig, share: float) -> int:
    """The smallest occlusion cell (pixels): ``share`` of the shorter side, at least
    ``config.hipe_min_cell``."""
    return max(config.hipe_min_cell, math.ceil(share * min(shape)))


@torch.no_grad()
def occlusion_saliency(
    model: torch.nn.Module,
    images: torch.Tensor,
    classes: list[int],
    config: EngineConfig,
    chunk_size: int,
    finest: int | None = None,
) -> torch.Tensor:
    """Occlusion saliency ``[N, H, W]`` (>= 0, max 1 per map, 0 where nothing dropped) of
    ``classes[i]`` in ``images[i]`` (see the module docstring).

    Args:
        model: pixel-space images -> logits.
        images: ``[N, C, H, W]`` in [0, 1].
        classes: one class index per image.
        config: the audit's options (``isolation_background``, ``seed``, ``hipe_min_cell``).
        chunk_size: images per model call.
        finest: smallest cell in pixels (default ``config.hipe_min_cell``, as ``hipe``).
    """
    n, _, h, w = images.shape
    if n == 0:
        return torch.zeros(0, h, w)
    finest = config.hipe_min_cell if finest is None else finest
    device = images.device
    cls = torch.tensor(classes, device=device)
    keys = pair_keys([(i, c) for i, c in enumerate(classes)], None)
    substrate = make_background(
        config.isolation_background, images, config.seed + Stream.HIPE_SUBSTRATE, keys
    )
    full = class_logits(model, images, cls, chunk_size)
    saliency = torch.zeros((n, h, w), device=device)
    cell_h, cell_w = max(1, h // 4), max(1, w // 4)
    cells = [(p, y, x) for p in range(n) for y in range(0, h, cell_h) for x in range(0, w, cell_w)]
    while cells:
        stopping.check()
        owner = torch.tensor([c[0] for c in cells], device=device)
        occluded = images[owner].clone()
        for k, (p, y, x) in enumerate(cells):
            occluded[k, :, y : y + cell_h, x : x + cell_w] = substrate[
                p, :, y : y + cell_h, x : x + cell_w
            ]
        drop = (full[owner] - class_logits(model, occluded, cls[owner], chunk_size)).clamp_min(0)
        for k, (p, y, x) in enumerate(cells):
            saliency[p, y : y + cell_h, x : x + cell_w] += drop[k]
        if min(cell_h, cell_w) // 2 < finest:
            break
        keep = []
        for p in range(n):
            mine = (owner == p).nonzero().flatten()
            if len(mine) == 0:
                continue
            d = drop[mine]
            keep += [cells[int(k)] for k in mine[d > (d.max() + d.min()) / 2].tolist()]
        cell_h, cell_w = cell_h // 2, cell_w // 2
        cells = [
            (p, y + dy, x + dx) for p, y, x in keep for dy in (0, cell_h) for dx in (0, cell_w)
        ]
    peak = saliency.flatten(1).max(1).values.clamp_min(1e-12)
    return (saliency / peak[:, None, None]).cpu()


# ---------------------------------------------------------------------------------------------- #
# The screen: which classes get extra prototypes
# ---------------------------------------------------------------------------------------------- #
def _passes(scan, settings) -> bool:
    return (
        math.isnan(scan.flip_rate)
        or scan.flip_rate >= settings.screen_flip
        or scan.concentration >= settings.screen_concentration
    )


def screen(first_pass: list, settings) -> list[int]:
    """The classes of a first scan pass (:class:`~leapcore.spurious.ClassScan` rows on the audit's
    own images) that get extra prototypes: those passing the screen
    (:class:`~leapcore.spurious.ScanSettings` ``screen_flip`` / ``screen_concentration``, or an
    unmeasured flip rate), at most ``screen_share`` of the classes (at least one), the highest
    flip rates (then concentrations) first. Returned in the first pass's class order."""
    passing = [s for s in first_pass if _passes(s, settings)]
    cap = max(1, math.ceil(settings.screen_share * len(first_pass)))

    def key(s) -> tuple[float, float]:
        flip = 1.0 if math.isnan(s.flip_rate) else s.flip_rate
        return (-flip, -s.concentration)

    keep = {s.class_index for s in sorted(passing, key=key)[:cap]}
    return [s.class_index for s in first_pass if s.class_index in keep]


def screened_out_reason(scan, settings) -> str:
    """What a class that got no extra prototypes is told (its verdict rests on fewer images)."""
    if _passes(scan, settings):
        return (
            "no extra prototypes: only the "
            f"{settings.screen_share:.0%} of classes most likely to be flagged get them"
        )
    return (
        f"no extra prototypes: on the audit's own images its blob flips {scan.flip_rate:.0%} of "
        f"pastes (screen {settings.screen_flip:.0%}) and holds {scan.concentration:.0%} of the "
        f"evidence (screen {settings.screen_concentration:.0%})"
    )
