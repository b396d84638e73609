"""A small Keras CNN trained on scikit-learn's digits (upsampled to 16x16), once per session."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

DIGITS = [str(d) for d in range(10)]
SIZE = 16


def digits_images() -> tuple[np.ndarray, np.ndarray]:
    """``[N, 16, 16, 1]`` float32 in [0, 1] (channels last) and labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)
    images = np.kron(images, np.ones((1, 2, 2), dtype=np.float32))  # 8x8 -> 16x16
    return images[..., None], data.target.astype(np.int64)


@pytest.fixture(scope="session")
def tf():
    import tensorflow

    tensorflow.random.set_seed(0)
    return tensorflow


@pytest.fixture(scope="session")
def digits():
    return digits_images()


def build_digit_cnn(softmax: bool = False):
    import keras

    return keras.Sequential(
        [
            keras.Input((SIZE, SIZE, 1)),
            keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dropout(0.2),
            keras.layers.Dense(10, activation="softmax" if softmax else None),
        ]
    )


@pytest.fixture(scope="session")
def digit_cnn(tf, digits):
    """A Keras 3 CNN returning logits, trained a few epochs (about 97 % train accuracy)."""
    import keras

    keras.utils.set_random_seed(0)
    model = build_digit_cnn()
    model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    images, labels = digits
    history = model.fit(images, labels, epochs=6, batch_size=64, verbose=0)
    assert history.history["accuracy"][-1] > 0.9
    return model


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory):
    """A real MLflow store (sqlite) for one test module."""
    from tests.sources.helpers import local_mlflow_store

    with local_mlflow_store(tmp_path_factory.mktemp("mlflow-tf")) as uri:
        yield uri
