"""Vision-transformer methods over timm-style attention blocks (InterpretDL's ViT interpreters).

- ``attention_rollout`` (Abnar & Zuidema, 2020): the product of the layers' head-averaged attention
  with the identity added; class-agnostic (the same map for every target of an image).
- ``generic_attention`` (Chefer, Gur & Wolf, 2021, "Generic Attention-model Explainability", the
  ViT rule of InterpretDL's ``GAInterpreter``): relevance ``R = I``, then for each block in forward
  order from ``start_layer`` on, ``R += mean_heads((dy_t/dA * A)^+) @ R``; the class token's row
  over the patches. ``y_t`` is the target's logit here, as in Chefer et al.'s code (InterpretDL's
  TAM takes the softmax probability; every leapcore method seeds the logit).
- ``transition_attention`` (TAM: Yuan et al., 2021, "Explaining Information Flow Inside Vision
  Transformers Using Markov Chain", InterpretDL's ``TAMInterpreter``): the class token's row of the
  last block's head-averaged attention, carried back through the blocks ``start_layer`` .. L-2 as a
  Markov chain with a residual (``s <- s @ A_i + s``), then weighted by the integrated gradient of
  the last block's attention (class token's row, heads averaged, negatives clipped) along the
  straight path from a constant pixel ``baseline`` (black: as ``integrated_gradients`` here; the
  reference code scales the normalised network input instead).

- ``bidirectional`` (Chen et al., 2023, "Beyond Intuition: Rethinking Token Attributions inside
  Transformers", InterpretDL's ``BTCVInterpreter`` in its head mode): attentional perception
  ``R += A_fused @ R`` from ``start_layer`` on, each block's heads weighted by ``mean |A_h^T G_h|``
  (normalised over the heads), times the reasoning feedback (TAM's integrated gradient of the last
  block's attention); the class token's row (every patch token's row, averaged, for pooled ViTs).
  The token mode (value-norm weighting) is not built.

Attention modules are found by their ``attn_drop`` child (timm's ``Attention``); the fused kernel is
switched off for the call so that the softmaxed attention passes through ``attn_drop``, where a hook
reads it (and the gradient of the target logit reaches it through ``attn @ v``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

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


VIT_METHODS = ("attention_rollout", "bidirectional", "generic_attention", "transition_attention")


def _blocks_or_refuse(network: nn.Module, method: str) -> list[nn.Module]:
    blocks = attention_blocks(network)
    if not blocks:
        from leapcore.attribution.registry import list_methods

        others = [m for m in list_methods() if m not in VIT_METHODS]
        raise InputError(
            f"{method} needs a vision transformer with timm-style attention blocks; this model "
            f"({type(network).__name__}) has none. Methods for models without attention blocks: "
            f"{', '.join(others)}."
        )
    return blocks


@contextlib.contextmanager
def recorded_attention(network: nn.Module, method: str) -> Iterator[list[torch.Tensor]]:
    """Each block's softmaxed attention ``[B, heads, T, T]`` of the forward calls made inside, in
    forward order (kept in the autograd graph); the blocks' fused-kernel flags are restored."""
    blocks = _blocks_or_refuse(network, method)
    captured: list[torch.Tensor] = []
    fused = [(b, getattr(b, "fused_attn", None)) for b in blocks]
    handles = [
        b.attn_drop.register_forward_hook(lambda _m, _i, out: captured.append(out)) for b in blocks
    ]
    try:
        for block, value in fused:
            if value is not None:
                block.fused_attn = False
        yield captured
    finally:
        for h in handles:
            h.remove()
        for block, value in fused:
            if value is not None:
                block.fused_attn = value


def attention_and_gradients(
    ctx: MethodContext, images: torch.Tensor, targets: torch.Tensor, method: str
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every block's attention and the gradient of each image's target logit with respect to it."""
    with recorded_attention(ctx.network, method) as captured, torch.enable_grad():
        logits = ctx.model(images.detach().requires_grad_(True))
        score = logits.gather(1, targets[:, None]).sum()  # images are independent: per-image grads
        gradients = torch.autograd.grad(score, captured)
    return [a.detach() for a in captured], [g.detach() for g in gradients]


def _patch_grid(network: nn.Module, cls_row: torch.Tensor, method: str) -> torch.Tensor:
    """``[B, T]`` over all tokens -> ``[B, g, g]`` over the patches (prefix tokens dropped)."""
    prefix = int(getattr(network, "num_prefix_tokens", 1))
    patches = cls_row[:, prefix:]
    grid = math.isqrt(patches.shape[1])
    if grid * grid != patches.shape[1]:
        raise InputError(f"{method} expects a square patch grid; got {patches.shape[1]} patches.")
    return patches.reshape(-1, grid, grid)


def generic_attention_relevance(
    attentions: list[torch.Tensor], gradients: list[torch.Tensor], start_layer: int = 0
) -> torch.Tensor:
    """Chefer et al.'s self-attention rule: ``[B, T, T]`` relevance (see the module docstring);
    blocks before ``start_layer`` are left out (InterpretDL's option)."""
    first = attentions[0]
    relevance = torch.eye(first.shape[-1], device=first.device).expand(first.shape[0], -1, -1)
    for attention, gradient in list(zip(attentions, gradients))[max(0, start_layer) :]:
        cam = (gradient * attention).clamp(min=0).mean(dim=1)
        relevance = relevance + cam @ relevance
    return relevance


def transition_states(attentions: list[torch.Tensor], start_layer: int) -> torch.Tensor:
    """TAM's Markov chain: ``[B, T]`` states from the last block's class-token row (see above)."""
    states = attentions[-1].mean(dim=1)[:, :1, :]  # [B, 1, T]
    for i in reversed(range(max(0, start_layer), len(attentions) - 1)):
        states = states @ attentions[i].mean(dim=1) + states
    return states[:, 0]


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
    with recorded_attention(ctx.network, "attention_rollout") as captured, torch.no_grad():
        ctx.model(images)
    joint = rollout(captured, ctx.options["head_fusion"], float(ctx.options["discard_ratio"]))
    return _patch_grid(ctx.network, joint[:, 0], "attention_rollout")


@register_method(
    "generic_attention",
    library="leapcore",
    passes="1",
    defaults={"start_layer": 0},
    aliases=("ga", "chefer"),
)
def generic_attention(
    ctx: MethodContext, images: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Gradient-weighted attention relevance of the target (Chefer et al., 2021), ``[B, g, g]``."""
    attentions, gradients = attention_and_gradients(ctx, images, targets, "generic_attention")
    relevance = generic_attention_relevance(attentions, gradients, int(ctx.options["start_layer"]))
    return _patch_grid(ctx.network, relevance[:, 0], "generic_attention")


@register_method(
    "transition_attention",
    library="leapcore",
    passes="1 + steps (default 20)",
    defaults={"start_layer": 4, "steps": 20, "baseline": 0.0, "with_integral": True},
    aliases=("tam",),
)
def transition_attention(
    ctx: MethodContext, images: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Transition attention maps (TAM) of the target, ``[B, g, g]``."""
    o = ctx.options
    with recorded_attention(ctx.network, "transition_attention") as captured, torch.no_grad():
        ctx.model(images)
    states = transition_states(captured, int(o["start_layer"]))
    if o["with_integral"]:
        feedback = last_attention_feedback(ctx, images, targets, "transition_attention")
        states = states * feedback[:, 0]
    return _patch_grid(ctx.network, states, "transition_attention")


def last_attention_feedback(
    ctx: MethodContext, images: torch.Tensor, targets: torch.Tensor, method: str
) -> torch.Tensor:
    """``[B, T, T]``: the integrated gradient of the target logit with respect to the last block's
    attention (``steps`` points from the constant pixel ``baseline``), negatives clipped, heads
    averaged (TAM's and the bidirectional method's "reasoning feedback")."""
    o = ctx.options
    baseline = torch.full_like(images, float(o["baseline"]))
    total = None
    for alpha in torch.linspace(0, 1, int(o["steps"])).tolist():
        point = baseline + alpha * (images - baseline)
        _, gradients = attention_and_gradients(ctx, point, targets, method)
        total = gradients[-1] if total is None else total + gradients[-1]
    assert total is not None
    return (total / int(o["steps"])).clamp(min=0).mean(dim=1)


def head_weighted_relevance(
    attentions: list[torch.Tensor], gradients: list[torch.Tensor], start_layer: int
) -> torch.Tensor:
    """The bidirectional method's attentional perception (head mode): per block from
    ``start_layer`` on, heads weighted by ``mean |A_h^T G_h|`` (normalised to sum 1), then
    ``R += A_fused @ R`` from ``R = I``; ``[B, T, T]``."""
    first = attentions[0]
    relevance = torch.eye(first.shape[-1], device=first.device).expand(first.shape[0], -1, -1)
    for attention, gradient in list(zip(attentions, gradients))[max(0, start_layer) :]:
        importance = (attention.transpose(-1, -2) @ gradient).abs().mean(dim=(-1, -2))  # [B, h]
        importance = importance / importance.sum(dim=1, keepdim=True)
        fused = (importance[:, :, None, None] * attention).sum(dim=1)
        relevance = relevance + fused @ relevance
    return relevance


@register_method(
    "bidirectional",
    library="leapcore",
    passes="1 + steps (default 20)",
    defaults={"start_layer": 3, "steps": 20, "baseline": 0.0},
    aliases=("bt", "bidirectional_transformer"),
)
def bidirectional(ctx: MethodContext, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Bidirectional transformer explanation (Chen et al., 2023; InterpretDL's ``BTCVInterpreter``,
    head mode): head-weighted attention relevance times the last block's integrated gradient."""
    attentions, gradients = attention_and_gradients(ctx, images, targets, "bidirectional")
    relevance = head_weighted_relevance(attentions, gradients, int(ctx.options["start_layer"]))
    feedback = last_attention_feedback(ctx, images, targets, "bidirectional")
    if getattr(ctx.network, "global_pool", "token") in ("token", None, ""):
        row = (relevance * feedback)[:, 0]
    else:  # pooled over the patch tokens (e.g. MAE-style ViTs): every patch token's row
        prefix = int(getattr(ctx.network, "num_prefix_tokens", 1))
        row = (relevance * feedback)[:, prefix:].mean(dim=1)
    return _patch_grid(ctx.network, row, "bidirectional")
