"""``explain_samples``: feature isolation for a batch of the user's images (files or a folder).

Stages: fetch model -> load samples -> isolate samples (``engine.run_samples``) -> render report ->
export results, publish to MLflow, publish to W&B. Cached by content like ``audit_model``: the
images are keyed by the hash of their bytes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.runtime import flow_run as current_flow_run

from flows.audit import end_status
from leapcore import stopping
from leapcore.attribution.report import attribution_metrics
from leapcore.config import EngineConfig, load_config
from leapcore.errors import InputError
from tasks import (
    ArtifactStore,
    AuditResult,
    SampleFile,
    close_audit_run,
    export_results,
    fetch_model,
    isolate_samples,
    load_samples,
    locate_model,
    markdown_summary,
    open_audit_run,
    publish_mlflow,
    publish_wandb,
    render_report,
    resolve_targets,
    run_stage,
    run_tags,
    secret_safe_flow,
    summarise,
    tracking_uri,
)
from tasks.attribution import attribute_samples, check_methods
from tasks.export import check_output_dir
from tasks.mlflow_registry import DEFAULT_EXPERIMENT
from tasks.redaction import clean_text, scrubbed_errors, secret_values
from tasks.report import stamp_report
from tasks.runtime import SKIPPED, collect_publications, mlflow_link, stage_finished
from tasks.sample_files import image_files

OPTIONAL = ("render_report", "export_results", "publish_mlflow", "publish_wandb")
ALIASES = {
    "report": "render_report",
    "export": "export_results",
    "mlflow": "publish_mlflow",
    "wandb": "publish_wandb",
}


def _skipped(skip: list[str] | str | None) -> set[str]:
    names = [skip] if isinstance(skip, str) else list(skip or [])
    off = set()
    for name in names:
        stage = ALIASES.get(str(name).strip().lower(), str(name).strip().lower())
        if stage not in OPTIONAL:
            raise InputError(
                f"stage {name!r} cannot be skipped in explain_samples; optional: {', '.join(OPTIONAL)}."
            )
        off.add(stage)
    return off


def check_inputs(
    model_uri: str,
    images: list[str] | str,
    config: dict[str, Any] | str | EngineConfig | None = None,
    skip: list[str] | None = None,
    artifact_store: str | None = None,
    model_options: dict[str, Any] | None = None,
    output_dir: str | None = None,
) -> tuple[EngineConfig, set[str], list[SampleFile], ArtifactStore, Any]:
    """Check what ``explain_samples`` gets before anything starts (see ``flows.audit.check_inputs``).

    Returns:
        The config, the skipped stages, the image files, the artifact store and the locator.
    """
    cfg = load_config(config)
    with scrubbed_errors(secret_values(cfg, model_uri, artifact_store, model_options)):
        off = _skipped(skip)
        files = image_files(images)
        store = ArtifactStore(artifact_store)
        locator = locate_model(model_uri, model_options, tracking_uri())
        if "export_results" not in off and (output_dir or cfg.output_dir):
            check_output_dir(output_dir or cfg.output_dir)
    return cfg, off, files, store, locator


@secret_safe_flow(
    name="explain-samples",
    description="Isolate the features behind a model's predictions on the user's images.",
    validate_parameters=False,
)
def explain_samples(
    model_uri: str,
    images: list[str] | str,
    target_classes: list[Any] | None = None,
    config: dict[str, Any] | str | EngineConfig | None = None,
    skip: list[str] | None = None,
    artifact_store: str | None = None,
    experiment: str | None = None,
    wandb_project: str | None = None,
    model_options: dict[str, Any] | None = None,
    device: str | None = None,
    output_dir: str | None = None,
    methods: list[str] | str | None = None,
    method_options: dict[str, Any] | None = None,
) -> AuditResult:
    """Isolate, in each image, the features of its top classes (or of ``target_classes``).

    Args:
        model_uri: as for ``audit_model``.
        images: image files and/or folders of images, read with the model's own eval transform
            (resize + centre crop to its input size; see ``tasks.model.sample_transform``).
        target_classes: classes to isolate in every image (indices or names); default each image's
            top ``max_isolate_classes`` predictions.
        config: engine options (``isolation_steps``, ``use_hipe``, ...).
        skip: any of ``report``, ``export``, ``mlflow``, ``wandb``.
        artifact_store, experiment, wandb_project, model_options, device, output_dir: as for
            ``audit_model``.
        methods: attribution methods (``["ig", "lrp", "crp"]`` or ``"ig,lrp,crp"``) to run on the
            images as well (stage ``attribute_samples``, table ``attributions``); none by default.
        method_options: options of ``leapcore.attribution.attribute`` (per method under its name).

    Returns:
        An :class:`~tasks.runtime.AuditResult`.
    """
    began = time.perf_counter()
    stopping.clear()  # a stop asked of an earlier run in this process is not this run's
    cfg, off, files, store, locator = check_inputs(
        model_uri, images, config, skip, artifact_store, model_options, output_dir
    )
    secrets = secret_values(cfg, model_uri, artifact_store, model_options)
    with scrubbed_errors(secrets):
        attribution_methods = check_methods(methods)
        mlflow_uri = tracking_uri()
        registry = dict(locator.identity.registry) if locator.identity else {}
        flow_run_id = str(current_flow_run.id)
        shown = locator.identity.uri if locator.identity else "model"
        label = registry.get("name") or Path(shown.rstrip("/")).stem or shown
        run_name = f"explain {label} {flow_run_id[:8]}"
        exp_name = experiment or DEFAULT_EXPERIMENT
        # Checked before the MLflow run opens (see audit_model): the classes need the model.
        fetched = run_stage(fetch_model, locator=locator, store=store)
        if target_classes is not None:
            resolve_targets(target_classes, fetched[0].class_list)
        run_id = None
        if "publish_mlflow" not in off:
            tags = run_tags(None, model_uri, registry, flow_run_id, {"leapcore.kind": "explain"})
            # No registry: the version's leapcore.audit_* tags name audits only, never an explain run.
            run_id = open_audit_run(mlflow_uri, exp_name, run_name, tags, None)
        try:
            result = _explain(
                fetched,
                cfg,
                locator,
                files,
                target_classes,
                store,
                device,
                off,
                output_dir,
                mlflow_uri,
                run_id,
                wandb_project,
                run_name,
                attribution_methods,
                method_options,
            )
        except BaseException as err:
            if run_id is not None:
                close_audit_run(
                    mlflow_uri,
                    run_id,
                    end_status(err),
                    None,
                    error=clean_text(f"{type(err).__name__}: {err}", secrets),
                )
            raise
        if run_id is not None:
            close_audit_run(mlflow_uri, run_id, "FINISHED", None)
            result.mlflow_run_id = run_id
            result.mlflow_tracking_uri = clean_text(mlflow_uri, secrets)
            result.mlflow_experiment = exp_name
        result.flow_run_id = result.stages_flow_run_id = flow_run_id
        result.seconds = time.perf_counter() - began
        markdown_summary(
            "explain",
            [f"# Explained {len(files)} image(s) with `{result.model_uri}`", ""]
            + [f"- **{s}**: {st}" for s, st in result.stages.items()]
            + [""]
            + [f"    {line}" for line in result.where_to_look()],
        )
        for line in result.where_to_look():
            get_run_logger().info(line)
        return result


def _explain(
    fetched: tuple[Any, str],
    cfg: EngineConfig,
    locator: Any,
    files: list[SampleFile],
    target_classes: list[Any] | None,
    store: ArtifactStore,
    device: str | None,
    off: set[str],
    output_dir: str | None,
    mlflow_uri: str,
    run_id: str | None,
    wandb_project: str | None,
    run_name: str,
    methods: list[str] | None = None,
    method_options: dict[str, Any] | None = None,
) -> AuditResult:
    states: dict[str, str] = {}
    model, states["fetch_model"] = fetched
    targets = None if target_classes is None else resolve_targets(target_classes, model.class_list)
    samples, states["load_samples"] = run_stage(
        load_samples, files=files, model=model, config=cfg, store=store
    )
    isolated, states["isolate_samples"] = run_stage(
        isolate_samples,
        model=model,
        locator=locator,
        config=cfg,
        samples=samples,
        targets=targets,
        store=store,
        device=device,
    )
    summarise("explain", "isolate_samples", [isolated], states["isolate_samples"])
    attributed = None
    if methods:  # before the report, whose ``attributions`` section shows its table
        attributed, states["attribute_samples"] = run_stage(
            attribute_samples,
            model=model,
            locator=locator,
            config=cfg,
            samples=samples,
            methods=methods,
            targets=targets,
            store=store,
            method_options=method_options,
            device=device,
        )
        summarise("explain", "attribute_samples", [attributed], states["attribute_samples"])
    report, states["render_report"] = run_stage(
        render_report,
        model=model,
        config=cfg,
        store=store,
        isolations=[isolated],
        samples=isolated,
        title=f"Explanations by {model.uri}",
        html="render_report" not in off,
        attributions=attributed,
    )
    provenance = {"prefect_flow_run": str(current_flow_run.id), "mlflow_run": run_id or ""}
    report = stamp_report(report, store, model, provenance, samples)
    for stage in OPTIONAL:
        if stage in off and stage not in states:
            states[stage] = SKIPPED
            stage_finished(stage, SKIPPED)
    out_dir = (
        output_dir
        or cfg.output_dir
        or str(Path("leap_results") / (cfg.project_name or f"{model.name}-explain"))
    )
    result = AuditResult(
        flow_run_id=None,
        model_uri=model.uri,
        model_digest=model.digest,
        registry=dict(model.registry),
        targets=targets or [],
        target_names=[],
        stages=states,
        outputs={
            "fetch_model": model,
            "load_samples": samples,
            "isolate_samples": isolated,
            "render_report": report,
            **({"attribute_samples": attributed} if attributed is not None else {}),
        },
        metrics=dict(report.metrics),
        output_dir=str(Path(out_dir).resolve()),
    )
    params = cfg.secret_free()
    params.pop("samples", None)
    params["explain"] = {
        "model_uri": model.uri,
        "images": [Path(f.path).name for f in files],
        "targets": targets,
    }
    seconds = {"seconds/isolate_samples": isolated.seconds}
    if attributed is not None:
        seconds["seconds/attribute_samples"] = attributed.seconds
        table = store.get_table(attributed.refs["attributions"])
        seconds.update(attribution_metrics(table))  # logged as MLflow metrics with the timings
        result.metrics.update(attribution_metrics(table))
    pending = {}
    if "export_results" not in off:
        pending["export_results"] = export_results.submit(report, store, out_dir)
    if run_id is not None:
        pending["publish_mlflow"] = publish_mlflow.submit(
            mlflow_uri, run_id, model, params, seconds, report, store, {"leapcore.kind": "explain"}
        )
    if "publish_wandb" not in off:
        pending["publish_wandb"] = publish_wandb.submit(
            model,
            cfg,
            params,
            report,
            store,
            isolations=[isolated],
            samples=isolated,
            project=wandb_project,
            run_name=run_name,
            tags=["leapcore", "explain"],
            mlflow=mlflow_link(mlflow_uri, run_id) if run_id is not None else None,
        )
    collect_publications(
        pending, states, result, (mlflow_uri, run_id) if run_id is not None else None
    )
    return result
