"""TruLens-style internal influence: a ``Cut``, a distribution of interest and a quantity of interest.

Influence of the units at a cut (the input, or the output of a named layer) on a quantity of
interest (``class``: the target logit; ``max``: the largest logit; ``comparative``: the target logit
minus the ``contrast`` class's), averaged over a distribution of interest at the cut (``point``: the
activation itself; ``linear``: ``resolution`` points on the segment from the baseline to the
activation, at the midpoints of equal sub-intervals) and, with ``multiply_activation``, multiplied by
``activation - baseline``. At the input cut with the linear distribution this is integrated
gradients (midpoint rule); with the point distribution and no multiplication, the input gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from leapcore.attribution.core import MethodContext
from leapcore.attribution.registry import GRADIENT_FRAMEWORKS, register_method
from leapcore.errors import InputError

DOIS = ("linear", "point")
QOIS = ("class", "max", "comparative")


@dataclass(frozen=True)
class Cut:
    """Where influence is measured: ``layer=None`` is the input (pixels in [0, 1])."""

    layer: str | None = None


def doi_alphas(doi: str, resolution: int, device: torch.device) -> torch.Tensor:
    """Interpolation points of the distribution of interest, from the baseline (0) to the point (1)."""
    if doi == "point":
        return torch.ones(1, device=device)
    if doi == "linear":
        return (torch.arange(resolution, device=device, dtype=torch.float32) + 0.5) / resolution
    raise InputError(f"unknown distribution of interest {doi!r}; use one of {list(DOIS)}.")


def quantity(
    logits: torch.Tensor, targets: torch.Tensor, qoi: str, contrast: int | None
) -> torch.Tensor:
    """The quantity of interest per row."""
    chosen = logits.gather(1, targets[:, None])[:, 0]
    if qoi == "class":
        return chosen
    if qoi == "max":
        return logits.max(dim=1).values
    if qoi == "comparative":
        if contrast is None:
            raise InputError(
                "qoi='comparative' needs contrast=<class index> to compare the target with."
            )
        return chosen - logits[:, int(contrast)]
    raise InputError(f"unknown quantity of interest {qoi!r}; use one of {list(QOIS)}.")


class _ReplaceOutput:
    """A forward hook that records a layer's output and can replace it with given values."""

    def __init__(self) -> None:
        self.recorded: torch.Tensor | None = None
        self.replacement: torch.Tensor | None = None

    def __call__(self, _module: nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
        self.recorded = output
        return self.replacement if self.replacement is not None else output


def internal_influence(
    ctx: MethodContext, images: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Influence at the cut ``[B, ...]`` (see the module docstring); the map sums it over channels."""
    o = ctx.options
    alphas = doi_alphas(o["doi"], int(o["resolution"]), images.device)
    steps = alphas.shape[0]
    model = ctx.model
    if o["layer"] is None:
        base = torch.full_like(images, float(o["baseline"]))
        total = torch.zeros_like(images)
        for a in alphas:
            z = (base + a * (images - base)).detach().requires_grad_(True)
            with torch.enable_grad():
                q = quantity(model(z), targets, o["qoi"], o["contrast"])
                (grad,) = torch.autograd.grad(q.sum(), z)
            total += grad
        influence = total / steps
        if o["multiply_activation"]:
            influence = influence * (images - base)
        return influence, {}
    hook = _ReplaceOutput()
    handle = ctx.layer(o["layer"]).register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(images)
        activation = hook.recorded.detach()
        base = torch.full_like(activation, float(o["baseline"]))
        total = torch.zeros_like(activation)
        for a in alphas:
            z = (base + a * (activation - base)).requires_grad_(True)
            hook.replacement = z
            with torch.enable_grad():
                q = quantity(model(images), targets, o["qoi"], o["contrast"])
                (grad,) = torch.autograd.grad(q.sum(), z)
            total += grad
    finally:
        handle.remove()
    influence = total / steps
    if o["multiply_activation"]:
        influence = influence * (activation - base)
    per_unit = influence.flatten(2).sum(-1) if influence.ndim > 2 else influence
    spatial = influence if influence.ndim == 4 else influence[:, :, None, None]
    return spatial, {"unit_influence": per_unit}


register_method(
    "internal_influence",
    library="leapcore (TruLens' definition)",
    passes="resolution (default 16), plus 1 forward at a layer cut",
    frameworks=GRADIENT_FRAMEWORKS,
    defaults={
        "layer": None,
        "doi": "linear",
        "qoi": "class",
        "contrast": None,
        "resolution": 16,
        "baseline": 0.0,
        "multiply_activation": True,
    },
    aliases=("influence", "trulens"),
)(internal_influence)
