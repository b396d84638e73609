"""``audit_model``: the whole audit of one model, from its URI to MLflow, W&B and an HTML report.

Stages (each a task in :mod:`tasks`): fetch model -> generate baseline -> find learning rate ->
optimise prototypes (per chunk of classes) -> score entanglement and isolate features (per chunk) ->
render report -> export results, publish to MLflow, publish to W&B. Stages are cached by content, so
a re-run recomputes only what its inputs changed; any stage can be switched off with ``skip``.

Called from Python (``audit_model("models:/my-model@champion", [1, 2], {"max_steps": 200})``), from
the CLI (``leap audit``) or as a Prefect deployment (``deployments/prefect.yaml``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.runtime import flow_run as current_flow_run

from leapcore import stopping
from leapcore.config import EngineConfig, load_config
from leapcore.errors import InputError
from tasks import (
    ArtifactStore,
    AuditResult,
    class_chunks,
    close_audit_run,
    export_results,
    fetch_model,
    find_learning_rate,
    generate_baseline,
    isolate_features,
    locate_model,
    markdown_summary,
    open_audit_run,
    optimise_prototypes,
    publish_mlflow,
    publish_wandb,
    render_report,
    resolve_targets,
    run_stage,
    run_stages,
    run_tags,
    score_entanglement,
    secret_safe_flow,
    summarise,
    tracking_uri,
)
from tasks.export import check_output_dir
from tasks.mlflow_registry import DEFAULT_EXPERIMENT
from tasks.redaction import clean_text, scrubbed_errors, secret_values
from tasks.report import stamp_report
from tasks.runtime import SKIPPED, collect_publications, mlflow_link, stage_finished
from tasks.wandb_publish import new_run_id, run_label

# Stage names, in order, and the short names ``skip`` also accepts.
STAGES = (
    "fetch_model",
    "generate_baseline",
    "find_learning_rate",
    "optimise_prototypes",
    "score_entanglement",
    "isolate_features",
    "render_report",
    "export_results",
    "publish_mlflow",
    "publish_wandb",
)
ALIASES = {
    "baseline": "generate_baseline",
    "lr": "find_learning_rate",
    "lr_finding": "find_learning_rate",
    "prototypes": "optimise_prototypes",
    "entanglement": "score_entanglement",
    "isolation": "isolate_features",
    "report": "render_report",
    "export": "export_results",
    "mlflow": "publish_mlflow",
    "wandb": "publish_wandb",
}
# Switching a stage off switches off what needs its output.
NEEDS = {
    "find_learning_rate": "generate_baseline",
    "optimise_prototypes": "generate_baseline",
    "score_entanglement": "optimise_prototypes",
    "isolate_features": "optimise_prototypes",
}


@dataclass(frozen=True)
class StagePlan:
    """Which stages run; see :func:`plan_stages`."""

    off: frozenset[str]

    def on(self, stage: str) -> bool:
        return stage not in self.off


def plan_stages(skip: list[str] | str | None, config: EngineConfig) -> StagePlan:
    """The stages that run, from ``skip`` (stage or short names) and the config.

    ``config.isolation = False`` switches isolation off; switching off a stage switches off the ones
    that need it (the baseline feeds the learning-rate finder and the prototypes; the prototypes feed
    entanglement and isolation). Without the learning-rate finder, prototypes use ``config.lr``.
    ``render_report`` off leaves out the HTML page only: tables and images are still built.

    Raises:
        InputError: an unknown stage name, or ``fetch_model`` (every audit needs the model).
    """
    names = [skip] if isinstance(skip, str) else list(skip or [])
    off: set[str] = set()
    for name in names:
        stage = ALIASES.get(str(name).strip().lower(), str(name).strip().lower())
        if stage not in STAGES:
            known = ", ".join(list(STAGES) + sorted(ALIASES))
            raise InputError(f"unknown stage {name!r} in skip; stages: {known}.")
        if stage == "fetch_model":
            raise InputError("fetch_model cannot be skipped: every stage needs the model.")
        off.add(stage)
    if not config.isolation:
        off.add("isolate_features")
    changed = True
    while changed:
        changed = False
        for stage, needed in NEEDS.items():
            if needed in off and stage not in off:
                off.add(stage)
                changed = True
    return StagePlan(frozenset(off))


def _model_label(registry: dict[str, str], uri: str) -> str:
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


def _published_params(
    config: EngineConfig, model_uri: str, targets: list[list[int]], extra: dict[str, Any]
) -> dict[str, Any]:
    params = config.secret_free()
    params.pop("samples", None)
    params["audit"] = {"model_uri": model_uri, "targets": targets, **extra}
    return params


def _run_audit(
    locator: Any,
    target_classes: Any,
    config: EngineConfig,
    plan: StagePlan,
    store: ArtifactStore,
    device: str | None,
    class_chunk_size: int | None,
    output_dir: str | None,
    mlflow_run: dict[str, Any] | None,
    wandb_project: str | None,
    run_name: str,
    flow_name: str,
    fetched: tuple[Any, str] | None = None,
) -> AuditResult:
    """Wire the stage tasks; runs inside ``audit_model`` or its ``audit-stages`` subflow.

    ``fetched`` is the ``fetch_model`` output and state when the caller already fetched the model
    (``audit_model`` does, to check the classes before the MLflow run opens).
    """
    logger = get_run_logger()
    began = time.perf_counter()
    states: dict[str, str] = {}
    outputs: dict[str, Any] = {}

    if fetched is None:
        fetched = run_stage(fetch_model, locator=locator, store=store)
    model, states["fetch_model"] = fetched
    outputs["fetch_model"] = model
    targets = resolve_targets(target_classes, model.class_list)
    names = ["+".join(model.class_list[c] for c in t) for t in targets]
    logger.info("auditing %s (%s) for %s", model.uri, model.digest[:12], ", ".join(names))
    common = {
        "model": model,
        "locator": locator,
        "config": config,
        "store": store,
        "device": device,
    }

    baseline = learning_rate = entanglement = None
    prototypes: list[Any] = []
    isolations: list[Any] = []
    if plan.on("generate_baseline"):
        rows = len(targets) * config.prototypes_per_class
        baseline, states["generate_baseline"] = run_stage(generate_baseline, rows=rows, **common)
        summarise(flow_name, "generate_baseline", [baseline], states["generate_baseline"])
    if plan.on("find_learning_rate"):
        learning_rate, states["find_learning_rate"] = run_stage(
            find_learning_rate, targets=targets, baseline=baseline, **common
        )
        summarise(flow_name, "find_learning_rate", [learning_rate], states["find_learning_rate"])
    if class_chunk_size is None:  # on Dask: chunks sized to the workers' memory (flows/scale.py)
        from flows.scale import planned_chunk_size

        class_chunk_size = planned_chunk_size(model, locator, config, len(targets), device)
    if class_chunk_size is None:
        class_chunk_size = _planned_chunk_size(model, locator, config, len(targets), device)
    chunks = class_chunks(targets, class_chunk_size)
    if plan.on("optimise_prototypes"):
        prototypes, states["optimise_prototypes"] = run_stages(
            optimise_prototypes,
            [
                {"chunk": c, "baseline": baseline, "learning_rate": learning_rate, **common}
                for c in chunks
            ],
        )
        summarise(flow_name, "optimise_prototypes", prototypes, states["optimise_prototypes"])
    if plan.on("score_entanglement"):
        entanglement, states["score_entanglement"] = run_stage(
            score_entanglement,
            model=model,
            config=config,
            baseline=baseline,
            prototypes=prototypes,
            store=store,
        )
        summarise(flow_name, "score_entanglement", [entanglement], states["score_entanglement"])
    if plan.on("isolate_features"):
        isolations, states["isolate_features"] = run_stages(
            isolate_features,
            [{"chunk": c, "prototypes": p, **common} for c, p in zip(chunks, prototypes)],
        )
        summarise(flow_name, "isolate_features", isolations, states["isolate_features"])
    report, states["render_report"] = run_stage(
        render_report,
        model=model,
        config=config,
        store=store,
        baseline=baseline,
        learning_rate=learning_rate,
        prototypes=prototypes or None,
        entanglement=entanglement,
        isolations=isolations or None,
        title=f"Audit of {model.uri}",
        html=plan.on("render_report"),
    )
    wandb_run_id = new_run_id() if plan.on("publish_wandb") else None
    wandb_label = run_label(config, wandb_project, wandb_run_id) if wandb_run_id else ""
    report = stamp_report(report, store, model, _provenance(mlflow_run, wandb_label))
    for stage in STAGES:
        if stage not in states and not plan.on(stage):
            states[stage] = SKIPPED
            stage_finished(stage, SKIPPED)
    outputs.update(
        generate_baseline=baseline,
        find_learning_rate=learning_rate,
        optimise_prototypes=prototypes,
        score_entanglement=entanglement,
        isolate_features=isolations,
        render_report=report,
    )

    out_dir = (
        output_dir
        or config.output_dir
        or str(Path("leap_results") / (config.project_name or model.name) / model.name)
    )
    result = AuditResult(
        flow_run_id=None,
        model_uri=model.uri,
        model_digest=model.digest,
        registry=dict(model.registry),
        targets=targets,
        target_names=names,
        stages=states,
        outputs=outputs,
        output_dir=str(Path(out_dir).resolve()),
    )
    stage_seconds = {
        f"seconds/{stage}": float(sum(o.seconds for o in out))
        if isinstance(out, list)
        else float(out.seconds)
        for stage, out in outputs.items()
        if out and hasattr(out if not isinstance(out, list) else out[0], "seconds")
    }
    metrics = {**report.metrics, **stage_seconds}
    result.metrics = metrics
    params = _published_params(
        config,
        model.uri,
        targets,
        {"class_chunk_size": class_chunk_size, "skip": sorted(plan.off), "device": device},
    )
    pending = {}
    if plan.on("export_results"):
        pending["export_results"] = export_results.submit(report, store, out_dir)
    if mlflow_run is not None:
        tags = {f"leapcore.stage.{s}": st for s, st in states.items()}
        pending["publish_mlflow"] = publish_mlflow.submit(
            mlflow_run["uri"],
            mlflow_run["run_id"],
            model,
            params,
            stage_seconds,
            report,
            store,
            tags,
        )
    if plan.on("publish_wandb"):
        pending["publish_wandb"] = publish_wandb.submit(
            model,
            config,
            params,
            report,
            store,
            baseline=baseline,
            prototypes=prototypes or None,
            entanglement=entanglement,
            isolations=isolations or None,
            project=wandb_project,
            run_name=run_name,
            run_id=wandb_run_id,
            tags=["leapcore", "audit"],
            mlflow=mlflow_link(mlflow_run["uri"], mlflow_run["run_id"]) if mlflow_run else None,
        )
    collect_publications(
        pending, states, result, (mlflow_run["uri"], mlflow_run["run_id"]) if mlflow_run else None
    )
    result.seconds = time.perf_counter() - began
    return result


@secret_safe_flow(
    name="audit-stages",
    description="The stages of one audit, on the task runner audit_model was given.",
    validate_parameters=False,
)
def audit_stages(
    locator: Any,
    target_classes: Any,
    config: EngineConfig,
    plan: StagePlan,
    store: ArtifactStore,
    device: str | None,
    class_chunk_size: int | None,
    output_dir: str | None,
    mlflow_run: dict[str, Any] | None,
    wandb_project: str | None,
    run_name: str,
    flow_name: str,
    fetched: tuple[Any, str] | None = None,
) -> AuditResult:
    """Run the stages of an audit in a subflow (used when ``audit_model`` gets another task runner)."""
    result = _run_audit(
        locator,
        target_classes,
        config,
        plan,
        store,
        device,
        class_chunk_size,
        output_dir,
        mlflow_run,
        wandb_project,
        run_name,
        flow_name,
        fetched,
    )
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


def check_inputs(
    model_uri: str,
    config: dict[str, Any] | str | EngineConfig | None = None,
    skip: list[str] | None = None,
    artifact_store: str | None = None,
    model_options: dict[str, Any] | None = None,
    task_runner: Any = "threads",
    output_dir: str | None = None,
) -> tuple[EngineConfig, StagePlan, ArtifactStore, Any]:
    """Check what ``audit_model`` gets before anything starts: config, skip, store, model URI.

    Needs no Prefect server and opens no MLflow run (a registry URI is looked up in the registry),
    so the CLI calls it before the flow; ``audit_model`` calls it again. The classes are checked
    against the model's class list once the model is fetched, still before the run opens.

    Returns:
        The config, the stage plan, the artifact store and the model's locator.

    Raises:
        InputError, ModelSourceError: what is wrong, with secrets removed.
    """
    cfg = load_config(config)
    with scrubbed_errors(secret_values(cfg, model_uri, artifact_store, model_options)):
        plan = plan_stages(skip, cfg)
        _task_runner(task_runner)
        store = ArtifactStore(artifact_store)
        locator = locate_model(model_uri, model_options, tracking_uri())
        if plan.on("export_results") and (output_dir or cfg.output_dir):
            check_output_dir(output_dir or cfg.output_dir)
    return cfg, plan, store, locator


def _task_runner(spec: Any) -> Any:
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("threads", "thread")):
        return None
    try:
        from flows.scale import make_task_runner
    except ImportError:
        raise InputError(
            f"task_runner {spec!r} needs flows/scale.py (make_task_runner); pass 'threads' or a "
            "Prefect task runner."
        ) from None
    return make_task_runner(spec)


@secret_safe_flow(
    name="audit-model",
    description="Audit an image classifier: prototypes, entanglement, feature isolation; results "
    "in MLflow, W&B and an HTML report.",
    validate_parameters=False,
)
def audit_model(
    model_uri: str,
    target_classes: list[Any] | None = None,
    config: dict[str, Any] | str | EngineConfig | None = None,
    skip: list[str] | None = None,
    class_chunk_size: int | None = None,
    task_runner: Any = "threads",
    artifact_store: str | None = None,
    experiment: str | None = None,
    wandb_project: str | None = None,
    model_options: dict[str, Any] | None = None,
    device: str | None = None,
    output_dir: str | None = None,
) -> AuditResult:
    """Audit ``model_uri``: prototypes, entanglement and isolations, registered in MLflow and W&B.

    Args:
        model_uri: ``models:/name/version``, ``models:/name@alias``, ``runs:/<id>/<path>``, a local
            model file or folder, or a zoo name (``efficientnet_lite0``).
        target_classes: classes to audit: indices, names, or hybrids (``[1, 292]`` / ``"a+b"``);
            default the engine's (class 0).
        config: engine options (a dict, a JSON file path or an ``EngineConfig``); see docs/config.md.
        skip: stages to switch off (see :func:`plan_stages`), e.g. ``["wandb", "isolation"]``.
        class_chunk_size: targets per prototype/isolation task; None puts all in one batch.
        task_runner: ``"threads"`` (default), ``"dask"``, a Dask address, or a Prefect task runner;
            other runners run the stages in an ``audit-stages`` subflow.
        artifact_store: folder or pyarrow URI for stage artifacts (default ``LEAP_ARTIFACT_STORE``
            or ``.leap/artifacts``).
        experiment: MLflow experiment (default ``leapcore-audits``).
        wandb_project: W&B project (default the config's ``project_name`` or ``leapcore``).
        model_options: options for ``leapcore.sources.load_model`` (``class_list``, ``trusted``, ...).
        device: ``cpu``, ``cuda``, ...; default the best available.
        output_dir: where the report, tables and PNGs are written (default the config's
            ``output_dir`` or ``leap_results/<project or model name>/<model name>``); the folder
            is replaced as a whole by each audit (``tasks.export``).

    Returns:
        An :class:`~tasks.runtime.AuditResult` (stage outcomes, metrics, where everything went).

    Raises:
        Whatever a stage raised, with secrets removed from its text. The MLflow run is then FAILED.
    """
    began = time.perf_counter()
    stopping.clear()  # a stop asked of an earlier run in this process is not this run's
    cfg, plan, store, locator = check_inputs(
        model_uri, config, skip, artifact_store, model_options, task_runner, output_dir
    )
    secrets = secret_values(cfg, model_uri, artifact_store, model_options)
    with scrubbed_errors(secrets):
        mlflow_uri = tracking_uri()
        registry = dict(locator.identity.registry) if locator.identity else {}
        label = _model_label(registry, locator.identity.uri if locator.identity else model_uri)
        flow_run_id = str(current_flow_run.id)
        run_name = f"audit {label} {flow_run_id[:8]}"
        runner = _task_runner(task_runner)
        # Everything the user typed is checked before the MLflow run opens, so a typo leaves no
        # FAILED run and does not touch the version's audit tags. The classes need the model's class
        # list: fetch it first (cached in the store, so a rerun reads it back).
        fetched = run_stage(fetch_model, locator=locator, store=store)
        resolve_targets(target_classes, fetched[0].class_list)
        mlflow_run = None
        exp_name = experiment or DEFAULT_EXPERIMENT
        if plan.on("publish_mlflow"):
            tags = run_tags(None, model_uri, registry, flow_run_id)
            run_id = open_audit_run(mlflow_uri, exp_name, run_name, tags, registry)
            mlflow_run = {"uri": mlflow_uri, "run_id": run_id}
        arguments = {
            "locator": locator,
            "target_classes": target_classes,
            "config": cfg,
            "plan": plan,
            "store": store,
            "device": device,
            "class_chunk_size": class_chunk_size,
            "output_dir": output_dir,
            "mlflow_run": mlflow_run,
            "wandb_project": wandb_project,
            "run_name": run_name,
            "flow_name": "audit",
            "fetched": fetched,
        }
        try:
            if runner is None:
                result = _run_audit(**arguments)
                result.stages_flow_run_id = flow_run_id
            else:
                result = audit_stages.with_options(task_runner=runner)(**arguments)
        except BaseException as err:
            if mlflow_run is not None:
                close_audit_run(
                    mlflow_uri,
                    mlflow_run["run_id"],
                    end_status(err),
                    registry,
                    error=clean_text(f"{type(err).__name__}: {err}", secrets),
                )
            raise
        if mlflow_run is not None:
            close_audit_run(mlflow_uri, mlflow_run["run_id"], "FINISHED", registry)
            result.mlflow_run_id = mlflow_run["run_id"]
            result.mlflow_tracking_uri = clean_text(mlflow_uri, secrets)
            result.mlflow_experiment = exp_name
        result.flow_run_id = flow_run_id
        result.seconds = time.perf_counter() - began
        markdown_summary("audit", _summary_lines(result))
        for line in result.where_to_look():
            get_run_logger().info(line)
        return result


def end_status(err: BaseException) -> str:
    """``KILLED`` for a signal (SIGTERM, Ctrl-C), which also stops the stages still running; else
    ``FAILED``."""
    from prefect.exceptions import TerminationSignal

    if isinstance(err, (KeyboardInterrupt, TerminationSignal)) or stopping.requested():
        stopping.request_stop(f"stopped by {type(err).__name__}")
        return "KILLED"
    return "FAILED"


def _summary_lines(result: AuditResult) -> list[str]:
    lines = [f"# Audit of `{result.model_uri}`", ""]
    lines += [f"- **{stage}**: {state}" for stage, state in result.stages.items()]
    if result.metrics.get("target_prob/mean") is not None:
        lines.append(f"\nMean target probability: **{result.metrics['target_prob/mean']:.3f}**")
    lines.append("")
    lines += [f"    {line}" for line in result.where_to_look()]
    return lines
