"""Shared fixtures: seeded RNG, threads, and the pretrained efficientnet_lite0 (loaded once)."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked ``gpu`` run where CUDA is available and are skipped elsewhere (CI has none)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def lite0():
    """``(preprocessing, model, class_list)`` of the bundled pretrained ImageNet EfficientNet-Lite0."""
    from leapcore.models import get_model

    return get_model("efficientnet_lite0")
