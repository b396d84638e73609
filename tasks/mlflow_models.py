"""Log a model to MLflow with the metadata leapcore's ``mlflow`` source reads back.

Registry *writing* lives on the pipeline side: :mod:`leapcore.sources.mlflow` only reads (it is the
one engine module that imports ``mlflow``). ``leap audit --demo`` and the tests log their models with
:func:`log_model_with_metadata`; ``load_model(ref.uri)`` loads them back.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from leapcore.errors import ModelSourceError
from leapcore.preprocess import from_spec
from leapcore.sources import LoadedModel
from leapcore.sources.mlflow import METADATA_KEY, import_mlflow

__all__ = ["LoggedModelRef", "log_model_with_metadata"]


@dataclass
class LoggedModelRef:
    """Where :func:`log_model_with_metadata` put a model.

    Attributes:
        uri: the URI to load it with: ``models:/<name>@<alias>``, else ``models:/<name>/<version>``
            when registered, else MLflow's ``models:/<model_id>``.
        model_uri: MLflow's own ``models:/<model_id>`` URI of the logged model.
        run_id: the run it was logged in.
        name: its artifact name inside the run (``runs:/<run_id>/<name>`` also loads it).
        registered_model_name: the registry name, when registered.
        version: the registry version, when registered.
        alias: the alias set, if any.
    """

    uri: str
    model_uri: str
    run_id: str
    name: str
    registered_model_name: str | None = None
    version: str | None = None
    alias: str | None = None

    @property
    def runs_uri(self) -> str:
        return f"runs:/{self.run_id}/{self.name}"


@contextlib.contextmanager
def _active_run(mlflow: Any) -> Iterator[Any]:
    if mlflow.active_run() is not None:
        yield mlflow.active_run()
        return
    with mlflow.start_run() as run:
        yield run


def log_model_with_metadata(
    model: Any,
    class_list: Sequence[str] | None = None,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    input_shape: Sequence[int] | None = None,
    name: str = "model",
    registered_model_name: str | None = None,
    alias: str | None = None,
    serialization_format: str = "pt2",
    input_example: Any = None,
    eval_transform: Mapping[str, Any] | None = None,
) -> LoggedModelRef:
    """Log a PyTorch or Keras model to the current MLflow run (one is started if none is active),
    with the metadata the ``mlflow`` source reads back, and optionally register it and set an alias.

    Args:
        model: a ``torch.nn.Module`` (logged with the ``pytorch`` flavor), a Keras model (``keras``
            flavor), or a :class:`LoadedModel` (its class list, mean, std and shape are the defaults).
        class_list: one name per output.
        mean: per-channel mean of the preprocessing (pixel values in [0, 1]); None for none.
        std: per-channel std.
        input_shape: ``(C, H, W)``, also for Keras models (default ``(3, 224, 224)``).
        name: the artifact name in the run.
        registered_model_name: register the model under this name (a new version each call).
        alias: set this registry alias (e.g. ``"champion"``) on the new version.
        serialization_format: ``"pt2"`` (``torch.export``; safe to load) or ``"pickle"``
            (loads only when trusted). PyTorch only.
        input_example: the ``torch.export`` example; default a random batch of 2 (so that the
            batch size stays dynamic). Keras models are logged with a signature instead.
        eval_transform: how images are brought to the input size
            (:meth:`leapcore.preprocess.EvalTransform.spec`: ``resize``, ``crop``,
            ``interpolation``); ``leap explain`` loads images with it. Default: the
            :class:`LoadedModel`'s own, when one is given.

    Returns:
        A :class:`LoggedModelRef`; ``load_model(ref.uri)`` loads the model back.
    """
    mlflow = import_mlflow()
    if isinstance(model, LoadedModel):
        class_list = class_list if class_list is not None else model.class_list
        mean = mean if mean is not None else model.mean
        std = std if std is not None else model.std
        input_shape = input_shape or model.input_shape
        eval_transform = eval_transform or model.metadata.get("eval_transform")
        model = model.model
    if not class_list:
        raise ModelSourceError("log_model_with_metadata needs class_list (one name per output).")
    if alias is not None and registered_model_name is None:
        raise ModelSourceError("alias needs registered_model_name: aliases name registry versions.")
    shape = tuple(int(s) for s in (input_shape or (3, 224, 224)))
    if len(shape) != 3:
        raise ModelSourceError(f"input_shape must be (C, H, W), got {list(shape)}.")
    import numpy as np

    is_torch = _is_torch_module(model)
    meta = {
        "class_list": [str(c) for c in class_list],
        "mean": [float(m) for m in mean] if mean is not None else None,
        "std": [float(s) for s in std] if std is not None else None,
        "input_shape": list(shape),
        "layout": "NCHW" if is_torch else "NHWC",
        "framework": "pt" if is_torch else "tf",
    }
    if eval_transform:
        meta["eval_transform"] = from_spec(eval_transform).spec()
    common = {
        "name": name,
        "metadata": {METADATA_KEY: meta},
        "registered_model_name": registered_model_name,
    }
    c, h, w = shape
    with _active_run(mlflow) as run:
        if is_torch:
            import torch

            model.eval()
            example = input_example
            if example is None:
                example = np.random.default_rng(0).random((2, c, h, w), dtype=np.float32)
            if isinstance(example, torch.Tensor):
                example = example.detach().cpu().numpy()
            info = mlflow.pytorch.log_model(
                model,
                input_example=example,
                signature=_torch_signature(model, example),
                serialization_format=serialization_format,
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                **common,
            )
        elif _is_keras_model(model):
            import keras
            from mlflow.models.signature import ModelSignature
            from mlflow.types.schema import Schema, TensorSpec

            # A signature, not an input_example: mlflow.keras writes the example before it has
            # created the model folder (MLflow 3.17).
            float32 = np.dtype("float32")
            signature = ModelSignature(
                inputs=Schema([TensorSpec(float32, (-1, h, w, c))]),
                outputs=Schema([TensorSpec(float32, (-1, len(class_list)))]),
            )
            info = mlflow.keras.log_model(
                model,
                signature=signature,
                pip_requirements=[f"keras=={keras.__version__}"],
                **common,
            )
        else:
            raise ModelSourceError(
                f"log_model_with_metadata takes a torch.nn.Module or a Keras model, not "
                f"{type(model).__name__}."
            )
        run_id = run.info.run_id
    version = getattr(info, "registered_model_version", None)
    version = str(version) if version is not None else None
    if alias is not None:
        from mlflow import MlflowClient

        MlflowClient().set_registered_model_alias(registered_model_name, alias, version)
    if alias is not None:
        uri = f"models:/{registered_model_name}@{alias}"
    elif registered_model_name is not None:
        uri = f"models:/{registered_model_name}/{version}"
    else:
        uri = info.model_uri
    return LoggedModelRef(uri, info.model_uri, run_id, name, registered_model_name, version, alias)


def _torch_signature(model: Any, example: Any) -> Any:
    """A tensor signature from the example and the model's logits: MLflow's own inference fails on
    dict outputs (torchvision's segmentation models return ``{"out": ...}``)."""
    import numpy as np
    import torch
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    from leapcore.adapter import unwrap_logits

    with torch.no_grad():
        out = unwrap_logits(model(torch.from_numpy(np.asarray(example))))
    float32 = np.dtype("float32")
    return ModelSignature(
        inputs=Schema([TensorSpec(float32, (-1, *np.asarray(example).shape[1:]))]),
        outputs=Schema([TensorSpec(float32, (-1, *out.shape[1:]))]),
    )


def _is_torch_module(model: Any) -> bool:
    import torch

    return isinstance(model, torch.nn.Module)


def _is_keras_model(model: Any) -> bool:
    return any(
        (lib := sys.modules.get(name)) is not None and isinstance(model, lib.Model)
        for name in ("keras", "tf_keras")
    )
