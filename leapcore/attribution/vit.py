"""Attention rollout (Abnar & Zuidema, 2020) for vision transformers with timm-style attention blocks.

Attention modules are found by their ``attn_drop`` child (timm's ``Attention``); the fused kernel is
switched off for the call so that the softmaxed attention passes through ``attn_drop``, where a hook
reads it. Rollout is class-agnostic: the map is the same for every target of an image.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from leapcore.attribution.core import MethodContext
from leapcore.attribution.registry import register_method
from leapcore.errors import InputError


def attention_blocks(network: nn.Module) -> list[nn.Module]:
    """Modules that compute softmax attention and expose it through ``attn_drop``."""
    return [m for m in network.modules() if hasattr(m, "attn_drop") and hasattr(m, "qkv")]


def rollout(
    attentions: list[torch.Tensor], head_fusion: str = "mean", discard_ratio: float = 0.0
) -> torch.Tensor:
    """Rolled-out attention ``[B, T, T]`` from per-layer ``[B, heads, T, T]`` attention."""
    joint = None
    for attention in attentions:
        fused = attention.max(dim=1).values if head_fusion == "max" else attention.mean(dim=1)
        if discard_ratio > 0:
            flat = fused.flatten(1)
            drop = int(flat.shape[1] * discard_ratio)
            lowest = flat.topk(drop, dim=1, largest=False).indices
            flat = flat.scatter(1, lowest, 0.0)
            fused = flat.view_as(fused)
        eye = torch.eye(fused.shape[-1], device=fused.device)
        step = (fused + eye) / 2
        step = step / step.sum(dim=-1, keepdim=True)
        joint = step if joint is None else step @ joint
    assert joint is not None
    return joint


@register_method(
    "attention_rollout",
    library="leapcore",
    passes="1 forward",
    defaults={"head_fusion": "mean", "discard_ratio": 0.0},
    aliases=("rollout",),
)
def attention_rollout(
    ctx: MethodContext, images: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """The class token's rolled-out attention to each patch, as a ``[B, g, g]`` grid."""
    network = ctx.network
    blocks = attention_blocks(network)
    if not blocks:
        raise InputError(
            "attention_rollout needs a vision transformer with timm-style attention blocks; this "
            f"model ({type(network).__name__}) has none."
        )
    captured: list[torch.Tensor] = []
    fused = [(b, getattr(b, "fused_attn", None)) for b in blocks]
    handles = [
        b.attn_drop.register_forward_hook(lambda _m, _i, out: captured.append(out)) for b in blocks
    ]
    try:
        for block, _ in fused:
            if hasattr(block, "fused_attn"):
                block.fused_attn = False
        with torch.no_grad():
            ctx.model(images)
    finally:
        for h in handles:
            h.remove()
        for block, value in fused:
            if value is not None:
                block.fused_attn = value
    joint = rollout(captured, ctx.options["head_fusion"], float(ctx.options["discard_ratio"]))
    prefix = int(getattr(network, "num_prefix_tokens", 1))
    cls_row = joint[:, 0, prefix:]
    grid = math.isqrt(cls_row.shape[1])
    if grid * grid != cls_row.shape[1]:
        raise InputError(
            f"attention_rollout expects a square patch grid; got {cls_row.shape[1]} patches."
        )
    return cls_row.reshape(-1, grid, grid)
