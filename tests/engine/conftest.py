"""Engine fixtures: the digits CNN (trained once, in seconds) and shared efficientnet_lite0 runs."""

from __future__ import annotations

import pytest
import torch

from .engine_support import Digits, photo_samples, train_digits

IMAGENET_TARGETS = [1, 94, 309, 417, 980]  # goldfish, hummingbird, bee, balloon, volcano


@pytest.fixture(scope="session")
def digits() -> Digits:
    """A small CNN trained for two epochs on 600 digits (~94 % held-out accuracy, some confusion)."""
    return train_digits(epochs=2, train_size=600, seed=0)


@pytest.fixture(scope="session")
def photos() -> torch.Tensor:
    return photo_samples()


@pytest.fixture(scope="session")
def lite0_prototypes(lite0):
    """One 5-class prototype run on the pretrained efficientnet_lite0, shared by the quality tests."""
    from leapcore import engine

    preprocessing, model, class_list = lite0
    config = {
        "max_steps": 100,
        "find_lr_steps": 0,
        "lr": 0.05,
        "transform": "m",
        "parameterisation": "fourier",
        "isolation": False,
        "log_freq": 50,
        "seed": 0,
    }
    return engine.run(model, class_list, config, IMAGENET_TARGETS, preprocessing)
