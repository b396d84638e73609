"""zennit's LRP composites and zennit-crp's concept heatmaps in the registry.

Relevance is computed at the network's input, after the adapter's preprocessing (a normalisation
would otherwise rescale it and break conservation), with the output seeded by the target logit so
that the input relevance of a bias-free network sums to that logit. Canonizers are chosen per model:
torchvision ResNet / VGG get zennit's own; every other model gets each batch norm merged into the
convolution or linear layer just before it (found by module order, which also covers timm's
``BatchNormAct2d``) and, for timm's residual blocks, the skip addition as a zennit ``Sum`` module so
that the addition splits relevance instead of copying it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from leapcore.attribution.core import MethodContext, find_layer
from leapcore.attribution.registry import register_method
from leapcore.errors import InputError

_LRP_PASSES = "1 (modified backward)"
_CRP_PASSES = "1 + top_k (the class heatmap, then each concept's conditional heatmap: forward + modified backward)"


def _zennit() -> Any:
    try:
        import zennit.canonizers
        import zennit.composites
        import zennit.layer
        import zennit.torchvision
    except ImportError as error:  # pragma: no cover - the extra is installed in CI
        raise ImportError("LRP needs zennit: pip install 'leapcore[attribution]'") from error
    return zennit


def unsupported_layers(network: nn.Module) -> list[tuple[str, str]]:
    """``(name, type)`` of leaf modules with weights that zennit's composites have no rule for."""
    from zennit.types import BatchNorm, Convolution, Linear

    found = []
    for name, module in network.named_modules():
        if list(module.children()) or not any(True for _ in module.parameters(recurse=False)):
            continue
        if not isinstance(module, (Convolution, Linear, BatchNorm)):
            found.append((name, type(module).__name__))
    return found


def check_lrp_layers(network: nn.Module) -> None:
    """Raise if LRP would silently pass relevance through layers without a rule, or find no layer
    at all (a ``torch.export`` program or a functional model hides its layers: zennit would place
    no rule and the "relevance" would be gradient x input)."""
    from zennit.types import Convolution, Linear

    if not any(isinstance(m, (Convolution, Linear)) for m in network.modules()):
        raise InputError(
            f"LRP finds no convolution or linear layer in this model ({type(network).__name__}): "
            "its layers are not torch modules zennit can see (a torch.export program, a "
            "functional or compiled model), so no rule would apply. Use a gradient method "
            "(integrated_gradients, saliency) or load the model as a torch module."
        )
    found = unsupported_layers(network)
    if found:
        kinds = sorted({kind for _, kind in found})
        names = ", ".join(name for name, _ in found[:5])
        raise InputError(
            f"LRP has no rule for layer type {', '.join(kinds)} (layers {names}"
            f"{', ...' if len(found) > 5 else ''}); zennit's composites cover convolutions, linear "
            "layers, batch norm, activations and pooling. Use a gradient method (integrated_gradients, "
            "saliency) for this model."
        )


class TimmResidualCanonizer:
    """timm's residual blocks (``has_skip``) add the skip through a zennit ``Sum`` module."""

    def __new__(cls) -> Any:
        from zennit.canonizers import AttributeCanonizer

        class _Canonizer(AttributeCanonizer):
            def __init__(self) -> None:
                super().__init__(self._attribute_map)

            @staticmethod
            def _attribute_map(name: str, module: nn.Module) -> dict[str, Any] | None:
                if not getattr(module, "has_skip", False) or not hasattr(module, "drop_path"):
                    return None
                from zennit.layer import Sum

                original = type(module).forward

                def forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
                    self.has_skip = False
                    try:
                        branch = original(self, x)
                    finally:
                        self.has_skip = True
                    return self.canonizer_sum(torch.stack([self.drop_path(branch), x], dim=-1))

                return {"forward": forward.__get__(module), "canonizer_sum": Sum()}

        return _Canonizer()


def _conv_bn_pairs(network: nn.Module) -> list[tuple[list[str], str]]:
    """Batch norms right after a convolution or linear layer, in module order (timm's norm-act too)."""
    from zennit.types import BatchNorm, Convolution, Linear

    pairs: list[tuple[list[str], str]] = []
    previous: tuple[str, nn.Module] | None = None
    inside = None
    for name, module in network.named_modules():
        if inside is not None and name.startswith(inside + "."):
            continue  # the activation inside timm's BatchNormAct2d
        is_norm = isinstance(module, BatchNorm)
        if not is_norm and list(module.children()):
            continue  # containers
        if is_norm:
            if previous is not None and isinstance(previous[1], (Convolution, Linear)):
                pairs.append(([previous[0]], name))
            inside = name
        previous = (name, module)
    return pairs


def canonizers_for(network: nn.Module) -> list[Any]:
    """zennit canonizers for ``network`` (see the module docstring)."""
    zennit = _zennit()
    try:
        import torchvision

        if isinstance(network, torchvision.models.ResNet):
            return [zennit.torchvision.ResNetCanonizer()]
        if isinstance(network, torchvision.models.VGG):
            return [zennit.torchvision.VGGCanonizer()]
    except ImportError:  # pragma: no cover
        pass
    canonizers: list[Any] = [zennit.canonizers.NamedMergeBatchNorm(_conv_bn_pairs(network))]
    if any(getattr(m, "has_skip", False) for m in network.modules()):
        canonizers.append(TimmResidualCanonizer())
    return canonizers


def make_composite(
    name: str, network: nn.Module, low: torch.Tensor, high: torch.Tensor, **rules: Any
) -> Any:
    """A zennit composite by name, with the model's canonizers."""
    zennit = _zennit()
    canonizers = canonizers_for(network)
    if name == "epsilon_plus_flat":
        return zennit.composites.EpsilonPlusFlat(canonizers=canonizers, **rules)
    if name == "epsilon_gamma_box":
        return zennit.composites.EpsilonGammaBox(low=low, high=high, canonizers=canonizers, **rules)
    if name == "epsilon_alpha2_beta1":
        return zennit.composites.EpsilonAlpha2Beta1(canonizers=canonizers, **rules)
    raise InputError(f"unknown composite {name!r}")


def _bounds(ctx: MethodContext, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return ctx.preprocess(torch.zeros_like(images)), ctx.preprocess(torch.ones_like(images))


def lrp_relevance(
    ctx: MethodContext, images: torch.Tensor, targets: torch.Tensor, composite_name: str
) -> torch.Tensor:
    """Input relevance ``[B, C, H, W]`` at the network's input; sums to the target logit."""
    network = ctx.network
    check_lrp_layers(network)
    x = ctx.preprocess(images).detach()
    low, high = _bounds(ctx, images)
    composite = make_composite(composite_name, network, low.detach(), high.detach(), **ctx.options)
    x.requires_grad_(True)
    from leapcore.adapter import unwrap_logits

    with torch.enable_grad(), composite.context(network) as modified:
        logits = unwrap_logits(modified(x))
        seed = torch.zeros_like(logits)
        seed.scatter_(1, targets[:, None], logits.gather(1, targets[:, None]).detach())
        (relevance,) = torch.autograd.grad(logits, x, seed)
    return relevance


def _lrp_method(composite_name: str, aliases: tuple[str, ...], defaults: dict[str, Any]) -> None:
    def compute(ctx: MethodContext, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return lrp_relevance(ctx, images, targets, composite_name)

    compute.__doc__ = f"LRP with zennit's {composite_name} composite and the model's canonizers."
    register_method(
        f"lrp_{composite_name}",
        library="zennit",
        passes=_LRP_PASSES,
        defaults=defaults,
        aliases=aliases,
    )(compute)


_lrp_method(
    "epsilon_plus_flat", ("lrp", "lrp_epsilon_plus"), {"epsilon": 1e-6, "zero_params": None}
)
_lrp_method(
    "epsilon_gamma_box", ("lrp_gamma",), {"epsilon": 1e-6, "gamma": 0.25, "zero_params": None}
)
_lrp_method("epsilon_alpha2_beta1", ("lrp_alpha_beta",), {"epsilon": 1e-6, "zero_params": None})


def default_crp_layer(network: nn.Module) -> str:
    """CRP's layer when none is given: the network's last convolution."""
    from zennit.types import Convolution

    convs = [n for n, m in network.named_modules() if isinstance(m, Convolution)]
    if not convs:
        raise InputError("CRP needs a convolution layer; pass layer='<module name>'.")
    return convs[-1]


def _chunks(total: int, size: int) -> Iterator[slice]:
    for start in range(0, total, size):
        yield slice(start, start + size)


def concept_relevance_propagation(
    ctx: MethodContext, images: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CRP: the class heatmap and the conditional heatmaps of the top-k channel concepts of a layer."""
    from crp.attribution import CondAttribution
    from crp.concepts import ChannelConcept

    network = ctx.network
    check_lrp_layers(network)
    layer = ctx.options.get("layer") or default_crp_layer(network)
    find_layer(network, layer)
    low, high = _bounds(ctx, images)
    composite = make_composite(ctx.options["composite"], network, low, high)
    attribution = CondAttribution(network, device=images.device)
    data = ctx.preprocess(images).detach().requires_grad_(True)
    with torch.enable_grad():
        whole = attribution(
            data, [{"y": [int(t)]} for t in targets], composite, record_layer=[layer]
        )
    per_concept = ChannelConcept().attribute(whole.relevances[layer], abs_norm=False)
    k = min(int(ctx.options["top_k"]), per_concept.shape[1])
    relevance, ids = per_concept.topk(k, dim=1)
    maps = []
    rows = max(1, ctx.rows)
    conditions = [{layer: [int(c)], "y": [int(t)]} for t, cs in zip(targets, ids) for c in cs]
    repeated = torch.repeat_interleave(data.detach(), k, dim=0)
    for part in _chunks(len(conditions), rows):
        chunk = repeated[part].clone().requires_grad_(True)
        with torch.enable_grad():
            maps.append(attribution(chunk, conditions[part], composite).heatmap)
    concept_maps = torch.cat(maps).reshape(len(targets), k, *whole.heatmap.shape[-2:])
    extras = {"concept_ids": ids, "concept_relevance": relevance, "concept_maps": concept_maps}
    return whole.heatmap.to(images.device), extras


def _register_crp() -> None:
    register_method(
        "crp",
        library="zennit-crp",
        passes=_CRP_PASSES,
        defaults={"layer": None, "top_k": 4, "composite": "epsilon_plus_flat"},
        aliases=("concept_relevance_propagation",),
    )(concept_relevance_propagation)


_register_crp()
