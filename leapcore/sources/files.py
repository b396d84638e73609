"""Local model files and folders.

==========================  ====================================================================
``*.safetensors``           weights; the architecture from ``arch=`` or the file's ``leapcore``
                            metadata (see :func:`save_safetensors`)
``*.pt`` ``*.pth`` ...      a ``state_dict`` / checkpoint (with ``arch=``), TorchScript, or a
                            whole pickled module (``trusted=True`` only)
``*.pt2``                   a ``torch.export`` archive (checked to be pickle-free)
``*.keras`` ``*.h5``        Keras, loaded with ``safe_mode=True`` unless ``trusted=True``
folder with saved_model.pb  a TensorFlow SavedModel (its ``serving_default`` signature)
folder with ``MLmodel``     an MLflow model folder (as the ``mlflow`` source reads it)
folder with config.json     a timm / Hugging Face folder (``config.json`` + ``model.safetensors``)
==========================  ====================================================================
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leapcore.errors import ModelSourceError
from leapcore.sources.adapters import (
    keras_loaded,
    saved_model_loaded,
    torch_loaded,
)
from leapcore.sources.architectures import build_with_weights, extract_state_dict
from leapcore.sources.base import LoadedModel, register_source
from leapcore.sources.torch_files import ExportedModel, load_pt2, load_torch_file

log = logging.getLogger(__name__)

TORCH_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt", ".tar", ".ts", ".torchscript", ".jit"}
KERAS_SUFFIXES = {".keras", ".h5", ".hdf5"}
MODEL_SUFFIXES = TORCH_SUFFIXES | KERAS_SUFFIXES | {".safetensors", ".pt2"}


def _path(uri: str) -> Path:
    return Path(uri[len("file://") :] if uri.startswith("file://") else uri).expanduser()


def is_model_path(uri: str) -> bool:
    """An existing file or folder, or a name with a model file suffix."""
    if "://" in uri and not uri.startswith("file://"):
        return False
    path = _path(uri)
    return path.exists() or path.suffix.lower() in MODEL_SUFFIXES


@register_source(
    "file",
    is_model_path,
    "local files: safetensors / state_dict (+ arch), TorchScript, .pt2, .keras, SavedModel, "
    "MLflow model folders",
    priority=20,
)
def load_file(
    uri: str, arch: str | None = None, library: str | None = None, trusted: bool = False
) -> LoadedModel:
    """Load a local model file or folder.

    Args:
        uri: the path (``file://`` allowed).
        arch: timm or torchvision architecture name for files that hold weights only.
        library: ``"timm"`` or ``"torchvision"`` when a name exists in both.
        trusted: allow unpickling whole Python objects and Keras ``Lambda`` layers.
    """
    path = _path(uri)
    if not path.exists():
        raise ModelSourceError(f"no such model file or folder: {path}.")
    if path.is_dir():
        return _load_folder(path, uri, arch, library, trusted)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _load_safetensors(path, uri, arch, library)
    if suffix in KERAS_SUFFIXES:
        return keras_loaded(path, uri, trusted, "file")
    if suffix == ".pt2":
        return torch_loaded(
            load_pt2(path.read_bytes(), path, trusted), uri, "file", {"format": "pt2"}
        )
    return _load_torch(path, uri, arch, library, trusted)


def _load_folder(
    path: Path, uri: str, arch: str | None, library: str | None, trusted: bool
) -> LoadedModel:
    if (path / "MLmodel").is_file():
        from leapcore.sources.mlflow import load_model_folder

        return load_model_folder(path, uri, trusted=trusted, source="file")
    if (path / "saved_model.pb").is_file():
        return saved_model_loaded(path, uri, trusted, "file")
    from leapcore.sources.huggingface import is_transformers_folder, load_transformers_folder

    if is_transformers_folder(path):
        return load_transformers_folder(path, uri, trusted, "file")
    weights = [p for p in ("model.safetensors", "pytorch_model.bin") if (path / p).is_file()]
    if (path / "config.json").is_file() and weights:
        return _load_timm_folder(path, uri, weights[0], arch, library)
    raise ModelSourceError(
        f"{path} is a folder but holds no model leapcore can read: expected saved_model.pb (a "
        "TensorFlow SavedModel), MLmodel (an MLflow model) or config.json + model.safetensors (a "
        "timm / Hugging Face folder)."
    )


# ---------------------------------------------------------------------------------------------- #
# PyTorch
# ---------------------------------------------------------------------------------------------- #
def _from_weights(
    state: dict[str, torch.Tensor],
    uri: str,
    arch: str | None,
    library: str | None,
    where: str,
    fmt: str,
    meta: dict[str, Any] | None = None,
) -> LoadedModel:
    meta = meta or {}
    arch = arch or meta.get("arch")
    if not arch:
        raise ModelSourceError(
            f"{where} holds weights only ({len(state)} tensors) and no architecture; name it: "
            f"load_model({uri!r}, arch='resnet18') with a timm or torchvision name."
        )
    built = build_with_weights(arch, state, library or meta.get("library"), where)
    classes = meta.get("class_list") or built.class_list
    loaded = torch_loaded(
        built.model,
        uri,
        "file",
        {
            "format": fmt,
            "arch": arch,
            "library": built.library,
            "eval_transform": meta.get("eval_transform", built.eval_transform),
        },
        mean=meta.get("mean", built.mean),
        std=meta.get("std", built.std),
        input_shape=meta.get("input_shape", built.input_shape),
        class_list=classes,
    )
    if meta.get("class_list"):
        loaded.metadata["class_list_from"] = f"the metadata of {where}"
    elif classes:
        loaded.metadata["class_list_from"] = f"the {built.library} ImageNet classes"
    return loaded


def _load_torch(
    path: Path, uri: str, arch: str | None, library: str | None, trusted: bool
) -> LoadedModel:
    obj = load_torch_file(path, trusted)
    if isinstance(obj, ExportedModel):
        return torch_loaded(obj, uri, "file", {"format": "pt2"})
    if isinstance(obj, torch.jit.ScriptModule):
        return torch_loaded(obj, uri, "file", {"format": "torchscript"})
    if isinstance(obj, nn.Module):
        return torch_loaded(obj, uri, "file", {"format": "pickle"})
    state = extract_state_dict(obj, str(path))
    return _from_weights(state, uri, arch, library, str(path), "state_dict")


def _load_safetensors(path: Path, uri: str, arch: str | None, library: str | None) -> LoadedModel:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file as load_safetensors_file

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        state = load_safetensors_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelSourceError(f"{path} is not a readable safetensors file ({err}).") from None
    meta = json.loads(header["leapcore"]) if "leapcore" in header else {}
    return _from_weights(state, uri, arch, library, str(path), "safetensors", meta)


def _load_timm_folder(
    path: Path, uri: str, weights: str, arch: str | None, library: str | None
) -> LoadedModel:
    config = json.loads((path / "config.json").read_text())
    cfg = config.get("pretrained_cfg", {})
    meta = {
        "arch": arch or config.get("architecture") or config.get("model_name"),
        "library": library or "timm",
        "class_list": config.get("label_names"),
        "mean": cfg.get("mean"),
        "std": cfg.get("std"),
        "input_shape": cfg.get("input_size"),
    }
    meta = {k: v for k, v in meta.items() if v}
    if weights.endswith(".safetensors"):
        from safetensors.torch import load_file as load_safetensors_file

        state = load_safetensors_file(str(path / weights), device="cpu")
    else:
        state = extract_state_dict(load_torch_file(path / weights), str(path / weights))
    return _from_weights(state, uri, None, None, str(path), "timm-folder", meta)


def save_safetensors(
    model: nn.Module,
    path: str | Path,
    arch: str,
    class_list: Sequence[str] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    input_shape: Sequence[int] | None = None,
    library: str | None = None,
) -> Path:
    """Save ``model``'s weights as safetensors with what ``load_model(path)`` needs in the header.

    Returns:
        The path written.
    """
    from safetensors.torch import save_file

    meta = {"arch": arch, "library": library, "class_list": list(class_list or []) or None}
    meta |= {"mean": list(mean) if mean else None, "std": list(std) if std else None}
    meta["input_shape"] = list(input_shape) if input_shape else None
    meta = {k: v for k, v in meta.items() if v is not None}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    path = Path(path)
    save_file(state, str(path), metadata={"leapcore": json.dumps(meta)})
    return path
