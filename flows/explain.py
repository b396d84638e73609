"""``explain_samples``: feature isolation for a batch of the user's images (files or a folder).

Stages: fetch model -> load samples -> isolate samples (``engine.run_samples``) -> render report ->
export results, publish to MLflow, publish to W&B. Cached by content like ``audit_model``: the
images are keyed by the hash of their bytes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect.runtime import flow_run as current_flow_run

from flows.lifecycle import RunSpec, finish, mlflow_run_scope, published_params
from leapcore import stopping
from leapcore.attribution.report import attribution_metrics
from leapcore.config import EngineConfig, load_config
from leapcore.errors import InputError
from tasks import (
    ArtifactStore,
    AuditResult,
    SampleFile,
    export_results,
    fetch_model,
    isolate_samples,
    load_samples,
    locate_model,
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
from tasks.attribution import attribute_samples, check_methods, relmax_references
from tasks.export import check_output_dir
from tasks.mlflow_registry import DEFAULT_EXPERIMENT
from tasks.redaction import scrubbed_errors, secret_values
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


def check_relmax(
    relmax: list[str] | str | None, methods: list[str], count: int
) -> list[SampleFile]:
    """The reference images of ``relmax`` (none without it); RelMax needs CRP's concepts."""
    if not relmax:
        return []
    if "crp" not in methods:
        raise InputError(
            "relmax shows reference images of the concepts CRP finds: add crp to the methods "
            "(e.g. --methods crp or methods=['ig', 'crp'])."
        )
    if int(count) < 1:
        raise InputError(f"relmax_count must be at least 1; got {count}.")
    return image_files(relmax)


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
    relmax: list[str] | str | None = None,
    relmax_count: int = 4,
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
        relmax: image files and/or folders of reference images: for each concept CRP finds (needs
            ``crp`` in ``methods``; its ``layer`` and ``composite``), the ``relmax_count`` images of
            these most relevant for it (zennit-crp's RelMax; stage ``relmax_references``, table
            ``relmax``, shown in the report's attributions section).

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
        references = check_relmax(relmax, attribution_methods, relmax_count)
        registry = dict(locator.identity.registry) if locator.identity else {}
        flow_run_id = str(current_flow_run.id)
        shown = locator.identity.uri if locator.identity else "model"
        label = registry.get("name") or Path(shown.rstrip("/")).stem or shown
        # Checked before the MLflow run opens (see audit_model): the classes need the model.
        fetched = run_stage(fetch_model, locator=locator, store=store)
        if target_classes is not None:
            resolve_targets(target_classes, fetched[0].class_list)
        spec = RunSpec(
            uri=tracking_uri(),
            experiment=experiment or DEFAULT_EXPERIMENT,
            name=f"explain {label} {flow_run_id[:8]}",
            tags=run_tags(None, model_uri, registry, flow_run_id, {"leapcore.kind": "explain"}),
            registry=None,  # the version's leapcore.audit_* tags name audits only, never explain
            secrets=secrets,
            enabled="publish_mlflow" not in off,
        )
        call = ExplainCall(
            fetched=fetched,
            config=cfg,
            locator=locator,
            files=files,
            target_classes=target_classes,
            store=store,
            device=device,
            off=off,
            output_dir=output_dir,
            wandb_project=wandb_project,
            run_name=spec.name,
            methods=attribution_methods,
            method_options=method_options,
            relmax=(references, relmax_count),
        )
        with mlflow_run_scope(spec) as mlflow_run:
            call.mlflow_run = mlflow_run
            result = _explain(call)
        heading = [f"# Explained {len(files)} image(s) with `{result.model_uri}`", ""]
        return finish(result, spec, mlflow_run, flow_run_id, began, ("explain", heading, []))


@dataclass
class ExplainCall:
    """One explain run's checked inputs (see :func:`explain_samples`)."""

    fetched: tuple[Any, str]
    config: EngineConfig
    locator: Any
    files: list[SampleFile]
    target_classes: list[Any] | None
    store: ArtifactStore
    device: str | None
    off: set[str]
    output_dir: str | None
    wandb_project: str | None
    run_name: str
    methods: list[str] = field(default_factory=list)
    method_options: dict[str, Any] | None = None
    mlflow_run: dict[str, str] | None = None
    relmax: tuple[list[SampleFile], int] = ([], 4)


def _explain(call: ExplainCall) -> AuditResult:
    """Load, isolate and (when asked) attribute the images, report, then export and publish."""
    states: dict[str, str] = {}
    model, states["fetch_model"] = call.fetched
    targets = (
        None
        if call.target_classes is None
        else resolve_targets(call.target_classes, model.class_list)
    )
    common = {"model": model, "config": call.config, "store": call.store}
    samples, states["load_samples"] = run_stage(load_samples, files=call.files, **common)
    on_device = {"locator": call.locator, "samples": samples, "targets": targets, **common}
    isolated, states["isolate_samples"] = run_stage(
        isolate_samples, device=call.device, **on_device
    )
    summarise("explain", "isolate_samples", [isolated], states["isolate_samples"])
    attributed = None
    if call.methods:  # before the report, whose ``attributions`` section shows its table
        attributed, states["attribute_samples"] = run_stage(
            attribute_samples,
            methods=call.methods,
            method_options=call.method_options,
            device=call.device,
            **on_device,
        )
        summarise("explain", "attribute_samples", [attributed], states["attribute_samples"])
    relmaxed = _relmax(call, attributed, states, common)
    report, states["render_report"] = run_stage(
        render_report,
        extras={"relmax": relmaxed.refs["relmax"]} if relmaxed is not None else None,
        isolations=[isolated],
        samples=isolated,
        title=f"Explanations by {model.uri}",
        html="render_report" not in call.off,
        attributions=attributed,
        **common,
    )
    run_id = call.mlflow_run["run_id"] if call.mlflow_run else ""
    provenance = {"prefect_flow_run": str(current_flow_run.id), "mlflow_run": run_id}
    report = stamp_report(report, call.store, model, provenance, samples)
    for stage in OPTIONAL:
        if stage in call.off and stage not in states:
            states[stage] = SKIPPED
            stage_finished(stage, SKIPPED)
    out_dir = (
        call.output_dir
        or call.config.output_dir
        or str(Path("leap_results") / (call.config.project_name or f"{model.name}-explain"))
    )
    outputs = {"fetch_model": model, "load_samples": samples, "isolate_samples": isolated}
    outputs["render_report"] = report
    if attributed is not None:
        outputs["attribute_samples"] = attributed
    if relmaxed is not None:
        outputs["relmax_references"] = relmaxed
    result = AuditResult(
        flow_run_id=None,
        model_uri=model.uri,
        model_digest=model.digest,
        registry=dict(model.registry),
        targets=targets or [],
        target_names=[],
        stages=states,
        outputs=outputs,
        metrics=dict(report.metrics),
        output_dir=str(Path(out_dir).resolve()),
    )
    _publish(call, result, report, targets)
    return result


def _relmax(
    call: ExplainCall, attributed: Any, states: dict[str, str], common: dict[str, Any]
) -> Any:
    """RelMax reference images of CRP's concepts (``--relmax DIR``), or None when not asked."""
    files, count = call.relmax
    if attributed is None or not files:
        return None
    references, _ = run_stage(load_samples, files=files, **common)
    relmaxed, states["relmax_references"] = run_stage(
        relmax_references,
        locator=call.locator,
        attributions=attributed,
        references=references,
        n=count,
        method_options=call.method_options,
        device=call.device,
        **common,
    )
    summarise("explain", "relmax_references", [relmaxed], states["relmax_references"])
    return relmaxed


def _publish(
    call: ExplainCall, result: AuditResult, report: Any, targets: list[list[int]] | None
) -> None:
    """Export the results and publish them to MLflow and W&B, side by side."""
    model, out, run = result.outputs["fetch_model"], result.outputs, call.mlflow_run
    isolated, attributed = out["isolate_samples"], out.get("attribute_samples")
    images = [Path(f.path).name for f in call.files]
    facts = {"model_uri": model.uri, "images": images, "targets": targets}
    params = published_params(call.config, "explain", facts)
    seconds = {"seconds/isolate_samples": isolated.seconds}
    if attributed is not None:
        seconds["seconds/attribute_samples"] = attributed.seconds
        table = call.store.get_table(attributed.refs["attributions"])
        seconds.update(attribution_metrics(table))  # logged as MLflow metrics with the timings
        result.metrics.update(attribution_metrics(table))
    pending = {}
    if "export_results" not in call.off:
        pending["export_results"] = export_results.submit(report, call.store, result.output_dir)
    if run is not None:
        pending["publish_mlflow"] = publish_mlflow.submit(
            run["uri"], run["run_id"], model, params, seconds, report, call.store,
            {"leapcore.kind": "explain"},
        )  # fmt: skip
    if "publish_wandb" not in call.off:
        pending["publish_wandb"] = publish_wandb.submit(
            model,
            call.config,
            params,
            report,
            call.store,
            isolations=[isolated],
            samples=isolated,
            project=call.wandb_project,
            run_name=call.run_name,
            tags=["leapcore", "explain"],
            mlflow=mlflow_link(run["uri"], run["run_id"]) if run is not None else None,
        )
    collect_publications(
        pending, result.stages, result, (run["uri"], run["run_id"]) if run else None
    )
