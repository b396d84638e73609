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
from typing import Any

from prefect.runtime import flow_run as current_flow_run

from flows.audit_run import AuditCall, audit_stages, model_label, run_audit
from flows.lifecycle import RunSpec, end_status, finish, mlflow_run_scope
from flows.stage_plan import (
    ALIASES,
    CORE_STAGES,
    NEEDS,
    OUTPUT_STAGES,
    StagePlan,
    plan_stages,
    stage_aliases,
    stage_names,
)
from leapcore import stopping
from leapcore.config import EngineConfig, load_config
from leapcore.errors import InputError
from tasks import (
    ArtifactStore,
    AuditResult,
    fetch_model,
    locate_model,
    resolve_targets,
    run_stage,
    run_tags,
    secret_safe_flow,
    tracking_uri,
)
from tasks.export import check_output_dir
from tasks.mlflow_registry import DEFAULT_EXPERIMENT
from tasks.redaction import scrubbed_errors, secret_values
from tasks.sample_files import image_files
from tasks.transfer import check_reference_models

__all__ = [
    "ALIASES",
    "CORE_STAGES",
    "NEEDS",
    "OUTPUT_STAGES",
    "AuditCall",
    "StagePlan",
    "audit_model",
    "audit_stages",
    "check_inputs",
    "end_status",
    "plan_stages",
    "run_audit",
    "stage_aliases",
    "stage_names",
]


def check_inputs(
    model_uri: str,
    config: dict[str, Any] | str | EngineConfig | None = None,
    skip: list[str] | None = None,
    artifact_store: str | None = None,
    model_options: dict[str, Any] | None = None,
    task_runner: Any = "threads",
    output_dir: str | None = None,
    samples: list[str] | str | None = None,
    methods: list[str] | str | None = None,
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
        if samples:
            image_files(samples)
        if methods:
            _methods(methods)
    return cfg, plan, store, locator


def _methods(methods: list[str] | str | None) -> list[str]:
    """The attribution methods' registry names (``tasks.attribution.check_methods``)."""
    if not methods:
        return []
    from tasks.attribution import check_methods

    return check_methods(methods)


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
    samples: list[str] | str | None = None,
    methods: list[str] | str | None = None,
    method_options: dict[str, Any] | None = None,
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
        samples: image files or folders of the user's images (any class), for the analysis stages
            that read them (the spurious-feature scan, attributions).
        methods: attribution methods (``["ig", "lrp"]`` or ``"ig,lrp"``) for the prototypes and
            samples (stage ``attribute_prototypes``); none by default.
        method_options: options of ``leapcore.attribution.attribute`` (per method under its name).

    Returns:
        An :class:`~tasks.runtime.AuditResult` (stage outcomes, metrics, where everything went).

    Raises:
        Whatever a stage raised, with secrets removed from its text. The MLflow run is then FAILED.
    """
    began = time.perf_counter()
    stopping.clear()  # a stop asked of an earlier run in this process is not this run's
    cfg, plan, store, locator = check_inputs(
        model_uri,
        config,
        skip,
        artifact_store,
        model_options,
        task_runner,
        output_dir,
        samples,
        methods,
    )
    secrets = secret_values(cfg, model_uri, artifact_store, model_options)
    with scrubbed_errors(secrets):
        registry = dict(locator.identity.registry) if locator.identity else {}
        label = model_label(registry, locator.identity.uri if locator.identity else model_uri)
        flow_run_id = str(current_flow_run.id)
        runner = _task_runner(task_runner)
        # Everything the user typed is checked before the MLflow run opens, so a typo leaves no
        # FAILED run and does not touch the version's audit tags. The classes need the model's class
        # list: fetch it first (cached in the store, so a rerun reads it back).
        fetched = run_stage(fetch_model, locator=locator, store=store)
        resolve_targets(target_classes, fetched[0].class_list)
        if cfg.reference_models:  # a reference of another width is refused before the run opens
            check_reference_models(cfg, fetched[0], store, model_options)
        spec = RunSpec(
            uri=tracking_uri(),
            experiment=experiment or DEFAULT_EXPERIMENT,
            name=f"audit {label} {flow_run_id[:8]}",
            tags=run_tags(None, model_uri, registry, flow_run_id),
            registry=registry,
            secrets=secrets,
            enabled=plan.on("publish_mlflow"),
        )
        with mlflow_run_scope(spec) as mlflow_run:
            call = AuditCall(
                locator=locator,
                target_classes=target_classes,
                config=cfg,
                plan=plan,
                store=store,
                device=device,
                class_chunk_size=class_chunk_size,
                output_dir=output_dir,
                mlflow_run=mlflow_run,
                wandb_project=wandb_project,
                run_name=spec.name,
                fetched=fetched,
                samples=image_files(samples) if samples else [],
                methods=_methods(methods),
                method_options=dict(method_options or {}),
            )
            if runner is None:
                result = run_audit(call)
            else:
                result = audit_stages.with_options(task_runner=runner)(call)
        return finish(result, spec, mlflow_run, flow_run_id, began, _summary(result))


def _summary(result: AuditResult) -> tuple[str, list[str], list[str]]:
    """The audit's Markdown summary: heading, then the mean target probability after the stages."""
    notes = []
    if result.metrics.get("target_prob/mean") is not None:
        notes.append(f"\nMean target probability: **{result.metrics['target_prob/mean']:.3f}**")
    return "audit", [f"# Audit of `{result.model_uri}`", ""], notes
