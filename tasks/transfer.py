"""The ``transfer`` analysis stage: every prototype's target probability on the reference models.

Runs when the config names ``reference_models`` (any URI the model sources accept, same class
list). Each reference is fetched like the audited model (``fetch_model``: cached, digest-checked)
and refused when its output width differs (:func:`check_reference_models`, callable before the
audit's MLflow run opens). The cached, retryable task :func:`transfer_prototypes` shows the merged
prototypes to each reference and writes the Arrow ``transfer`` table (``leapcore.transfer``); the
findings are MLflow metrics ``transfer/<reference>/<target>``; the report section and the W&B
table show a row per prototype.
"""

from __future__ import annotations

import time
from typing import Any

import pyarrow as pa

from leapcore import engine
from leapcore.config import EngineConfig
from leapcore.device import pick_device
from leapcore.quality import check_reference_width
from leapcore.results import prototypes_from_arrow
from leapcore.transfer import (
    LOW_TRANSFER,
    reference_probabilities,
    transfer_metrics,
    transfer_to_arrow,
)
from tasks.analysis import AuditContext, Findings, analysis_stage
from tasks.artifacts import ArtifactStore
from tasks.caching import TRANSFER
from tasks.model import ModelLocator, ModelRef, engine_model, locate_model
from tasks.runtime import run_stage
from tasks.stages import StageOutput, fetch_model, stage_task
from tasks.wandb_tables import wandb_table

TRANSFER_TAG = "leapcore.transfer_low"


def check_reference_models(
    config: EngineConfig,
    model: ModelRef,
    store: ArtifactStore,
    model_options: dict[str, Any] | None = None,
) -> list[tuple[ModelRef, ModelLocator]]:
    """Fetch ``config.reference_models`` and refuse any whose output width is not ``model``'s.

    Call it once the audited model is fetched and before the MLflow run opens (inside or outside a
    Prefect flow); the loaded models stay in this process's model cache for the stage.

    Raises:
        InputError: a reference model's width differs (the message names both widths).
        ModelSourceError: a reference URI that cannot be loaded.
    """
    from tasks.mlflow_registry import tracking_uri

    found = []
    for uri in config.reference_models:
        locator = locate_model(uri, model_options, tracking_uri())
        ref = fetch_model.fn(locator=locator, store=store)  # no Prefect run needed (CLI checks)
        check_reference_width(ref.uri, ref.num_classes, model.num_classes)
        found.append((ref, locator))
    return found


@stage_task("transfer", TRANSFER, "Target probability of every prototype on each reference model.")
def transfer_prototypes(
    model: ModelRef,
    config: EngineConfig,
    prototypes: list[StageOutput],
    references: list[ModelRef],
    reference_locators: list[ModelLocator],
    store: ArtifactStore,
    device: str | None = None,
) -> StageOutput:
    from tasks.audit_io import merge_prototypes

    began = time.perf_counter()
    merged = merge_prototypes(
        [
            prototypes_from_arrow(
                store.get_table(p.refs["prototypes"]), store.get_table(p.refs["trajectories"])
            )
            for p in sorted(prototypes, key=lambda p: p.first_row)
        ]
    )
    dev = pick_device(device)
    shown, _ = engine.isolation_inputs(merged, [], config, model.num_classes, dev)
    probs = {}
    for ref, locator in zip(references, reference_locators, strict=True):
        net, loaded = engine_model(ref, locator, config, dev)
        with engine.stage_mode(loaded.model, config, dev):
            batch = engine.prototype_chunk_size(net, len(shown), config, dev)
            probs[ref.uri] = reference_probabilities(net, shown, model.num_classes, batch, ref.uri)
    table = transfer_to_arrow(merged, probs, list(model.class_list))
    summary = [
        {
            "target": row["target"],
            "prototype": row["prototype"],
            "reference": row["reference"],
            "own probability": round(row["own_prob"], 4),
            "probability there": round(row["target_prob"], 4),
            "read there as": row["top_class"],
        }
        for row in table.to_pylist()
    ]
    ref = store.put_table(table, "transfer")
    return StageOutput("transfer", {"transfer": ref}, time.perf_counter() - began, summary)


def transfer_findings(tables: dict[str, pa.Table]) -> Findings:
    """Metrics ``transfer/<reference>/<target>``, ``/mean``, ``/low``; a run tag naming the
    prototypes whose target probability on some reference is below ``LOW_TRANSFER``."""
    table = tables.get("transfer")
    if table is None:
        return Findings()
    low = sorted(
        {
            f"{r['target']}#{r['prototype']}@{r['reference_label']}"
            for r in table.to_pylist()
            if r["low"]
        }
    )
    return Findings(
        metrics=transfer_metrics(table),
        run_tags={TRANSFER_TAG: ", ".join(low) if low else "none"},
    )


@analysis_stage("transfer", tables=("transfer",), findings=transfer_findings, order=45)
def transfer(ctx: AuditContext) -> tuple[StageOutput | None, str]:
    """Target probability of every prototype on each of the config's reference models."""
    if not ctx.config.reference_models:
        return None, "Skipped"
    found = check_reference_models(ctx.config, ctx.model, ctx.store)
    return run_stage(
        transfer_prototypes,
        model=ctx.model,
        config=ctx.config,
        prototypes=ctx.outputs["optimise_prototypes"],
        references=[ref for ref, _ in found],
        reference_locators=[locator for _, locator in found],
        store=ctx.store,
        device=ctx.device,
    )


@wandb_table("transfer")
def transfer_wandb_table(wandb: Any, table: pa.Table, audit: Any = None) -> Any:
    """One row per (prototype, reference): target, probabilities on both models, the reference's
    top class, and whether it falls below ``LOW_TRANSFER``."""
    columns = [
        "target",
        "prototype",
        "reference",
        "own_prob",
        "target_prob",
        "top_class",
        "top_prob",
        f"below_{LOW_TRANSFER}",
    ]
    out = wandb.Table(columns=columns)
    for r in table.to_pylist():
        out.add_data(
            r["target"],
            r["prototype"],
            r["reference"],
            r["own_prob"],
            r["target_prob"],
            r["top_class"],
            r["top_prob"],
            r["low"],
        )
    return out
