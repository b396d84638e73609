"""The adapters that several sources build: a torch module, a Keras file, a TensorFlow SavedModel.

Local files (:mod:`leapcore.sources.files`) and MLflow model folders (:mod:`leapcore.sources.mlflow`)
hold the same formats, so both build their :class:`~leapcore.sources.base.LoadedModel` here, once.
TensorFlow is imported only inside the Keras / SavedModel adapters.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from leapcore.errors import ModelSourceError
from leapcore.sources.base import LoadedModel, normalize_steps, state_dict_digest
from leapcore.sources.torch_files import ExportedModel

DEFAULT_SHAPE = (3, 224, 224)


def torch_loaded(
    model: nn.Module,
    uri: str,
    source: str,
    metadata: dict[str, Any] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    input_shape: Sequence[int] | None = None,
    class_list: list[str] | None = None,
) -> LoadedModel:
    """The adapter of a torch module (weights digest from its state dict)."""
    if not isinstance(model, nn.Module):
        raise ModelSourceError(
            f"{uri} holds a {type(model).__name__}, not a torch.nn.Module or weights."
        )
    shape = input_shape or (model.input_shape if isinstance(model, ExportedModel) else None)
    return LoadedModel(
        model=model.eval() if not isinstance(model, ExportedModel) else model,
        framework="pt",
        preprocessing=normalize_steps(mean, std),
        class_list=list(class_list or []),
        input_shape=tuple(int(s) for s in (shape or DEFAULT_SHAPE)),  # type: ignore[arg-type]
        digest=state_dict_digest(model.state_dict()),
        uri=uri,
        source=source,
        layout="NCHW",
        metadata=dict(metadata or {}),
        mean=tuple(mean) if mean is not None else None,
        std=tuple(std) if std is not None else None,
    )


def keras_loaded(
    path: Path, uri: str, trusted: bool, source: str, metadata: dict[str, Any] | None = None
) -> LoadedModel:
    from leapcore.frameworks.tensorflow import keras_input_shape, load_keras_file, tf_weights_digest

    model = load_keras_file(path, trusted)
    return LoadedModel(
        model=model,
        framework="tf",
        preprocessing=[],
        class_list=[],
        input_shape=keras_input_shape(model) or DEFAULT_SHAPE,
        digest=tf_weights_digest(model),
        uri=uri,
        source=source,
        layout="NHWC",
        metadata={"format": "keras", **(metadata or {})},
    )


def saved_model_loaded(
    path: Path, uri: str, trusted: bool, source: str, metadata: dict[str, Any] | None = None
) -> LoadedModel:
    """The adapter of a TensorFlow SavedModel folder (its ``serving_default`` signature)."""
    from leapcore.frameworks.tensorflow import load_saved_model, tf_weights_digest

    fn, shape = load_saved_model(path, trusted)
    return LoadedModel(
        model=fn,
        framework="tf",
        preprocessing=[],
        class_list=[],
        input_shape=shape or DEFAULT_SHAPE,
        digest=tf_weights_digest(fn),
        uri=uri,
        source=source,
        layout="NHWC",
        metadata={"format": "savedmodel", **(metadata or {})},
    )
