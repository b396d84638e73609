"""The ``attribute_samples`` stage: pixel attributions of the loaded samples, with faithfulness.

Reads the ``samples`` table, runs ``leapcore.attribution.attribute`` for the requested methods and
targets (default: each image's top class), scores every map with ``leapcore.faithfulness`` and
writes the ``attributions`` table (schema in ``leapcore.attribution.arrow``). Cached by content and
retried like every stage.
"""

from __future__ import annotations

import time
from typing import Any

from leapcore.attribution import attribute, get_method
from leapcore.attribution.arrow import attributions_to_arrow, faithfulness_scores
from leapcore.config import EngineConfig
from leapcore.device import pick_device
from leapcore.results import samples_from_arrow
from tasks.artifacts import ArtifactStore
from tasks.caching import ATTRIBUTION
from tasks.model import ModelLocator, ModelRef, engine_model
from tasks.stages import StageOutput, stage_task


def check_methods(methods: list[str] | str | None) -> list[str]:
    """Registry names of ``methods`` (a list or ``"ig,lrp,crp"``); raises InputError on unknown ones."""
    if methods is None:
        return []
    items = methods.split(",") if isinstance(methods, str) else list(methods)
    return [get_method(m).name for m in (i.strip() for i in items) if m]


@stage_task("attribute_samples", ATTRIBUTION, "Attribute each image's prediction pixel by pixel.")
def attribute_samples(
    model: ModelRef,
    locator: ModelLocator,
    config: EngineConfig,
    samples: StageOutput,
    methods: list[str],
    targets: list[list[int]] | None,
    store: ArtifactStore,
    method_options: dict[str, Any] | None = None,
    device: str | None = None,
) -> StageOutput:
    dev = pick_device(device)
    net, _ = engine_model(model, locator, config, dev)
    images, logits, names = samples_from_arrow(store.get_table(samples.refs["samples"]))
    images = images.to(dev)
    if targets is None:
        if logits is None:
            import torch

            with torch.no_grad():
                logits = net(images)
        chosen: Any = logits.argmax(1).tolist()
    else:
        # Every class named by the user, in every image (a hybrid's classes one by one).
        chosen = [sorted({c for group in targets for c in group})] * len(images)
    began = time.perf_counter()
    result = attribute(net, images, chosen, methods, **(method_options or {}))
    seconds = time.perf_counter() - began
    scores = faithfulness_scores(net, images, result)
    table = attributions_to_arrow(result, list(model.class_list), names, scores)
    summary = [
        {
            "image": row["image_name"],
            "class": row["target_name"],
            "method": row["method"],
            "deletion AUC": round(row["deletion_auc"], 3),
            "insertion AUC": round(row["insertion_auc"], 3),
            "sparseness": round(row["sparseness"], 3),
        }
        for row in table.drop_columns(["map"]).to_pylist()
    ]
    ref = store.put_table(table, "attributions")
    return StageOutput("attribute_samples", {"attributions": ref}, seconds, summary)
