"""Reading a finished audit back from its stage artifacts, as the engine's :class:`~leapcore.engine.Audit`.

The report and the publishers work from the same object ``engine.run`` returns, rebuilt from the
Arrow artifacts (class chunks concatenated in row order), so they never recompute anything.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from leapcore.config import BASELINE, ENTANGLEMENT, ISOLATION, LR, PROTOTYPES, EngineConfig
from leapcore.engine import Audit
from leapcore.isolation import PAIR_MEASURES, IsolationResult
from leapcore.prototypes import PrototypeResult
from leapcore.results import (
    baseline_from_arrow,
    entanglement_from_arrow,
    entanglement_probed_from_arrow,
    isolations_from_arrow,
    learning_rate_from_arrow,
    prototypes_from_arrow,
    samples_from_arrow,
)
from tasks.artifacts import ArtifactStore
from tasks.model import ModelRef
from tasks.stage_outputs import StageOutput


def merge_prototypes(parts: list[PrototypeResult]) -> PrototypeResult:
    """Concatenate the prototype results of consecutive class chunks (rows in target order)."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    return replace(
        first,
        targets=[t for p in parts for t in p.targets],
        images=torch.cat([p.images for p in parts]),
        alphas=None if first.alphas is None else torch.cat([p.alphas for p in parts]),
        logits=torch.cat([p.logits for p in parts]),
        trajectory=torch.cat([p.trajectory for p in parts], dim=1),
        seconds=sum(p.seconds for p in parts),
        robust_probs=_cat_optional([p.robust_probs for p in parts]),
        transfer_probs=_cat_optional([p.transfer_probs for p in parts]),
    )


def _cat_optional(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    """Concatenate per-chunk quality columns; None when any chunk lacks them."""
    return None if any(p is None for p in parts) else torch.cat(parts)


def merge_isolations(parts: list[IsolationResult]) -> IsolationResult:
    """Concatenate isolation results whose pairs already name rows of the whole audit."""
    if len(parts) == 1:
        return parts[0]
    return IsolationResult(
        pairs=[pair for p in parts for pair in p.pairs],
        masks=torch.cat([p.masks for p in parts]),
        isolated=torch.cat([p.isolated for p in parts]),
        logits_full=torch.cat([p.logits_full for p in parts]),
        logits_isolated=torch.cat([p.logits_isolated for p in parts]),
        method=parts[0].method,
        seconds=sum(p.seconds for p in parts),
        saliency=_cat_optional([p.saliency for p in parts]),
        **{name: _cat_optional([getattr(p, name) for p in parts]) for name in PAIR_MEASURES},
    )


def load_audit(
    store: ArtifactStore,
    model: ModelRef,
    config: EngineConfig,
    baseline: StageOutput | None = None,
    learning_rate: StageOutput | None = None,
    prototypes: list[StageOutput] | None = None,
    entanglement: StageOutput | None = None,
    isolations: list[StageOutput] | None = None,
    samples: StageOutput | None = None,
) -> Audit:
    """The :class:`Audit` that the given stage outputs describe (stages left out stay None)."""
    audit = Audit(class_list=list(model.class_list), config=config, output=config.output)
    if baseline is not None:
        audit.baseline = baseline_from_arrow(store.get_table(baseline.refs["baseline"]))
        audit.timings[BASELINE] = baseline.seconds
    if learning_rate is not None:
        audit.lr = learning_rate_from_arrow(store.get_table(learning_rate.refs["learning_rate"]))
        audit.timings[LR] = learning_rate.seconds
    if prototypes:
        ordered = sorted(prototypes, key=lambda p: p.first_row)
        audit.prototypes = merge_prototypes(
            [
                prototypes_from_arrow(
                    store.get_table(p.refs["prototypes"]), store.get_table(p.refs["trajectories"])
                )
                for p in ordered
            ]
        )
        audit.timings[PROTOTYPES] = sum(p.seconds for p in ordered)
        audit.region = audit.prototypes.region
    if entanglement is not None:
        table = store.get_table(entanglement.refs["entanglement"])
        audit.entanglement = entanglement_from_arrow(table)
        audit.entanglement_probed = entanglement_probed_from_arrow(table)
        audit.timings[ENTANGLEMENT] = entanglement.seconds
    if isolations:
        ordered = sorted(isolations, key=lambda p: p.first_row)
        audit.isolation = merge_isolations(
            [isolations_from_arrow(store.get_table(p.refs["isolations"])) for p in ordered]
        )
        audit.timings[ISOLATION] = sum(p.seconds for p in ordered)
        table = store.get_table(ordered[0].refs["isolations"])
        if audit.region is None and "region" in table.column_names and table.num_rows:
            audit.region = table.column("region")[0].as_py()
    if samples is not None:
        images, logits, _ = samples_from_arrow(store.get_table(samples.refs["samples"]))
        audit.samples, audit.sample_logits = images, logits
    if audit.region is not None:
        audit.model_kind = "segmentation"
    return audit
