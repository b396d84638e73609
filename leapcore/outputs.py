"""What a model's output means: the probability function of each output kind, and segmentation regions.

Output kinds (the config option ``output``):

- ``"logits"``: one score per class, classes exclusive; probabilities are the softmax over classes.
- ``"multilabel_logits"``: one independent score per class (a sigmoid classifier without its sigmoid);
  probabilities are ``sigmoid(z_c)`` per class, so no class's probability depends on another's
  logit, and entanglement compares each class's logit gain with the target's (no max over classes).

Segmentation models return ``[B, K, H, W]`` (channels-last ``[B, H, W, K]`` from Keras). The adapter
reduces them to ``[B, K]``: each class's logit averaged over a :class:`Region` of the input image (the
whole image by default, or a box or mask: the config option ``region``). The region is given in input
pixels and resized to the logits' own resolution (SegFormer's logits are at 1/4 of the input) with
area weights, so a pixel of the logit map counts by how much of it lies inside the region.
Every later stage (prototypes, entanglement, isolation) then works on these pooled logits: a
prototype maximises the class's mean logit in the region; isolation keeps the input pixels that hold
the class's evidence for that region.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from leapcore.errors import InputError, ModelOutputError

OUTPUT_KINDS = ("logits", "multilabel_logits")


def probabilities(logits: torch.Tensor, output: str = "logits") -> torch.Tensor:
    """Class probabilities of ``[B, K]`` logits: softmax over classes, or per-class sigmoid for
    ``multilabel_logits``. Every probability leapcore reports goes through this function."""
    if output == "multilabel_logits":
        return torch.sigmoid(logits)
    return logits.softmax(dim=1)


def probability_name(output: str) -> str:
    """How probabilities were computed, in words, for reports and table metadata."""
    if output == "multilabel_logits":
        return "sigmoid per class (multi-label: classes independent, no softmax coupling)"
    return "softmax over classes"


@dataclass(frozen=True)
class Region:
    """Where a segmentation class's logits are pooled, in the model's input pixels.

    Attributes:
        kind: ``"image"``, ``"box"`` or ``"mask"``.
        weights: ``[H, W]`` float in [0, 1] at the input resolution (None for the whole image).
        label: a short text for tables and reports, e.g. ``image``, ``box:8,8,24,24``, ``mask:153px``.
    """

    kind: str
    weights: torch.Tensor | None
    label: str

    def pool(self, logits: torch.Tensor) -> torch.Tensor:
        """``[B, K, h, w]`` -> ``[B, K]``: each class's logit averaged over the region at ``h x w``."""
        if self.weights is None:
            return logits.mean(dim=(2, 3))
        w = self.weights.to(logits.device, logits.dtype)[None, None]
        if tuple(w.shape[2:]) != tuple(logits.shape[2:]):
            w = F.interpolate(w, size=tuple(logits.shape[2:]), mode="area")
        total = w.sum()
        if float(total) <= 0:
            raise InputError(
                f"the region {self.label} covers no pixel of the model's {tuple(logits.shape[2:])} "
                "logit map; give a larger region."
            )
        return (logits * w).sum(dim=(2, 3)) / total


WHOLE_IMAGE = Region("image", None, "image")


def resolve_region(value: Any, height: int, width: int) -> Region:
    """The config's ``region`` as a :class:`Region` for an ``height x width`` input image.

    Args:
        value: None (the whole image); a box ``[x0, y0, x1, y1]`` in pixels (x1, y1 exclusive); a
            mask (nested list, numpy array or tensor ``[H, W]``, non-zero inside); or the path of a
            mask image file (non-zero pixels inside).

    Raises:
        InputError: a box outside the image or empty, a mask of another size or empty; the message
            gives the image size and the region.
    """
    if value is None:
        return WHOLE_IMAGE
    if isinstance(value, (str, Path)):
        from PIL import Image

        path = Path(value)
        if not path.is_file():
            raise InputError(f"region {str(value)!r} is not a file; give a box or a mask image.")
        with Image.open(path) as image:
            array = np.asarray(image.convert("L"))
        return _mask_region(torch.from_numpy(array > 0), height, width, f"mask:{path.name}")
    if isinstance(value, Sequence) and len(value) == 4 and all(_is_number(v) for v in value):
        x0, y0, x1, y1 = (int(v) for v in value)
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise InputError(
                f"region box [x0, y0, x1, y1] = {[x0, y0, x1, y1]} is outside the image or empty: the "
                f"model's input is {width} x {height} (width x height), so a box needs "
                f"0 <= x0 < x1 <= {width} and 0 <= y0 < y1 <= {height}."
            )
        weights = torch.zeros(height, width)
        weights[y0:y1, x0:x1] = 1.0
        return Region("box", weights, f"box:{x0},{y0},{x1},{y1}")
    try:
        mask = torch.as_tensor(np.asarray(value, dtype=np.float32))
    except (TypeError, ValueError):
        raise InputError(
            f"region must be None, a box [x0, y0, x1, y1], a mask [H, W] or a mask file; got "
            f"{type(value).__name__}."
        ) from None
    return _mask_region(mask, height, width, None)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _mask_region(mask: torch.Tensor, height: int, width: int, label: str | None) -> Region:
    mask = mask.squeeze()
    if mask.ndim != 2 or tuple(mask.shape) != (height, width):
        raise InputError(
            f"region mask has shape {list(mask.shape)} but the model's input is {height} x {width} "
            f"(height x width); give a mask [{height}, {width}] (or a box [x0, y0, x1, y1])."
        )
    weights = (mask.float() != 0).float()
    count = int(weights.sum())
    if count == 0:
        raise InputError(
            f"region mask is empty: no pixel of the {height} x {width} input is inside it."
        )
    return Region("mask", weights, label or f"mask:{count}px")


def segmentation_layout(shape: Sequence[int], num_classes: int, channels_last: bool) -> str:
    """``"NCHW"`` or ``"NHWC"`` for a 4-D output of ``shape``; TF models try channels-last first.

    Raises:
        ModelOutputError: no axis of the output has ``num_classes`` entries.
    """
    order = ("NHWC", "NCHW") if channels_last else ("NCHW", "NHWC")
    for layout in order:
        axis = 3 if layout == "NHWC" else 1
        if shape[axis] == num_classes:
            return layout
    raise ModelOutputError(
        f"the model returned shape {list(shape)}: a segmentation output needs the class axis "
        f"({num_classes} classes, from class_list) at position 1 ([batch, classes, H, W]) or last "
        "([batch, H, W, classes])."
    )


def describe_output(audit: Any) -> str | None:
    """One sentence for reports on what the audit's numbers mean for this kind of model, or None
    for a plain single-label classifier (``audit``: an ``engine.Audit``)."""
    parts = []
    if getattr(audit, "output", "logits") == "multilabel_logits":
        parts.append(
            "Multi-label model: probabilities are per-class sigmoids (classes independent, no "
            "softmax coupling); entanglement is each class's logit gain over the target's."
        )
    if getattr(audit, "model_kind", "classifier") == "segmentation":
        size = getattr(audit, "logit_size", None)
        where = "the whole image" if audit.region in (None, "image") else f"region {audit.region}"
        at = f" (logit map {size[0]} x {size[1]})" if size else ""
        parts.append(
            f"Segmentation model: each class's logits are averaged over {where}{at}; prototypes "
            "maximise that mean, isolation keeps the pixels that hold its evidence."
        )
    return " ".join(parts) or None


def model_probabilities(model: object, logits: torch.Tensor) -> torch.Tensor:
    """``model``'s own probability function (``LogitsModel.probabilities``), else softmax."""
    own = getattr(model, "probabilities", None)
    return own(logits) if callable(own) else logits.softmax(dim=1)
