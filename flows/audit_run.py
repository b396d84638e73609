"""The stages of one audit, wired: core stages, analysis stages, report, export and publishing.

``flows.audit.audit_model`` checks the inputs, opens the MLflow run and hands an :class:`AuditCall`
to :func:`run_audit` (or to the ``audit-stages`` subflow on another task runner).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.runtime import flow_run as current_flow_run

from flows.lifecycle import published_params
from flows.stage_plan import CORE_STAGES, StagePlan, stage_names
from leapcore.config import EngineConfig
from tasks import (
    ArtifactStore,
    AuditResult,
    class_chunks,
    export_results,
    fetch_model,
    find_learning_rate,
    generate_baseline,
    isolate_features,
    optimise_prototypes,
    publish_mlflow,
    publish_wandb,
    render_report,
    resolve_targets,
    run_stage,
    run_stages,
    score_entanglement,
    secret_safe_flow,
    summarise,
)
from tasks.analysis import AuditContext, Findings, load_stages, stage_findings
from tasks.artifacts import ArtifactRef
from tasks.report import ReportOutput, stamp_report
from tasks.runtime import SKIPPED, collect_publications, mlflow_link, stage_finished
from tasks.stages import SampleFile
from tasks.wandb_publish import new_run_id, run_label


def model_label(registry: dict[str, str], uri: str) -> str:
    if registry.get("name"):
        version = registry.get("version")
        return f"{registry['name']} v{version}" if version else registry["name"]
    return Path(uri.rstrip("/")).stem or uri


def _provenance(mlflow_run: dict[str, Any] | None, wandb_run: str = "") -> dict[str, str]:
    """This run's ids for the report's provenance block (the W&B run is named before it starts)."""
    flow_run = getattr(current_flow_run, "root_flow_run_id", None) or current_flow_run.id
    facts = {"prefect_flow_run": str(flow_run) if flow_run else ""}
    if mlflow_run is not None:
        facts["mlflow_run"] = str(mlflow_run["run_id"])
    if wandb_run:
        facts["wandb_run"] = wandb_run
    return facts


@dataclass
class AuditCall:
    """One audit's checked inputs, as its stages get them.

    Attributes:
        locator: how to load the model (``tasks.model.locate_model``).
        target_classes: the classes the user asked for (resolved against the model's class list).
        config: the engine options; ``plan`` the stages that run; ``store`` the artifact store.
        device: ``cpu``, ``cuda``, ... or None for the best available.
        class_chunk_size: targets per prototype/isolation task (None: planned, see ``flows.scale``).
        output_dir: where ``export_results`` writes (None: the config's or the default).
        mlflow_run: ``{"uri", "run_id"}`` of the audit's open MLflow run, None without MLflow.
        wandb_project: the W&B project; ``run_name`` the runs' name; ``flow_name`` for artifact keys.
        fetched: ``fetch_model``'s output and state when the caller already fetched the model.
        samples: the user's images (``--samples``); ``methods`` / ``method_options`` the
            attribution methods asked for (``--methods``).
    """

    locator: Any
    target_classes: Any
    config: EngineConfig
    plan: StagePlan
    store: ArtifactStore
    device: str | None = None
    class_chunk_size: int | None = None
    output_dir: str | None = None
    mlflow_run: dict[str, Any] | None = None
    wandb_project: str | None = None
    run_name: str = ""
    flow_name: str = "audit"
    fetched: tuple[Any, str] | None = None
    wandb_run_id: str | None = None
    samples: list[SampleFile] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)
    method_options: dict[str, Any] = field(default_factory=dict)


def run_audit(call: AuditCall) -> AuditResult:
    """Wire the stage tasks; runs inside ``audit_model`` or its ``audit-stages`` subflow."""
    began = time.perf_counter()
    states: dict[str, str] = {}
    ctx = _start(call, states)
    _core_stages(call, ctx, states)
    extras, findings = _analysis_stages(call, ctx, states)
    report = _report(call, ctx, states, extras, findings)
    result = _result(call, ctx, states, report)
    _publish(call, ctx, states, report, result, findings)
    _emit(ctx, findings)
    result.seconds = time.perf_counter() - began
    return result


def _start(call: AuditCall, states: dict[str, str]) -> AuditContext:
    """Fetch the model (unless the caller did), resolve the targets and cut them into chunks."""
    fetched = call.fetched or run_stage(fetch_model, locator=call.locator, store=call.store)
    model, states["fetch_model"] = fetched
    targets = resolve_targets(call.target_classes, model.class_list)
    names = ["+".join(model.class_list[c] for c in t) for t in targets]
    get_run_logger().info("auditing %s (%s) for %s", model.uri, model.digest[:12], ", ".join(names))
    size = call.class_chunk_size
    if size is None:  # on Dask: chunks sized to the workers' memory (flows/scale.py)
        size = _planned_chunk_size(model, call.locator, call.config, len(targets), call.device)
    call.class_chunk_size = size
    return AuditContext(
        model=model,
        locator=call.locator,
        config=call.config,
        store=call.store,
        device=call.device,
        targets=targets,
        names=names,
        chunks=class_chunks(targets, size),
        outputs={"fetch_model": model},
        samples=list(call.samples),
        methods=list(call.methods),
        method_options=dict(call.method_options),
        mlflow=dict(call.mlflow_run) if call.mlflow_run else None,
        flow_name=call.flow_name,
    )


def _core_stages(call: AuditCall, ctx: AuditContext, states: dict[str, str]) -> None:
    """Baseline, learning rate, prototypes (per chunk), entanglement, isolations (per chunk)."""
    plan, out = call.plan, ctx.outputs
    common = {
        "model": ctx.model,
        "locator": ctx.locator,
        "config": ctx.config,
        "store": ctx.store,
        "device": ctx.device,
    }

    def record(stage: str, value: Any, state: str) -> None:
        out[stage], states[stage] = value, state
        summarise(ctx.flow_name, stage, value if isinstance(value, list) else [value], state)

    if plan.on("generate_baseline"):
        rows = len(ctx.targets) * ctx.config.prototypes_per_class
        record("generate_baseline", *run_stage(generate_baseline, rows=rows, **common))
    baseline = out.get("generate_baseline")
    if plan.on("find_learning_rate"):
        record(
            "find_learning_rate",
            *run_stage(find_learning_rate, targets=ctx.targets, baseline=baseline, **common),
        )
    if plan.on("optimise_prototypes"):
        calls = [
            {"chunk": c, "baseline": baseline, "learning_rate": out.get("find_learning_rate")}
            for c in ctx.chunks
        ]
        record(
            "optimise_prototypes",
            *run_stages(optimise_prototypes, [{**c, **common} for c in calls]),
        )
    prototypes = out.get("optimise_prototypes") or []
    if plan.on("score_entanglement"):
        record(
            "score_entanglement",
            *run_stage(
                score_entanglement,
                model=ctx.model,
                config=ctx.config,
                baseline=baseline,
                prototypes=prototypes,
                store=ctx.store,
                locator=ctx.locator,
                device=ctx.device,
            ),
        )
    if plan.on("isolate_features"):
        calls = [{"chunk": c, "prototypes": p, **common} for c, p in zip(ctx.chunks, prototypes)]
        record("isolate_features", *run_stages(isolate_features, calls))


def _analysis_stages(
    call: AuditCall, ctx: AuditContext, states: dict[str, str]
) -> tuple[dict[str, ArtifactRef], Findings]:
    """Run the registered analysis stages (``tasks.analysis``) in order; their tables by role and
    their findings together."""
    extras: dict[str, ArtifactRef] = {}
    findings = Findings()
    for stage in load_stages():
        if not call.plan.on(stage.name):
            continue
        output, states[stage.name] = stage.run(ctx)
        if output is None:  # a stage that ran its task was announced by run_stage
            stage_finished(stage.name, states[stage.name])
            continue
        ctx.outputs[stage.name] = output
        summarise(ctx.flow_name, stage.name, [output], states[stage.name])
        tables = {role: output.refs[role] for role in stage.tables if role in output.refs}
        extras.update(tables)
        loaded = {role: ctx.store.get_table(ref) for role, ref in tables.items()}
        findings = findings.merge(stage_findings(stage, loaded))
    return extras, findings


def _report(
    call: AuditCall,
    ctx: AuditContext,
    states: dict[str, str],
    extras: dict[str, ArtifactRef],
    findings: Findings,
) -> ReportOutput:
    """The report (cached), stamped with this run's ids, its metrics with the analysis findings'."""
    out = ctx.outputs
    report, states["render_report"] = run_stage(
        render_report,
        model=ctx.model,
        config=ctx.config,
        store=ctx.store,
        baseline=out.get("generate_baseline"),
        learning_rate=out.get("find_learning_rate"),
        prototypes=out.get("optimise_prototypes") or None,
        entanglement=out.get("score_entanglement"),
        isolations=out.get("isolate_features") or None,
        title=f"Audit of {ctx.model.uri}",
        html=call.plan.on("render_report"),
        extras=extras or None,
        stage_seconds={
            stage.name: round(out[stage.name].seconds, 3)
            for stage in load_stages()
            if getattr(out.get(stage.name), "seconds", None) is not None
        }
        or None,
    )
    wandb_run_id = new_run_id() if call.plan.on("publish_wandb") else None
    call.wandb_run_id = wandb_run_id
    label = run_label(ctx.config, call.wandb_project, wandb_run_id) if wandb_run_id else ""
    report = stamp_report(report, ctx.store, ctx.model, _provenance(call.mlflow_run, label))
    report = replace(report, metrics={**report.metrics, **findings.metrics})
    for stage in stage_names():
        if stage not in states and not call.plan.on(stage):
            states[stage] = SKIPPED
            stage_finished(stage, SKIPPED)
    out["render_report"] = report
    return report


def _result(
    call: AuditCall, ctx: AuditContext, states: dict[str, str], report: ReportOutput
) -> AuditResult:
    """The audit's :class:`AuditResult` before publishing: stages, outputs, metrics, stage times."""
    config, model = ctx.config, ctx.model
    out_dir = (
        call.output_dir
        or config.output_dir
        or str(Path("leap_results") / (config.project_name or model.name) / model.name)
    )
    outputs = {stage: ctx.outputs.get(stage) for stage in stage_names() if stage in ctx.outputs}
    for stage in CORE_STAGES[1:] + ("render_report",):
        outputs.setdefault(
            stage, [] if stage in ("optimise_prototypes", "isolate_features") else None
        )
    result = AuditResult(
        flow_run_id=None,
        model_uri=model.uri,
        model_digest=model.digest,
        registry=dict(model.registry),
        targets=ctx.targets,
        target_names=ctx.names,
        stages=states,
        outputs=outputs,
        output_dir=str(Path(out_dir).resolve()),
    )
    result.metrics = {**report.metrics, **_stage_seconds(outputs)}
    return result


def _stage_seconds(outputs: dict[str, Any]) -> dict[str, float]:
    """``seconds/<stage>``: each stage's compute time (chunks summed; cached stages keep theirs)."""
    seconds = {}
    for stage, out in outputs.items():
        items = out if isinstance(out, list) else [out]
        if items and all(hasattr(o, "seconds") for o in items):
            seconds[f"seconds/{stage}"] = float(sum(o.seconds for o in items))
    return seconds


def _publish(
    call: AuditCall,
    ctx: AuditContext,
    states: dict[str, str],
    report: ReportOutput,
    result: AuditResult,
    findings: Findings,
) -> None:
    """Export the results and publish them to MLflow and W&B, side by side."""
    params = published_params(
        ctx.config,
        "audit",
        {
            "model_uri": ctx.model.uri,
            "targets": ctx.targets,
            "class_chunk_size": call.class_chunk_size,
            "skip": sorted(call.plan.off),
            "device": ctx.device,
        },
    )
    out, run = ctx.outputs, call.mlflow_run
    pending = {}
    if call.plan.on("export_results"):
        pending["export_results"] = export_results.submit(report, ctx.store, result.output_dir)
    if run is not None:
        tags = {f"leapcore.stage.{s}": st for s, st in states.items()} | findings.run_tags
        pending["publish_mlflow"] = publish_mlflow.submit(
            run["uri"],
            run["run_id"],
            ctx.model,
            params,
            _stage_seconds(result.outputs),
            report,
            ctx.store,
            tags,
            version_tags=findings.version_tags,
            version_note=findings.version_note,
        )
    if call.plan.on("publish_wandb"):
        pending["publish_wandb"] = publish_wandb.submit(
            ctx.model,
            ctx.config,
            params,
            report,
            ctx.store,
            baseline=out.get("generate_baseline"),
            prototypes=out.get("optimise_prototypes") or None,
            entanglement=out.get("score_entanglement"),
            isolations=out.get("isolate_features") or None,
            project=call.wandb_project,
            run_name=call.run_name,
            run_id=call.wandb_run_id,
            tags=["leapcore", "audit"],
            mlflow=mlflow_link(run["uri"], run["run_id"]) if run else None,
        )
    collect_publications(pending, states, result, (run["uri"], run["run_id"]) if run else None)


def _emit(ctx: AuditContext, findings: Findings) -> None:
    """The analysis stages' Prefect events, about the audited model (automations react to them)."""
    if not findings.events:
        return
    from prefect.events import emit_event

    model = ctx.model
    resource = {
        "prefect.resource.id": f"leapcore.model.{model.registry.get('name') or model.name}",
        "prefect.resource.name": model.registry.get("name") or model.name,
        "leapcore.model_uri": model.uri,
        "leapcore.model_digest": model.digest,
    }
    if model.registry.get("version"):
        resource["leapcore.model_version"] = str(model.registry["version"])
    for event, payload in findings.events:
        emit_event(event=event, resource=resource, payload=payload)


@secret_safe_flow(
    name="audit-stages",
    description="The stages of one audit, on the task runner audit_model was given.",
    validate_parameters=False,
)
def audit_stages(call: AuditCall) -> AuditResult:
    """Run the stages of an audit in a subflow (used when ``audit_model`` gets another task runner)."""
    result = run_audit(call)
    result.stages_flow_run_id = str(current_flow_run.id)
    return result


def _planned_chunk_size(
    model: Any, locator: Any, config: EngineConfig, num_targets: int, device: str | None
) -> int | None:
    """Classes per chunk for the current task runner (``flows.scale``: one chunk on threads, sized
    from a worker's memory limit on Dask), or None when that module is not there."""
    try:
        from flows.scale import planned_chunk_size
    except ImportError:
        return None
    return planned_chunk_size(model, locator, config, num_targets, device)
