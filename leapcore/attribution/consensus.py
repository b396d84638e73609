"""InterpretDL's Consensus: one method's maps over several models, normalised and averaged."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from leapcore.attribution.core import Targets, attribute


@dataclass
class ConsensusResult:
    """``consensus`` ``[P, H, W]`` (mean of the normalised maps) and each model's ``[M, P, H, W]``."""

    consensus: torch.Tensor
    per_model: torch.Tensor
    image_index: torch.Tensor
    targets: torch.Tensor


def normalise(maps: torch.Tensor) -> torch.Tensor:
    """Each map divided by its largest absolute value (sign kept; an all-zero map stays zero)."""
    peak = maps.flatten(1).abs().amax(dim=1).clamp_min(1e-12)
    return maps / peak.view(-1, *([1] * (maps.ndim - 1)))


def consensus(
    models: Sequence[Any], images: torch.Tensor, targets: Targets, method: str, **options: Any
) -> ConsensusResult:
    """Attribute with ``method`` on every model, keep each map and average the normalised maps."""
    per_model, result = [], None
    for model in models:
        result = attribute(model, images, targets, [method], **options)
        per_model.append(normalise(next(iter(result.maps.values()))))
    assert result is not None, "consensus needs at least one model"
    stacked = torch.stack(per_model)
    return ConsensusResult(stacked.mean(dim=0), stacked, result.image_index, result.targets)
