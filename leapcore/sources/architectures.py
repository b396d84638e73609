"""Weights without code: build a timm or torchvision architecture by name and load a state dict into it.

The number of classes is read from the weights (the classifier's shape), so a ResNet-18 fine-tuned
on 10 classes loads from ``arch="resnet18"`` alone. Mean, std and input size come from timm's
``pretrained_cfg`` or torchvision's weight transforms (no download: both are plain metadata).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from leapcore.errors import ModelSourceError
from leapcore.models import IMAGENET_MEAN, IMAGENET_STD, imagenet_classes
from leapcore.preprocess import timm_spec, torchvision_spec

_CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "weights")


@dataclass
class Architecture:
    """A freshly built network and the preprocessing its family expects."""

    model: nn.Module
    library: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_shape: tuple[int, int, int]
    class_list: list[str]
    eval_transform: dict[str, Any] | None = None


def extract_state_dict(obj: Any, where: str) -> dict[str, torch.Tensor]:
    """The tensors of a state dict or of a training checkpoint (``{"state_dict": ...}`` etc.)."""
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state = dict(obj)
    elif isinstance(obj, Mapping):
        for key in _CHECKPOINT_KEYS:
            if key in obj and isinstance(obj[key], Mapping):
                return extract_state_dict(obj[key], where)
        raise ModelSourceError(
            f"{where} holds a dict with keys {sorted(map(str, obj))[:8]} but no state dict of tensors "
            f"(looked under {', '.join(_CHECKPOINT_KEYS)})."
        )
    else:
        raise ModelSourceError(
            f"{where} holds a {type(obj).__name__}, not weights (a dict of tensors) or a model."
        )
    return state


def _strip_prefixes(state: dict[str, torch.Tensor], target: Mapping) -> dict[str, torch.Tensor]:
    """Drop wrapper prefixes (DataParallel's ``module.``, ``torch.compile``'s ``_orig_mod.``, ...)."""
    for prefix in ("module.", "_orig_mod.", "model."):
        if all(k.startswith(prefix) for k in state):
            stripped = {k[len(prefix) :]: v for k, v in state.items()}
            if len(set(stripped) & set(target)) > len(set(state) & set(target)):
                state = stripped
    return state


def _build(arch: str, library: str | None, num_classes: int | None) -> tuple[nn.Module, str]:
    import timm
    import torchvision

    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if library in (None, "torchvision") and arch in torchvision.models.list_models():
        return torchvision.models.get_model(arch, weights=None, **kwargs), "torchvision"
    if library in (None, "timm") and (timm.is_model(arch) or timm.is_model(arch.split(".")[0])):
        return timm.create_model(arch, pretrained=False, **kwargs), "timm"
    where = {"timm": "timm", "torchvision": "torchvision"}.get(library or "", "timm or torchvision")
    raise ModelSourceError(
        f"{where} has no architecture {arch!r}; pass arch= a name from timm.list_models() or "
        "torchvision.models.list_models()."
    )


def _preprocessing(
    model: nn.Module, arch: str, library: str
) -> tuple[tuple, tuple, tuple[int, int, int]]:
    if library == "timm":
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        size = tuple(cfg.get("input_size", (3, 224, 224)))
        return tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD)), size
    import torchvision

    try:
        transforms = torchvision.models.get_model_weights(arch).DEFAULT.transforms()
        crop = transforms.crop_size[0] if hasattr(transforms, "crop_size") else 224
        return tuple(transforms.mean), tuple(transforms.std), (3, int(crop), int(crop))
    except Exception:
        return IMAGENET_MEAN, IMAGENET_STD, (3, 224, 224)


def build_with_weights(
    arch: str, state: dict[str, torch.Tensor], library: str | None = None, where: str = "weights"
) -> Architecture:
    """Build ``arch`` with as many classes as the weights' classifier has, and load the weights."""
    model, library = _build(arch, library, None)
    target = model.state_dict()
    state = _strip_prefixes(state, target)
    mismatched = [k for k, v in state.items() if k in target and target[k].shape != v.shape]
    widths = {int(state[k].shape[0]) for k in mismatched if state[k].ndim >= 1}
    if mismatched and len(widths) == 1:
        model, library = _build(arch, library, widths.pop())
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        target = model.state_dict()
        missing = sorted(set(target) - set(state))
        unexpected = sorted(set(state) - set(target))
        shapes = [
            f"{k}: file {tuple(state[k].shape)} vs {tuple(target[k].shape)}"
            for k in state
            if k in target and state[k].shape != target[k].shape
        ]
        detail = "; ".join(
            part
            for part in (
                f"missing {missing[:4]}" if missing else "",
                f"unexpected {unexpected[:4]}" if unexpected else "",
                f"shapes {shapes[:3]}" if shapes else "",
            )
            if part
        )
        raise ModelSourceError(
            f"{where} do not fit the {library} architecture {arch!r} ({detail or str(err)[:200]}); "
            "check the arch name."
        ) from None
    mean, std, size = _preprocessing(model, arch, library)
    num_classes = _num_outputs(model)
    classes = imagenet_classes() if num_classes == 1000 else []
    spec = timm_spec(model, arch) if library == "timm" else torchvision_spec(arch)
    return Architecture(model.eval(), library, mean, std, size, classes, spec)


def _num_outputs(model: nn.Module) -> int | None:
    num = getattr(model, "num_classes", None)
    if isinstance(num, int):
        return num
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None
