"""Gaps in the evidence map filled from their neighbours (:mod:`leapcore.evidence_fill`), on maps
whose answer is known."""

from __future__ import annotations

import pytest
import torch

from leapcore.evidence_fill import FILL_POWER, closing, fill_gaps


def patch_with_holes(size: int = 12) -> torch.Tensor:
    """A 5 x 5 patch of evidence 1 whose inside has single-pixel holes (evidence 0), as the
    first-order evidence of a uniform marker looks, and one stray pixel of 0.5 far from it."""
    maps = torch.zeros(1, 1, size, size)
    maps[0, 0, 3:8, 3:8] = 1.0
    maps[0, 0, 4, 4] = maps[0, 0, 4, 6] = maps[0, 0, 6, 5] = 0.0
    maps[0, 0, 10, 1] = 0.5
    return maps


def test_a_confident_mask_fills_the_holes_inside_a_region_and_nothing_outside():
    maps = patch_with_holes()
    filled = fill_gaps(maps, torch.ones_like(maps))
    assert torch.all(filled[0, 0, 3:8, 3:8] == 1.0), filled[0, 0, 3:8, 3:8]
    outside = torch.ones(12, 12, dtype=torch.bool)
    outside[3:8, 3:8] = False
    # The region's edge does not grow and the stray pixel neither spreads nor vanishes.
    assert torch.equal(filled[0, 0][outside], maps[0, 0][outside])
    assert torch.all(filled >= maps)


def test_a_soft_mask_leaves_the_map_nearly_as_it_was():
    """A mask that peaked at 0.8 (real photos after 10 steps: 0.38-0.81) fills at ``0.8 **
    FILL_POWER`` of the neighbours' value."""
    maps = patch_with_holes()
    filled = fill_gaps(maps, torch.full_like(maps, 0.8))
    assert filled[0, 0, 4, 4] == pytest.approx(0.8**FILL_POWER, rel=1e-4)
    assert filled[0, 0, 4, 4] < 0.03


def test_the_border_counts_as_no_evidence():
    """A pixel in the image's corner, next to evidence on its inner sides only, is the region's edge,
    not a gap between evidence: it stays at 0."""
    maps = torch.zeros(1, 1, 6, 6)
    maps[0, 0, :3, :3] = 1.0
    maps[0, 0, 0, 0] = 0.0
    assert closing(maps)[0, 0, 0, 0] == 0.0
    assert fill_gaps(maps, torch.ones_like(maps))[0, 0, 0, 0] == 0.0
