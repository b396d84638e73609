"""The scan's cost controls: cheaper evidence maps (leapcore.spurious_evidence) that still find a
planted patch, and the extra prototypes' step budget (ScanSettings.steps)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from leapcore.config import load_config
from leapcore.hipe import hierarchical_perturbation
from leapcore.spurious import CLEAN, ClassScan, ScanSettings, evidence_maps, top_region
from leapcore.spurious_evidence import (
    finest_cell,
    occlusion_saliency,
    screen,
    screened_out_reason,
)

SIZE = 64
PATCH = (slice(40, 48), slice(8, 16))  # an 8x8 patch, inside the 16 px cell at (32, 0)


class PatchModel(nn.Module):
    """Class 0's logit is the patch's brightness (a planted marker); class 1's the image's mean.
    Counts the images it is shown."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += len(x)
        patch = x[:, :, PATCH[0], PATCH[1]].mean((1, 2, 3))
        return torch.stack([20 * patch, x.mean((1, 2, 3))], 1)


def images(n: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, SIZE, SIZE, generator=g) * 0.3
    x[:, :, PATCH[0], PATCH[1]] = 1.0  # the bright patch; the blur around it is darker
    return x


def config(**options):
    return load_config({"input_dim": [3, SIZE, SIZE], "seed": 0, **options})


def test_the_saliency_is_hipes_where_both_refine_equally_far() -> None:
    model, x, cfg = PatchModel(), images(), config()
    classes = [0, 1, 0]
    ours = occlusion_saliency(model, x, classes, cfg, 4)  # finest = hipe_min_cell (8 px)
    theirs = hierarchical_perturbation(
        model, x, [[c] for c in classes], cfg.model_copy(update={"isolation_keep": 0.0}), 4
    ).masks[:, 0]
    assert ours.shape == (3, SIZE, SIZE)
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-5, atol=1e-6)


def test_coarser_evidence_costs_fewer_forwards_and_still_covers_the_patch() -> None:
    x, cfg = images(), config()
    costs = {}
    for finest in (8, 16):
        model = PatchModel()
        maps = occlusion_saliency(model, x, [0, 0, 0], cfg, 4, finest)
        costs[finest] = model.seen
        for m in maps:
            region = top_region(m, 0.05)  # 205 of 4096 pixels
            patch = torch.zeros_like(region)
            patch[PATCH] = True
            # The region sits on the patch: most of it inside the patch's 16 px cell, and at
            # the 8 px level the whole patch in it.
            cell = torch.zeros_like(region)
            cell[32:48, 0:16] = True
            assert (region & cell).sum() >= 0.9 * min(region.sum(), cell.sum())
            if finest == 8:
                assert (region & patch).sum() == patch.sum()
    # 16 px cells: the first level only (3 full + 48 occluded images); 8 px adds the children of
    # the cells that dropped most.
    assert costs[16] == 3 + 3 * 16
    assert costs[16] < costs[8]


def test_the_scan_refines_large_images_less_than_hipe() -> None:
    cfg = load_config({"input_dim": [3, 224, 224], "seed": 0})
    settings = ScanSettings()
    assert finest_cell((224, 224), cfg, settings.evidence_cell_share) == 28
    assert finest_cell((32, 32), cfg, settings.evidence_cell_share) == cfg.hipe_min_cell
    model, x = PatchModel(), images()
    maps = evidence_maps(model, x, [0, 1, 0], config(), 8, settings)  # 64 px: finest 8 px
    assert maps.shape == (3, SIZE, SIZE) and float(maps.max()) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("max_steps", "audit_steps", "expected"),
    [
        (1000, 144, 50),  # Lite0's prototypes stopped early: the cap
        (1000, 1000, 50),  # some row never converged: still the cap
        (1000, None, 50),
        (150, 150, 50),  # the test bed: the 50 steps it had before the screen
        (80, 40, 32),  # an audit of short runs: half its steps, at least min_steps
        (20, 20, 20),  # never more than max_steps
    ],
)
def test_extra_prototype_steps(max_steps, audit_steps, expected) -> None:
    cfg = load_config({"max_steps": max_steps})
    assert ScanSettings().steps(cfg, audit_steps) == expected


def row(c: int, flip: float, concentration: float) -> ClassScan:
    return ClassScan(
        c, str(c), CLEAN, "numbers", concentration, 0.5, 0.1, flip, 0.0, 0, 0, 0.05, 1, 0
    )


def test_the_screen_passes_the_classes_a_verdict_could_flag_up_to_its_share() -> None:
    # flip >= 0.15 or concentration >= 0.35; at most 25 % of the classes (3 of 10)
    s = ScanSettings()
    first = [
        row(0, 0.05, 0.10),  # neither: screened out
        row(1, 0.20, 0.10),  # flips
        row(2, 0.00, 0.40),  # concentrated
        row(3, float("nan"), 0.10),  # nothing to paste onto: cannot be ruled out
        row(4, 0.90, 0.10),
        row(5, 0.10, 0.30),
        row(6, 0.00, 0.00),
        row(7, 0.00, 0.00),
        row(8, 0.00, 0.00),
        row(9, 0.00, 0.00),
    ]
    assert screen(first, s) == [1, 3, 4]  # 3 of 10; highest flips first (NaN counts as 1)
    wide = ScanSettings(screen_share=1.0)
    assert screen(first, wide) == [1, 2, 3, 4]
    assert screen(first[:1], s) == []
    assert "flips 5% of pastes (screen 15%)" in screened_out_reason(first[0], s)
    assert "only the 25% of classes" in screened_out_reason(first[2], s)
