"""Shared fixtures: seeded RNG, threads, and the pretrained efficientnet_lite0 (loaded once)."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def lite0():
    """``(preprocessing, model, class_list)`` of the bundled pretrained ImageNet EfficientNet-Lite0."""
    from leapcore.models import get_model

    return get_model("efficientnet_lite0")
