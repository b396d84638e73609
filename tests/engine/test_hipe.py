"""HiPE on a model whose evidence sits in a known place: the saliency must find that place."""

from __future__ import annotations

import torch
from torch import nn

from leapcore import engine

REGION = (slice(8, 14), slice(20, 26))  # rows, columns of the only pixels class 0 reads


class PatchDetail(nn.Module):
    """Class 0's logit is the pixel detail (variance) inside REGION; class 1 is a constant."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        detail = x[:, :, REGION[0], REGION[1]].flatten(1).var(1) * 100
        return torch.stack([detail, torch.full_like(detail, 0.5)], 1)


def test_hipe_saliency_concentrates_on_the_only_region_the_class_reads():
    samples = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    audit = engine.run(
        PatchDetail(),
        ["patch", "flat"],
        {
            "input_dim": [1, 32, 32],
            "use_hipe": True,
            "hipe_min_cell": 2,
            "isolate_classes": [0],
            "isolation_keep": 0,  # the saliency itself, not the calibrated binary mask
        },
        samples=samples,
        device="cpu",
    )
    masks = audit.isolation.masks[:, 0]  # [3, 32, 32]
    inside = torch.zeros(32, 32, dtype=torch.bool)
    inside[REGION] = True
    # The region is 36 of 1024 pixels (3.5 %); HiPE refines cells around it down to 2 px, so it holds
    # a third or more of the saliency mass (coarse levels spread a drop over whole 8 px cells), its peak, and the mean saliency inside is far above the mean outside.
    share = masks[:, inside].sum(1) / masks.flatten(1).sum(1)
    assert (share > 0.3).all(), share
    peak = masks.flatten(1).argmax(1)
    assert inside.flatten()[peak].all()
    assert (masks[:, inside].mean(1) > 10 * masks[:, ~inside].mean(1)).all()
