"""Keras files, SavedModel folders and the MLflow keras flavor, loaded safely into the same adapter."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tf_support import DIGITS, SIZE

from leapcore import engine
from leapcore.errors import ModelSourceError, UntrustedSourceError
from leapcore.frameworks.tensorflow import tf_weights_digest
from leapcore.sources import load_model

pytestmark = [pytest.mark.tf, pytest.mark.slow]


def tf_logits(loaded, images: np.ndarray) -> np.ndarray:
    from leapcore.frameworks.tensorflow import keras_logits_model

    model = keras_logits_model(loaded.model, len(loaded.class_list), loaded.preprocessing)
    with torch.no_grad():
        return model(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()


def test_keras_file_loads_as_a_tf_adapter(digit_cnn, digits, tmp_path):
    path = tmp_path / "digits.keras"
    digit_cnn.save(path)
    loaded = load_model(path, class_list=DIGITS)
    assert (loaded.source, loaded.framework, loaded.layout) == ("file", "tf", "NHWC")
    assert loaded.input_shape == (1, SIZE, SIZE) and loaded.class_list == DIGITS
    assert loaded.digest == tf_weights_digest(digit_cnn)
    images = digits[0][:4]
    np.testing.assert_allclose(
        tf_logits(loaded, images), digit_cnn(images, training=False).numpy(), rtol=1e-5, atol=1e-5
    )


def marker_writer(path: str):
    """A Python lambda that writes ``path`` whenever it runs (Keras serialises it with its closure)."""
    return lambda v: (open(path, "w").write("lambda ran"), v)[1]  # noqa: SIM115


def lambda_model(marker: Path):
    import keras

    inputs = keras.Input((SIZE, SIZE, 1))
    hidden = keras.layers.Lambda(marker_writer(str(marker)))(inputs)
    outputs = keras.layers.Dense(10)(keras.layers.Flatten()(hidden))
    return keras.Model(inputs, outputs)


def test_keras_lambda_is_refused_unless_trusted(tmp_path):
    marker = tmp_path / "lambda.marker"
    path = tmp_path / "lambda.keras"
    lambda_model(marker).save(path)
    marker.unlink(missing_ok=True)  # building the model ran the lambda once

    with pytest.raises(UntrustedSourceError) as err:
        load_model(path)
    message = str(err.value)
    assert "Lambda layer" in message and "trusted=True" in message and "safe_mode=False" in message
    assert not marker.exists()

    loaded = load_model(path, trusted=True, class_list=DIGITS)
    assert loaded.framework == "tf"
    assert marker.exists()  # trusting it really runs its code


def test_saved_model_folder(digit_cnn, digits, tmp_path, caplog):
    folder = tmp_path / "saved"
    digit_cnn.export(str(folder), verbose=False)
    loaded = load_model(folder)
    assert loaded.framework == "tf" and loaded.metadata["format"] == "savedmodel"
    assert loaded.input_shape == (1, SIZE, SIZE)
    assert loaded.class_list == [str(i) for i in range(10)]  # none given: numbered, with a warning
    assert "has no class list" in caplog.text
    images = digits[0][:3]
    np.testing.assert_allclose(
        tf_logits(loaded, images), digit_cnn(images, training=False).numpy(), rtol=1e-4, atol=1e-4
    )


def test_saved_model_that_writes_files_is_refused(tf, tmp_path):
    marker = tmp_path / "savedmodel.marker"

    class Writer(tf.Module):
        def __init__(self):
            super().__init__()
            self.w = tf.Variable(tf.ones((SIZE * SIZE, 10)))

        @tf.function(input_signature=[tf.TensorSpec([None, SIZE, SIZE, 1], tf.float32)])
        def serve(self, x):
            tf.io.write_file(str(marker), "graph ran")
            return tf.matmul(tf.reshape(x, (-1, SIZE * SIZE)), self.w)

    module = Writer()
    folder = tmp_path / "writer"
    tf.saved_model.save(module, str(folder), signatures={"serving_default": module.serve})
    marker.unlink(missing_ok=True)
    with pytest.raises(UntrustedSourceError, match=r"WriteFile.*trusted=True"):
        load_model(folder)
    assert not marker.exists()


def test_keras_mlflow_flavor_and_engine(mlflow_store, digit_cnn, digits, tmp_path):
    from tasks.mlflow_models import log_model_with_metadata

    ref = log_model_with_metadata(
        digit_cnn,
        DIGITS,
        mean=(0.0,),
        std=(1.0,),
        input_shape=(1, SIZE, SIZE),
        registered_model_name="digits-keras",
        alias="champion",
    )
    loaded = load_model(ref.uri)
    assert (loaded.source, loaded.framework, loaded.mode, loaded.layout) == (
        "mlflow",
        "tf",
        "tf",
        "NHWC",
    )
    assert loaded.class_list == DIGITS and loaded.input_shape == (1, SIZE, SIZE)
    assert loaded.metadata["version"] == "1" and loaded.metadata["format"] == "keras"
    assert loaded.digest == tf_weights_digest(digit_cnn)
    images = digits[0][:3]
    np.testing.assert_allclose(
        tf_logits(loaded, images), digit_cnn(images, training=False).numpy(), rtol=1e-5, atol=1e-5
    )
    df, results = engine.generate(
        "mlflow-keras",
        loaded.model,
        loaded.class_list,
        {"isolation_steps": 3, "max_isolate_classes": 1, "output_dir": str(tmp_path)},
        preprocessing=loaded.preprocessing,
        samples=images,
        mode=loaded.mode,
    )
    assert len(df) == 3


def test_keras_model_as_a_file_that_is_not_a_model(tmp_path):
    bogus = tmp_path / "notes.keras"
    bogus.write_text("not a zip")
    with pytest.raises(ModelSourceError, match=r"Keras could not read .*notes.keras"):
        load_model(bogus)


def test_legacy_h5_file(digit_cnn, digits, tmp_path):
    path = tmp_path / "digits.h5"
    digit_cnn.save(path)
    loaded = load_model(path, class_list=DIGITS)
    assert loaded.framework == "tf" and loaded.digest == tf_weights_digest(digit_cnn)


def test_tensorflow_flavor_without_metadata_takes_a_class_list_file(
    mlflow_store, digit_cnn, digits, tmp_path
):
    """A model a user logged with mlflow.tensorflow itself: no leapcore metadata, a class file."""
    import mlflow

    with mlflow.start_run():
        info = mlflow.tensorflow.log_model(digit_cnn, name="tf-model", pip_requirements=["keras"])
    names = tmp_path / "digits.json"
    names.write_text(
        '{"class_list": ["zero", "one", "two", "three", "four", "five", "six", '
        '"seven", "eight", "nine"]}'
    )
    loaded = load_model(info.model_uri, class_list=names)
    assert loaded.framework == "tf" and loaded.class_list[9] == "nine"
    assert loaded.input_shape == (1, SIZE, SIZE)  # from the Keras model itself
    with pytest.raises(
        ModelSourceError,
        match=r"returns 10 outputs but the class list from the class_list option has 3 names",
    ):
        load_model(info.model_uri, class_list=["a", "b", "c"])


def _io_graphs(tf, marker):
    """Serving functions that each write ``marker`` with another I/O-capable op."""

    def tfrecord(x):
        tf.data.experimental.TFRecordWriter(str(marker)).write(
            tf.data.Dataset.from_tensors(tf.constant("graph ran"))
        )
        return x

    def save_dataset(x):
        tf.data.Dataset.from_tensors(tf.constant(1)).save(str(marker))
        return x

    def write_file(x):
        tf.io.write_file(str(marker), "graph ran")
        return x

    def print_to_file(x):
        tf.print("graph ran", output_stream=f"file://{marker}")
        return x

    def py_function(x):
        tf.py_function(lambda: marker.write_text("graph ran") and 0.0, [], tf.float32)
        return x

    return {
        "DatasetToTFRecord": tfrecord,
        "SaveDatasetV2": save_dataset,
        "WriteFile": write_file,
        "PrintV2": print_to_file,
        "EagerPyFunc": py_function,
    }


@pytest.mark.parametrize(
    "op", ["DatasetToTFRecord", "SaveDatasetV2", "WriteFile", "PrintV2", "EagerPyFunc"]
)
def test_saved_models_with_io_ops_are_refused_unless_trusted(tf, tmp_path, op):
    marker = tmp_path / "written.marker"
    side_effect = _io_graphs(tf, marker)[op]

    class Hostile(tf.Module):
        def __init__(self):
            super().__init__()
            self.w = tf.Variable(tf.ones((SIZE * SIZE, 10)))

        @tf.function(input_signature=[tf.TensorSpec([None, SIZE, SIZE, 1], tf.float32)])
        def serve(self, x):
            x = side_effect(x)
            return tf.matmul(tf.reshape(x, (-1, SIZE * SIZE)), self.w)

    module = Hostile()
    folder = tmp_path / "hostile"
    tf.saved_model.save(module, str(folder), signatures={"serving_default": module.serve})
    if marker.is_dir():  # Dataset.save wrote its folder while the function was traced
        shutil.rmtree(marker)
    marker.unlink(missing_ok=True)
    shown = "SaveDataset" if op == "SaveDatasetV2" else op  # SaveDataset in older TF
    with pytest.raises(UntrustedSourceError, match=rf"{shown}.*trusted=True"):
        load_model(folder)
    assert not marker.exists()
