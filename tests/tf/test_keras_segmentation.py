"""Keras segmentation models (issue 17): channels-last masks ``[B, H, W, K]`` through the gradient
bridge, pooled over a region; saved as .keras and loaded back through the file source."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from leapcore import engine
from leapcore.sources import load_model

CLASSES = ["background", "square", "disk"]


@pytest.fixture(scope="module")
def keras_segmenter(tf, tmp_path_factory):
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    outputs = keras.layers.Conv2D(len(CLASSES), 1)(x)  # logits, channels last
    model = keras.Model(inputs, outputs)
    path = tmp_path_factory.mktemp("keras-seg") / "segmenter.keras"
    model.save(path)
    return model, path


def test_keras_masks_pool_over_the_region_in_every_stage(keras_segmenter):
    model, path = keras_segmenter
    loaded = load_model(path, class_list=CLASSES)
    assert loaded.framework == "tf" and loaded.input_shape == (3, 16, 16)
    config = {
        "max_steps": 3,
        "find_lr_steps": 0,
        "isolation": True,
        "isolation_steps": 2,
        "max_isolate_classes": 1,
        "log_freq": 1,
        "region": [4, 0, 12, 8],
    }
    audit = engine.run(loaded.model, CLASSES, config, [1], mode="tf")
    assert audit.model_kind == "segmentation" and audit.region == "box:4,0,12,8"
    nhwc = audit.prototypes.images.permute(0, 2, 3, 1).numpy()
    maps = np.asarray(model(nhwc))  # [B, H, W, K]
    expected = torch.from_numpy(maps[:, 0:8, 4:12, :].mean(axis=(1, 2)))
    assert torch.allclose(audit.prototypes.logits, expected, atol=1e-4)
    assert audit.isolation.masks.shape == (1, 1, 16, 16)
