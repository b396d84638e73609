"""Attribution stages: pixel attributions with faithfulness, as ``attributions`` tables.

- ``attribute_samples`` (``leap explain --methods``): reads the ``samples`` table, runs
  ``leapcore.attribution.attribute`` for the requested methods and targets (default: each image's top
  class), scores every map with ``leapcore.faithfulness`` and writes the ``attributions`` table
  (schema in ``leapcore.attribution.arrow``).
- ``attribute_prototypes`` (``audit_model(methods=...)``, ``leap audit --methods``): the audit's
  analysis stage; the prototypes, each for its own target, and the user's samples when given, each
  for its top audited class (``leapcore.attribution.audit``), in one table with the pictures.

Both are cached by content and retried like every stage.
"""

from __future__ import annotations

import time
from typing import Any

from leapcore.attribution import attribute, get_method
from leapcore.attribution.arrow import attributions_to_arrow, faithfulness_scores
from leapcore.attribution.audit import explain_table, prototype_inputs, sample_inputs
from leapcore.attribution.report import attribution_metrics
from leapcore.config import EngineConfig
from leapcore.device import pick_device
from leapcore.results import prototypes_from_arrow, samples_from_arrow
from tasks.analysis import AuditContext, Findings, analysis_stage
from tasks.artifacts import ArtifactStore
from tasks.caching import ATTRIBUTION
from tasks.model import ModelLocator, ModelRef, engine_model
from tasks.runtime import run_stage
from tasks.sample_files import image_files
from tasks.stages import SampleFile, StageOutput, load_samples, stage_task


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
    table = attributions_to_arrow(
        result, list(model.class_list), names, scores, crp_layer=_crp_layer(net, method_options)
    )
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


def _crp_layer(net: Any, method_options: dict[str, Any] | None) -> str | None:
    """The layer CRP attributed at (its ``layer`` option, else the last convolution)."""
    layer = ((method_options or {}).get("crp") or {}).get("layer")
    if layer:
        return str(layer)
    try:
        from leapcore.attribution.lrp import default_crp_layer

        return default_crp_layer(net.model)
    except Exception:  # no convolution or no zennit: CRP did not run either
        return None


@stage_task(
    "relmax_references", ATTRIBUTION, "RelMax: the user's images most relevant for each concept."
)
def relmax_references(
    model: ModelRef,
    locator: ModelLocator,
    config: EngineConfig,
    attributions: StageOutput,
    references: StageOutput,
    store: ArtifactStore,
    n: int = 4,
    method_options: dict[str, Any] | None = None,
    device: str | None = None,
) -> StageOutput:
    """The ``relmax`` table: reference images (from ``references``) of the CRP concepts found in
    ``attributions``, at CRP's layer and with its composite."""
    from leapcore.attribution.relmax import relmax_table
    from leapcore.errors import InputError

    table = store.get_table(attributions.refs["attributions"])
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    if "concept_ids" not in table.column_names or "leapcore.crp_layer" not in meta:
        raise InputError("RelMax shows reference images of CRP's concepts: add crp to the methods.")
    concepts = sorted({c for ids in table.column("concept_ids").to_pylist() if ids for c in ids})
    dev = pick_device(device)
    net, _ = engine_model(model, locator, config, dev)
    images, _, names = samples_from_arrow(store.get_table(references.refs["samples"]))
    composite = ((method_options or {}).get("crp") or {}).get("composite", "epsilon_plus_flat")
    began = time.perf_counter()
    out = relmax_table(
        net, images.to(dev), names, meta["leapcore.crp_layer"], concepts, n, composite=composite
    )
    seconds = time.perf_counter() - began
    summary = [
        {"concept": r["concept"], "rank": r["rank"], "image": r["image_name"], "score": r["score"]}
        for r in out.drop_columns(["picture"]).to_pylist()
    ]
    ref = store.put_table(out, "relmax")
    return StageOutput("relmax_references", {"relmax": ref}, seconds, summary)


def _summary(table: Any) -> list[dict[str, Any]]:
    return [
        {
            "image": row["image_name"],
            "class": row["target_name"],
            "method": row["method"],
            "deletion AUC": round(row["deletion_auc"], 3),
            "insertion AUC": round(row["insertion_auc"], 3),
            "sparseness": round(row["sparseness"], 3),
        }
        for row in table.drop_columns(
            [c for c in ("map", "picture") if c in table.column_names]
        ).to_pylist()
    ]


@stage_task(
    "attribute_prototypes",
    ATTRIBUTION,
    "Attribute each prototype's target (and the user's samples) pixel by pixel.",
)
def attribute_audit(
    model: ModelRef,
    locator: ModelLocator,
    config: EngineConfig,
    prototypes: list[StageOutput],
    samples: StageOutput | None,
    targets: list[list[int]],
    methods: list[str],
    store: ArtifactStore,
    method_options: dict[str, Any] | None = None,
    device: str | None = None,
) -> StageOutput:
    """The audit's ``attributions`` table (see ``leapcore.attribution.audit`` for what is explained)."""
    import torch

    from tasks.audit_io import merge_prototypes

    dev = pick_device(device)
    net, _ = engine_model(model, locator, config, dev)
    names = list(model.class_list)
    merged = merge_prototypes(
        [
            prototypes_from_arrow(
                store.get_table(p.refs["prototypes"]), store.get_table(p.refs["trajectories"])
            )
            for p in sorted(prototypes, key=lambda p: p.first_row)
        ]
    )
    explained = prototype_inputs(merged, names, config, dev)
    if samples is not None:
        images, _, sample_names = samples_from_arrow(store.get_table(samples.refs["samples"]))
        images = images.to(dev)
        with torch.no_grad():
            logits = net(images)
        explained = explained + sample_inputs(images, sample_names, logits, targets)
    began = time.perf_counter()
    table = explain_table(net, explained, methods, names, method_options)
    seconds = time.perf_counter() - began
    ref = store.put_table(table, "attributions")
    return StageOutput("attribute_prototypes", {"attributions": ref}, seconds, _summary(table))


def attribution_findings(tables: dict[str, Any]) -> Findings:
    """MLflow metrics of the audit's attributions: ``attribution.<method>.<score>`` (mean over the
    prototypes and samples) and ``.seconds``."""
    return Findings(metrics=attribution_metrics(tables["attributions"]))


@analysis_stage(
    "attribute_prototypes",
    aliases=("attribution", "attribute"),
    tables=("attributions",),
    findings=attribution_findings,
    order=50,
)
def attribute_prototypes(ctx: AuditContext) -> tuple[StageOutput | None, str]:
    """Attribution maps of the prototypes (and the user's samples) for the methods asked for.

    Skipped when no methods were asked for. The samples are read with the model's eval transform
    (``load_samples``, reused when an earlier stage already loaded them).
    """
    if not ctx.methods:
        return None, "Skipped"
    samples = ctx.outputs.get("load_samples")
    if samples is None and ctx.samples:
        files = [f if isinstance(f, SampleFile) else None for f in ctx.samples]
        if None in files:  # paths rather than the flow's checked, hashed files
            files = image_files([str(f) for f in ctx.samples])
        samples, _ = run_stage(
            load_samples,
            files=files,
            model=ctx.model,
            config=ctx.config,
            store=ctx.store,
        )
    return run_stage(
        attribute_audit,
        model=ctx.model,
        locator=ctx.locator,
        config=ctx.config,
        prototypes=ctx.outputs["optimise_prototypes"],
        samples=samples,
        targets=ctx.targets,
        methods=check_methods(ctx.methods),
        store=ctx.store,
        method_options=ctx.method_options or None,
        device=ctx.device,
    )
