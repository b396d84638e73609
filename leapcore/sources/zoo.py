"""Zoo names: the bundled ``efficientnet_lite0``, torchvision and timm names, from local files only.

``"resnet18"`` (torchvision first, then timm), ``"timm:resnet18"`` / ``"torchvision:resnet18"`` (or
``library=``), timm names with a pretrained tag (``"vit_small_patch16_224.augreg_in21k"``) and
``"hf-hub:org/name"`` ids from the local Hugging Face cache. Mean, std and input size come from timm's
``pretrained_cfg`` or torchvision's weight transforms; class names from the weights' metadata
(torchvision ``categories``, timm ``label_names``). Weights are never downloaded: a name whose weights
are not cached fails with a message that says where to put them.
"""

from __future__ import annotations

import re
from typing import Any

from leapcore.errors import ModelSourceError
from leapcore.models import get_model
from leapcore.preprocess import EvalTransform, find_eval_transform
from leapcore.sources.base import LoadedModel, hub_offline, register_source, state_dict_digest

_LIBRARIES = ("timm", "torchvision")
_NAME = re.compile(r"^(?:(?:timm|torchvision):)?[A-Za-z][A-Za-z0-9_\-]*(?:\.[A-Za-z0-9_\-]+)?$")


_FILE_SUFFIXES = {
    "txt",
    "json",
    "yaml",
    "yml",
    "csv",
    "onnx",
    "tflite",
    "pb",
    "pkl",
    "pickle",
    "npy",
}


def is_zoo_name(uri: str) -> bool:
    if uri.startswith("hf-hub:"):
        return True
    return bool(_NAME.match(uri)) and uri.rsplit(".", 1)[-1].lower() not in _FILE_SUFFIXES


def split_library(uri: str, library: str | None) -> tuple[str, str | None]:
    """``"timm:resnet18"`` -> ``("resnet18", "timm")``; an explicit ``library`` must agree."""
    for prefix in _LIBRARIES:
        if uri.startswith(prefix + ":"):
            if library not in (None, prefix):
                raise ModelSourceError(f"{uri!r} names {prefix} but library={library!r} was given.")
            return uri[len(prefix) + 1 :], prefix
    if uri.startswith("hf-hub:"):
        return uri, "timm"
    if library not in (None, *_LIBRARIES):
        raise ModelSourceError(f"library must be 'timm' or 'torchvision', not {library!r}.")
    return uri, library


@register_source(
    "zoo",
    is_zoo_name,
    "efficientnet_lite0 (bundled), torchvision and timm names, hf-hub: ids (local cache only)",
    priority=30,
)
def load_zoo(uri: str, pretrained: bool = True, library: str | None = None) -> LoadedModel:
    """Load a zoo name.

    Args:
        uri: the name (see the module docstring).
        pretrained: False gives the architecture with random weights (no files needed).
        library: ``"timm"`` or ``"torchvision"`` when a name exists in both.
    """
    name, library = split_library(uri, library)
    try:
        with hub_offline():
            preprocessing, model, classes = get_model(name, source=library, pretrained=pretrained)
    except ModelSourceError as err:
        folder = hub_cache_folder(name) if "Hugging Face cache" in str(err) else None
        if folder is None:
            raise
        raise ModelSourceError(
            f"the weights of timm's {name!r} are not in the local Hugging Face cache and leapcore "
            f"never downloads. Put the model's files (config.json, model.safetensors) under "
            f"{folder}/snapshots/<revision>/ with the revision in {folder}/refs/main: copy that "
            "folder from a machine with network access (or set HF_HUB_CACHE to a copy of its "
            f"cache), or use pretrained=False for random weights."
        ) from None
    if name == "efficientnet_lite0" and library in (None, "timm"):
        library = "bundled"
    elif library is None:
        import torchvision

        library = "torchvision" if name in torchvision.models.list_models() else "timm"
    transform = find_eval_transform(preprocessing)
    preprocessing = [p for p in preprocessing if not isinstance(p, EvalTransform)]
    norm = preprocessing[0]
    mean = tuple(float(v) for v in norm.mean.flatten())
    std = tuple(float(v) for v in norm.std.flatten())
    shape = _input_shape(model, name, library)
    labels = (getattr(model, "pretrained_cfg", None) or {}).get("label_names")
    if labels and len(labels) == len(classes):
        classes = [str(c) for c in labels]
    return LoadedModel(
        model=model,
        framework="pt",
        preprocessing=preprocessing,
        class_list=classes,
        input_shape=shape,
        digest=state_dict_digest(model.state_dict()),
        uri=uri,
        source="zoo",
        metadata={
            "name": name,
            "library": library,
            "pretrained": pretrained,
            "eval_transform": transform.spec() if transform is not None else None,
        },
        mean=mean,
        std=std,
    )


def hub_cache_folder(name: str) -> str | None:
    """Where the Hugging Face cache keeps a timm name's (or ``hf-hub:`` id's) files."""
    try:
        import timm
        from huggingface_hub import constants

        if name.startswith("hf-hub:"):
            repo = name[len("hf-hub:") :].split("@")[0]
        else:
            cfg = timm.models.get_pretrained_cfg(name)
            repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
        if not repo:
            return None
        return f"{constants.HF_HUB_CACHE}/models--{repo.replace('/', '--')}"
    except Exception:
        return None


def _input_shape(model: Any, name: str, library: str | None) -> tuple[int, int, int]:
    cfg = getattr(model, "pretrained_cfg", None)
    if cfg and cfg.get("input_size"):
        return tuple(int(v) for v in cfg["input_size"])  # type: ignore[return-value]
    if library in (None, "torchvision"):
        try:
            import torchvision

            crop = torchvision.models.get_model_weights(name).DEFAULT.transforms().crop_size[0]
            return (3, int(crop), int(crop))
        except Exception:
            pass
    return (3, 224, 224)
