"""Relevance Maximisation (zennit-crp): the user's images that are most relevant for a concept.

For each image of a reference set (a folder of the user's images, loaded by the caller), CRP
attributes the model's prediction (or a given class) and the relevance of every channel concept of
a layer is summed over the channel (zennit-crp's ``ChannelConcept.attribute``, normalised by the sum
of absolute relevances, as zennit-crp's RelMax ``"sum"`` mode). The reference images of a concept are
those where it takes the largest share. ``mode="activation"`` ranks by the channel's mean activation
instead (ActMax), for comparison.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import torch

from leapcore.attribution.core import MethodContext, as_logits_model, check_images, find_layer
from leapcore.attribution.lrp import check_lrp_layers, make_composite
from leapcore.errors import InputError


@dataclass
class ReferenceImages:
    """``indices`` ``[concepts, n]`` of the reference images per concept and their ``scores``."""

    concepts: list[int]
    indices: torch.Tensor
    scores: torch.Tensor


def concept_scores(
    model: Any,
    images: torch.Tensor,
    layer: str,
    *,
    targets: list[int] | None = None,
    mode: str = "relevance",
    composite: str = "epsilon_plus_flat",
    batch_size: int = 16,
    **options: Any,
) -> torch.Tensor:
    """``[N, C]``: each image's share of relevance (or mean activation) per channel of ``layer``."""
    from crp.attribution import CondAttribution
    from crp.concepts import ChannelConcept

    if mode not in ("relevance", "activation"):
        raise InputError(
            f"mode must be 'relevance' (RelMax) or 'activation' (ActMax); got {mode!r}"
        )
    images = check_images(images)
    adapter = as_logits_model(
        model, images, options.get("preprocessing"), options.get("class_list")
    )
    network = adapter.model
    check_lrp_layers(network)
    find_layer(network, layer)
    context = MethodContext(adapter, {}, batch_size, "pt")
    attribution = CondAttribution(network, device=images.device)
    scores = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        data = context.preprocess(batch).detach().requires_grad_(True)
        low, high = (
            context.preprocess(torch.zeros_like(batch)),
            context.preprocess(torch.ones_like(batch)),
        )
        chosen = targets[start : start + batch_size] if targets is not None else None
        if chosen is None:
            with torch.no_grad():
                chosen = adapter(batch).argmax(1).tolist()
        with torch.enable_grad():
            out = attribution(
                data,
                [{"y": [int(t)]} for t in chosen],
                make_composite(composite, network, low, high),
                record_layer=[layer],
            )
        if mode == "relevance":
            scores.append(ChannelConcept().attribute(out.relevances[layer], abs_norm=True))
        else:
            scores.append(out.activations[layer].flatten(2).mean(-1))
    return torch.cat(scores).detach().cpu()


def reference_images(
    model: Any, images: torch.Tensor, layer: str, concepts: list[int], n: int = 4, **options: Any
) -> ReferenceImages:
    """The ``n`` images of ``images`` most relevant (RelMax) for each of ``concepts`` of ``layer``."""
    scores = concept_scores(model, images, layer, **options)
    if max(concepts) >= scores.shape[1] or min(concepts) < 0:
        raise InputError(f"layer {layer!r} has {scores.shape[1]} channels; got concepts {concepts}")
    picked = scores[:, concepts].T  # [concepts, N]
    top = picked.topk(min(n, picked.shape[1]), dim=1)
    return ReferenceImages(list(concepts), top.indices, top.values)


RELMAX_SCHEMA = "relmax"


def relmax_table(
    model: Any,
    images: torch.Tensor,
    names: list[str],
    layer: str,
    concepts: list[int],
    n: int = 4,
    **options: Any,
) -> pa.Table:
    """Schema ``relmax``: the ``n`` reference images of each concept of ``layer`` among ``images``.

    One row per (concept, rank): ``layer`` string, ``concept`` int32 (channel), ``rank`` int32 (0 =
    most relevant), ``image_name`` string, ``score`` float32 (the concept's share of the image's
    relevance at the layer, as :func:`concept_scores`), ``picture`` binary (the image as a PNG).
    Metadata ``leapcore.mode`` records ``relevance`` (RelMax) or ``activation`` (ActMax).
    """
    from leapcore.attribution.arrow import picture_png
    from leapcore.results import _with_schema

    if len(names) != len(images):
        raise InputError(f"{len(images)} reference images but {len(names)} names.")
    refs = reference_images(model, images, layer, sorted(set(concepts)), n, **options)
    rows: dict[str, list] = {k: [] for k in ("concept", "rank", "image_name", "score", "picture")}
    pngs: dict[int, bytes] = {}
    for concept, picked, scores in zip(refs.concepts, refs.indices, refs.scores):
        for rank, (index, score) in enumerate(zip(picked.tolist(), scores.tolist())):
            pngs.setdefault(index, picture_png(images[index].cpu()))
            for key, value in zip(rows, (concept, rank, names[index], score, pngs[index])):
                rows[key].append(value)
    table = pa.table(
        {
            "layer": pa.array([layer] * len(rows["concept"]), pa.string()),
            "concept": pa.array(rows["concept"], pa.int32()),
            "rank": pa.array(rows["rank"], pa.int32()),
            "image_name": pa.array(rows["image_name"], pa.string()),
            "score": pa.array(rows["score"], pa.float32()),
            "picture": pa.array(rows["picture"], pa.binary()),
        }
    )
    return _with_schema(table, RELMAX_SCHEMA, {"mode": options.get("mode", "relevance")})
