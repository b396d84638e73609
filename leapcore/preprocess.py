"""A model's own eval transform: resize + centre crop from its metadata, as leap-ie's preprocessing.

leap-ie's examples build a sample as ``preprocessing_fn[0](ToTensor()(image).unsqueeze(0))`` and pass
``preprocessing=preprocessing_fn`` to ``generate``. So :func:`leapcore.models.get_model` returns a
list whose first element is an :class:`EvalTransform` (a ``[0, 1]`` image of any size in, the
model's input geometry out, still in ``[0, 1]``) and whose whole (``[EvalTransform, Normalize]``) is
what the model needs. An image that already has the model's input size passes the first element
unchanged, so the engine can apply the whole list inside its graph to prototypes and prepared samples.

The geometry comes from the model's own metadata: timm's data config (``input_size``, ``crop_pct``,
``crop_mode``, ``interpolation``), torchvision's weight transforms (``resize_size``, ``crop_size``,
``interpolation``), or the ``eval_transform`` entry of leapcore's MLflow metadata. Without any,
:func:`default_spec` uses the ImageNet convention (resize the shorter side to ``crop / 0.875``,
bilinear) and says so in its ``source``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from leapcore.errors import InputError

DEFAULT_CROP_PCT = 0.875
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


class EvalTransform(nn.Module):
    """Resize then centre-crop ``[N, C, H, W]`` (or ``[C, H, W]``) pixels in [0, 1] to ``crop``.

    Args:
        resize: one int (the shorter side is resized to it, aspect kept) or ``(H, W)`` (both sides;
            timm's ``squash`` mode).
        crop: ``(H, W)`` of the model input.
        interpolation: ``nearest``, ``bilinear`` or ``bicubic`` (antialiased when shrinking).
        source: where the numbers came from (shown in reports).

    An input that already is ``crop`` in size passes through unchanged (and keeps its gradient), so
    prototypes and prepared samples are not resized twice. Values are clamped to [0, 1] after
    resizing (bicubic overshoots).
    """

    def __init__(
        self,
        resize: int | tuple[int, int],
        crop: tuple[int, int],
        interpolation: str = "bilinear",
        source: str = "",
    ):
        super().__init__()
        if interpolation not in INTERPOLATIONS:
            raise InputError(
                f"interpolation must be one of {INTERPOLATIONS}, not {interpolation!r}."
            )
        self.resize = int(resize) if isinstance(resize, int) else tuple(int(v) for v in resize)
        self.crop = (int(crop[0]), int(crop[1]))
        self.interpolation = interpolation
        self.source = source

    @property
    def size(self) -> tuple[int, int]:
        """The output ``(H, W)``: the model's input size."""
        return self.crop

    def spec(self) -> dict[str, Any]:
        """The transform as plain data (stored in MLflow metadata, Arrow metadata, reports)."""
        resize = [self.resize] if isinstance(self.resize, int) else list(self.resize)
        return {
            "resize": resize,
            "crop": list(self.crop),
            "interpolation": self.interpolation,
            "source": self.source,
        }

    def describe(self) -> str:
        """One line for people: ``resize shorter side to 256 (bilinear), centre crop 224x224``."""
        if isinstance(self.resize, int):
            resize = f"resize shorter side to {self.resize}"
        else:
            resize = f"resize to {self.resize[0]}x{self.resize[1]}"
        text = f"{resize} ({self.interpolation}), centre crop {self.crop[0]}x{self.crop[1]}"
        return f"{text} [{self.source}]" if self.source else text

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) == self.crop:
            return x
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as tvf

        if not torch.is_floating_point(x):
            x = x.float() / 255.0
        size = [self.resize] if isinstance(self.resize, int) else list(self.resize)
        mode = InterpolationMode(self.interpolation)
        x = tvf.resize(x, size, interpolation=mode, antialias=True)
        return tvf.center_crop(x, list(self.crop)).clamp(0.0, 1.0)

    def extra_repr(self) -> str:
        return self.describe()


def from_spec(spec: Mapping[str, Any]) -> EvalTransform:
    """An :class:`EvalTransform` from :meth:`EvalTransform.spec` data (checked)."""
    try:
        resize = [int(v) for v in spec["resize"]]
        crop = [int(v) for v in spec["crop"]]
    except (KeyError, TypeError, ValueError):
        raise InputError(
            "an eval transform needs 'resize' ([side] or [H, W]) and 'crop' ([H, W]) as integers; "
            f"got {dict(spec)!r}."
        ) from None
    if len(resize) not in (1, 2) or len(crop) != 2 or min(resize + crop) <= 0:
        raise InputError(f"eval transform sizes must be positive: {dict(spec)!r}.")
    return EvalTransform(
        resize[0] if len(resize) == 1 else (resize[0], resize[1]),
        (crop[0], crop[1]),
        str(spec.get("interpolation", "bilinear")),
        str(spec.get("source", "")),
    )


def default_spec(size: tuple[int, int]) -> dict[str, Any]:
    """The ImageNet convention for a model without its own transform metadata."""
    h, w = int(size[0]), int(size[1])
    return {
        "resize": [math.floor(min(h, w) / DEFAULT_CROP_PCT)],
        "crop": [h, w],
        "interpolation": "bilinear",
        "source": f"default: ImageNet convention (crop_pct {DEFAULT_CROP_PCT}), no model metadata",
    }


def timm_spec(model: nn.Module, name: str = "") -> dict[str, Any]:
    """The eval geometry of timm's data config for ``model`` (``resolve_model_data_config``)."""
    import timm.data

    cfg = timm.data.resolve_model_data_config(model)
    _, h, w = (int(v) for v in cfg["input_size"])
    pct = float(cfg.get("crop_pct") or DEFAULT_CROP_PCT)
    mode = cfg.get("crop_mode") or "center"
    scale = [math.floor(h / pct), math.floor(w / pct)]
    # timm: 'squash' resizes both sides; 'center' (and square 'border') the shorter side.
    resize = scale if mode == "squash" or scale[0] != scale[1] else [scale[0]]
    interpolation = str(cfg.get("interpolation") or "bilinear")
    if interpolation not in INTERPOLATIONS:
        interpolation = "bicubic"
    label = f"timm data config of {name}" if name else "timm data config"
    return {
        "resize": resize,
        "crop": [h, w],
        "interpolation": interpolation,
        "source": f"{label} (crop_pct {pct}, crop_mode {mode})",
    }


def torchvision_spec(name: str) -> dict[str, Any] | None:
    """The eval geometry of torchvision's default weights for ``name`` (metadata, no download)."""
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, KeyError):
        return None
    tf = weights.transforms()
    if not hasattr(tf, "crop_size") or not hasattr(tf, "resize_size"):
        return None
    crop = list(tf.crop_size) * (2 if len(tf.crop_size) == 1 else 1)
    interpolation = getattr(tf.interpolation, "value", str(tf.interpolation))
    return {
        "resize": [int(v) for v in tf.resize_size],
        "crop": [int(v) for v in crop],
        "interpolation": interpolation if interpolation in INTERPOLATIONS else "bilinear",
        "source": f"torchvision {type(weights).__name__}.{weights.name} transforms",
    }


def find_eval_transform(preprocessing: Any) -> EvalTransform | None:
    """The :class:`EvalTransform` leading a preprocessing list (or being it), else None."""
    if isinstance(preprocessing, EvalTransform):
        return preprocessing
    if isinstance(preprocessing, Iterable) and not isinstance(preprocessing, (str, bytes)):
        items = list(preprocessing)
        if items and isinstance(items[0], EvalTransform):
            return items[0]
    return None


_PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def _field(obj: Any, key: str) -> Any:
    if obj is None:
        return None
    return obj.get(key) if isinstance(obj, Mapping) else getattr(obj, key, None)


def image_processor_spec(processor: Any, name: str = "") -> dict[str, Any] | None:
    """The eval geometry of a Hugging Face image processor (``size``, ``crop_size``,
    ``do_center_crop``, ``crop_pct``, ``resample``), read without importing transformers; None
    when the processor's sizes are not the usual kinds."""
    size, crop = getattr(processor, "size", None), getattr(processor, "crop_size", None)
    interpolation = _PIL_RESAMPLE.get(int(getattr(processor, "resample", 2) or 2), "bicubic")
    label = f"Hugging Face image processor of {name}" if name else "Hugging Face image processor"
    h, w, edge = _field(size, "height"), _field(size, "width"), _field(size, "shortest_edge")
    pct = getattr(processor, "crop_pct", None)
    if h and w:
        resize, out = [int(h), int(w)], [int(h), int(w)]
    elif edge and pct and int(edge) < 384:  # ConvNeXt: resize edge / crop_pct, crop edge
        resize, out = [math.floor(int(edge) / float(pct))], [int(edge), int(edge)]
    elif edge and pct:  # ConvNeXt at 384 and above: warp, no crop
        resize, out = [int(edge), int(edge)], [int(edge), int(edge)]
    elif edge:
        resize, out = [int(edge)], [int(edge), int(edge)]
    else:
        return None
    if getattr(processor, "do_center_crop", False) and _field(crop, "height"):
        out = [int(_field(crop, "height")), int(_field(crop, "width"))]
    return {"resize": resize, "crop": out, "interpolation": interpolation, "source": label}


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; differentiable, works on any device."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.device, x.dtype)) / self.std.to(x.device, x.dtype)

    def __repr__(self) -> str:
        return f"Normalize(mean={tuple(self.mean.flatten().tolist())}, std={tuple(self.std.flatten().tolist())})"
