"""Fixtures for TensorFlow: a small Keras CNN trained on scikit-learn's digits, once per session."""

from __future__ import annotations

import os

import pytest
from mlflow_support import local_mlflow_store
from tf_support import build_digit_cnn, digits_images

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@pytest.fixture(scope="session")
def tf():
    import tensorflow

    tensorflow.random.set_seed(0)
    return tensorflow


@pytest.fixture(scope="session")
def digits():
    return digits_images()


@pytest.fixture(scope="session")
def digit_cnn(tf, digits):
    """A Keras 3 CNN returning logits, trained a few epochs (over 90 % train accuracy)."""
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
    with local_mlflow_store(tmp_path_factory.mktemp("mlflow-tf"), "leapcore-tf") as uri:
        yield uri
