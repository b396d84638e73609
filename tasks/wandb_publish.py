"""W&B publishing: one run per audit, shared by the pipeline's ``publish_wandb`` task and by
``leapcore.engine.generate`` (found at run time through the ``leapcore.publishers`` entry point
``wandb`` -> :func:`publish_generate`; the engine never imports W&B).

What a run holds: the secret-free config (with the MLflow run it belongs to), the prototype and
isolation tables (images, probabilities and whichever quality columns the Arrow tables carry), the
entanglement matrix and heatmap, the attribution maps (``tasks.wandb_attributions``), the
optimisation trajectories as history steps (``trajectory/<row>`` against ``optimisation_step``),
the HTML report as ``wandb.Html``, the Parquet tables as an artifact and a ``model`` artifact for
lineage (``use_artifact`` online; W&B refuses it offline, so offline runs log the model artifact
as an output instead).

Offline unless an account is configured: ``wandb_api_key`` or ``wandb_entity`` in the config, or
``WANDB_API_KEY`` / ``WANDB_ENTITY`` in the environment, switch to online; ``WANDB_MODE`` (or the
``mode`` argument) always wins. For ``generate``, a key that cannot work (not a W&B key, or the
server is unreachable) falls back to offline with a warning. Offline runs land in
``$WANDB_DIR/wandb/offline-run-*``; every staged file (media, tables, artifacts) is kept inside that
folder (``staging/``), so the folder holds the whole run. W&B records the staged files by absolute
path: ``wandb sync`` the folder where it was written, or at the same path on another machine.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import tempfile
import threading
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task

from leapcore.config import EngineConfig, load_config
from leapcore.images import to_uint8
from tasks.artifacts import ArtifactStore
from tasks.audit_io import load_audit
from tasks.model import ModelRef
from tasks.redaction import redacting
from tasks.report import ReportOutput
from tasks.settings import (  # noqa: F401 (mode helpers, named here as before)
    DEFAULT_PROJECT,
    WandbSettings,
    generate_mode,
    init_settings,
    plausible_key,
    wandb_mode,
    wandb_settings,
)
from tasks.stages import StageOutput
from tasks.wandb_attributions import attribution_table
from tasks.wandb_records import wait_written
from tasks.wandb_tables import analysis_tables

log = logging.getLogger(__name__)

STAGING = "staging"
# The contract's quality columns (HELPERS.md), published when the tables carry them.
QUALITY_COLUMNS = {
    "prototypes": ("off_target", "target_prob_robust", "transfer_probs"),
    "isolations": (
        "kept_logit",
        "kept_prob",
        "prob_full",
        "prob_isolated",
        "deletion_auc",
        "insertion_auc",
    ),
}
_STAGING_LOCK = threading.Lock()


@dataclass(frozen=True)
class WandbRun:
    """Where the audit's W&B run went.

    Attributes:
        run_id: the W&B run id.
        mode: ``offline`` or ``online``.
        run_dir: the local run folder (``offline-run-*`` when offline).
        sync_command: ``wandb sync <run_dir>`` when offline, else empty.
        url: the run's page when online.
        run_path: ``entity/project/run_id`` (``project/run_id`` offline): the value for the MLflow
            tag ``wandb.run_path`` that links the MLflow run back to this one.
        model_artifact: the name of the model artifact the run used (or logged, offline).
    """

    run_id: str
    mode: str
    run_dir: str
    sync_command: str = ""
    url: str = ""
    run_path: str = ""
    model_artifact: str = ""


@dataclass
class Publication:
    """What one audit publishes, whichever side (pipeline or ``generate``) computed it.

    Attributes:
        audit: the engine's :class:`~leapcore.engine.Audit` (tensors on the host).
        tables: the Arrow tables by schema name (``prototypes``, ``isolations``, ...).
        params: the secret-free config (W&B config).
        metrics: headline metrics (W&B summary).
        model: ``{"name", "uri", "digest", ...}`` of the audited model.
        sample_names: names of the user's images (sample mode).
        files: extra files for the tables artifact, by path inside it (Parquet tables).
        report_html: the HTML report, logged as ``wandb.Html``.
        heatmap_png: the entanglement heatmap.
        links: ``{"mlflow_run_id", "mlflow_tracking_uri", "mlflow_url"}`` when known.
    """

    audit: Any
    tables: Mapping[str, pa.Table]
    params: dict[str, Any]
    metrics: dict[str, float] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    sample_names: list[str] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)
    report_html: str | None = None
    heatmap_png: bytes | None = None
    links: dict[str, str] = field(default_factory=dict)


@contextlib.contextmanager
def staged_in(run_dir: Path) -> Iterator[Path]:
    """W&B stages media, tables and artifact files under ``WANDB_DATA_DIR`` (default: the user's
    home); point it into the run folder while this run logs, so the folder holds every file. The
    variable is process-wide, so runs of one process log one at a time."""
    staging = run_dir / STAGING
    staging.mkdir(parents=True, exist_ok=True)
    with _STAGING_LOCK:
        previous = os.environ.get("WANDB_DATA_DIR")
        os.environ["WANDB_DATA_DIR"] = str(staging)
        try:
            yield staging
        finally:
            if previous is None:
                os.environ.pop("WANDB_DATA_DIR", None)
            else:
                os.environ["WANDB_DATA_DIR"] = previous


def _image(wandb: Any, tensor: Any, alpha: Any = None, caption: str = "") -> Any:
    return wandb.Image(to_uint8(tensor, alpha), caption=caption)


def _quality(tables: Mapping[str, pa.Table], name: str) -> dict[str, list[Any]]:
    """The contract's quality columns present in table ``name``, as Python lists."""
    table = tables.get(name)
    if table is None:
        return {}
    return {
        c: table.column(c).to_pylist() for c in QUALITY_COLUMNS[name] if c in table.column_names
    }


def prototype_table(wandb: Any, pub: Publication) -> Any:
    """Prototypes with their images, target and top probabilities and quality columns."""
    p, names = pub.audit.prototypes, pub.audit.class_list
    quality = _quality(pub.tables, "prototypes")
    columns = ["target", "prototype", "image", "target_prob", "top_class", "top_prob"]
    table = wandb.Table(columns=columns + list(quality))
    probs = p.probs
    for r in range(len(p.images)):
        t = p.targets[p.row_target(r)]
        target = "+".join(names[c] for c in t)
        top = int(probs[r].argmax())
        alpha = None if p.alphas is None else p.alphas[r]
        table.add_data(
            target,
            p.row_index(r),
            _image(wandb, p.images[r], alpha, target),
            float(probs[r, t].mean()),
            names[top],
            float(probs[r, top]),
            *[values[r] for values in quality.values()],
        )
    return table


def _row_label(p: Any, names: list[str], r: int) -> str:
    return "+".join(names[c] for c in p.targets[p.row_target(r)]) + f" #{p.row_index(r)}"


def entanglement_table(wandb: Any, pub: Publication, top: int = 30) -> Any:
    """The entanglement matrix: the targets' columns, then the most entangled classes (30 in all).

    With the ``relaxed`` measure's probe on, a ``probe`` column says for each prototype whether the
    probe entered its scores (``used``) or fell short of its target (``fell short``)."""
    audit, names = pub.audit, pub.audit.class_list
    probed = audit.entanglement_probed
    p = audit.prototypes
    columns = sorted({c for t in p.targets for c in t})
    strongest = audit.entanglement.max(dim=0).values.argsort(descending=True).tolist()
    columns += [c for c in strongest if c not in columns][: max(0, top - len(columns))]
    probe = [] if probed is None else ["probe"]
    matrix = wandb.Table(columns=["prototype"] + probe + [names[c] for c in columns])
    for r in range(len(audit.entanglement)):
        row = [float(audit.entanglement[r, c]) for c in columns]
        used = [] if probed is None else ["used" if probed[r] else "fell short"]
        matrix.add_data(_row_label(p, names, r), *used, *row)
    return matrix


def isolation_table(wandb: Any, pub: Publication) -> Any:
    """One row per isolated (image, class) pair: mask, isolated image, logits, quality columns."""
    audit, names = pub.audit, pub.audit.class_list
    iso, p = audit.isolation, audit.prototypes
    quality = _quality(pub.tables, "isolations")
    base = ["image", "class", "mask", "isolated", "logit_full", "logit_isolated", "coverage"]
    table = wandb.Table(columns=base + list(quality))
    for k, (i, c) in enumerate(iso.pairs):
        if p is not None:
            label = f"prototype {i}"
        else:
            label = pub.sample_names[i] if i < len(pub.sample_names) else str(i)
        table.add_data(
            label,
            names[c],
            _image(wandb, iso.masks[k], caption=f"mask {names[c]}"),
            _image(wandb, iso.isolated[k], caption=names[c]),
            float(iso.logits_full[k]),
            float(iso.logits_isolated[k]),
            float(iso.coverage[k]),
            *[values[k] for values in quality.values()],
        )
    return table


def log_trajectories(run: Any, pub: Publication) -> int:
    """Each prototype's target probability at every recorded optimisation step, as history rows
    (``trajectory/<target> #<n>`` against ``optimisation_step``). Returns the rows logged."""
    p = pub.audit.prototypes
    if p is None or not p.trajectory_steps:
        return 0
    names = pub.audit.class_list
    run.define_metric("optimisation_step")
    run.define_metric("trajectory/*", step_metric="optimisation_step")
    labels = [_row_label(p, names, r) for r in range(len(p.images))]
    for s, step in enumerate(p.trajectory_steps):
        row: dict[str, Any] = {"optimisation_step": int(step)}
        for r, label in enumerate(labels):
            targets = p.targets[p.row_target(r)]
            row[f"trajectory/{label}"] = float(p.trajectory[s, r, targets].mean())
        run.log(row)
    return len(p.trajectory_steps)


def log_results(wandb: Any, run: Any, pub: Publication, staging: Path) -> None:
    """Tables, heatmap, report and summary of one audit."""
    audit = pub.audit
    logged: dict[str, Any] = {}
    if audit.prototypes is not None:
        logged["prototypes"] = prototype_table(wandb, pub)
        if audit.entanglement is not None:
            logged["entanglement"] = entanglement_table(wandb, pub)
    if pub.heatmap_png is not None:
        path = staging / "entanglement_heatmap.png"
        path.write_bytes(pub.heatmap_png)
        logged["entanglement_heatmap"] = wandb.Image(str(path))
    if audit.isolation is not None:
        logged["isolations"] = isolation_table(wandb, pub)
    if "attributions" in pub.tables:  # explain_samples(..., methods=...)
        logged["attributions"] = attribution_table(wandb, pub.tables["attributions"], audit.samples)
    for role, table in analysis_tables(wandb, pub.tables, audit).items():
        logged.setdefault(role, table)
    if pub.report_html is not None:
        logged["report"] = wandb.Html(pub.report_html, inject=False)
    if logged:
        run.log(logged)
    run.summary.update(pub.metrics)
    run.summary.update({f"mlflow/{k}": v for k, v in pub.links.items() if v})


def log_files(wandb: Any, run: Any, pub: Publication) -> None:
    """The Parquet tables as one ``leapcore-audit`` artifact (W&B stages its copy in the run folder)."""
    if not pub.files:
        return
    name = f"audit-{pub.model.get('name', 'model')}".replace("/", "-")[:120]
    artifact = wandb.Artifact(name=name, type="leapcore-audit")
    with tempfile.TemporaryDirectory(prefix="leapcore-wandb-") as tmp:
        for rel, data in pub.files.items():
            path = Path(tmp) / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            artifact.add_file(str(path), name=rel)
        run.log_artifact(artifact)


def link_model(wandb: Any, run: Any, pub: Publication, mode: str) -> str:
    """A ``model`` artifact named after the audited model, its content the model's identity (URI,
    digest), so that every audit of the same weights points at the same artifact version. Online
    the run uses it (lineage: model -> audit); offline W&B refuses ``use_artifact``, so it is
    logged as an output of the run."""
    model = pub.model
    name = "model-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", str(model.get("name", "model")))[:100]
    artifact = wandb.Artifact(name=name, type="model", metadata=dict(model))
    with artifact.new_file("model.json") as handle:
        handle.write(json.dumps(model, sort_keys=True, default=str))
    if mode == "online":
        run.use_artifact(artifact)
    else:
        run.log_artifact(artifact)
    return name


@dataclass(frozen=True)
class RunOptions:
    """How one W&B run is opened (everything but the account, which :class:`WandbSettings` holds).

    Attributes:
        project: the W&B project (default the settings' project, else ``leapcore``).
        run_name: the run's display name.
        mode: ``online`` / ``offline`` / ``disabled``; None: :func:`wandb_mode` decides.
        tags: run tags.
        directory: where W&B writes the run folder (default ``WANDB_DIR``, else the working folder).
        job_type: ``audit``, ``explain`` or ``generate``.
        run_id: a run id chosen beforehand (:func:`new_run_id`; the report's provenance names it).
    """

    project: str | None = None
    run_name: str | None = None
    mode: str | None = None
    tags: list[str] | None = None
    directory: str | None = None
    job_type: str = "audit"
    run_id: str | None = None


def open_run(settings: WandbSettings, params: dict[str, Any], options: RunOptions) -> Any:
    """``wandb.init`` for ``options`` (its ``project`` and ``mode`` already resolved)."""
    import wandb

    return wandb.init(
        id=options.run_id,
        project=options.project,
        entity=settings.entity or None,
        name=options.run_name,
        config=params,
        mode=options.mode,
        dir=options.directory or os.environ.get("WANDB_DIR") or None,
        job_type=options.job_type,
        tags=options.tags,
        reinit="create_new",
        settings=init_settings(wandb, settings, options.mode),
    )


def publish(
    pub: Publication,
    config: EngineConfig | WandbSettings,
    options: RunOptions | None = None,
    **overrides: Any,
) -> WandbRun:
    """Log one audit as one W&B run (the code both the task and ``generate`` use).

    Args:
        pub: what to log.
        config: the account (a config's W&B keys, or :class:`WandbSettings`).
        options: how to open the run; ``overrides`` replace single fields (``project="p"``).
    """
    import wandb

    settings = wandb_settings(config)
    options = replace(options or RunOptions(), **overrides)
    options = replace(
        options,
        project=settings.project_or(options.project),
        mode=wandb_mode(settings, options.mode),
    )
    params = dict(pub.params)
    if pub.links:
        params["mlflow"] = {k: v for k, v in pub.links.items() if v}
    run = open_run(settings, params, options)
    run_dir = Path(run.dir).parent
    try:
        with staged_in(run_dir) as staging:
            log_trajectories(run, pub)
            log_results(wandb, run, pub, staging)
            log_files(wandb, run, pub)
            # Lineage needs the model's identity (the pipeline's URI and digest; generate has none).
            identified = pub.model.get("digest")
            model_artifact = link_model(wandb, run, pub, options.mode) if identified else ""
        info = _run_info(run, run_dir, options, model_artifact)
    except BaseException:
        run.finish(exit_code=1)
        raise
    run.finish()
    if options.mode == "offline" and not wait_written(run_dir):
        log.warning("W&B: %s was not fully written after 60 s; wait before copying it.", run_dir)
    return info


def _run_info(run: Any, run_dir: Path, options: RunOptions, model_artifact: str) -> WandbRun:
    entity = getattr(run, "entity", "") or ""
    offline, online = options.mode == "offline", options.mode == "online"
    return WandbRun(
        run_id=run.id,
        mode=options.mode or "",
        run_dir=str(run_dir),
        sync_command=f"wandb sync {run_dir}" if offline else "",
        url=(run.url or "") if online else "",
        run_path="/".join(x for x in (entity, options.project, run.id) if x),
        model_artifact=model_artifact,
    )


def new_run_id() -> str:
    """A W&B run id chosen before the run starts (8 lowercase letters and digits, as W&B's own)."""
    import secrets
    import string

    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def run_label(config: EngineConfig | WandbSettings, project: str | None, run_id: str) -> str:
    """``entity/project/run id`` (entity when configured), as the report's provenance shows it."""
    settings = wandb_settings(config)
    parts = (settings.entity or "", settings.project_or(project), run_id)
    return "/".join(p for p in parts if p)


# ---------------------------------------------------------------------------------------------- #
# The pipeline's task
# ---------------------------------------------------------------------------------------------- #
def pipeline_publication(
    model: ModelRef,
    params: dict[str, Any],
    report: ReportOutput,
    store: ArtifactStore,
    audit: Any,
    samples: StageOutput | None,
    links: dict[str, str],
) -> Publication:
    """A :class:`Publication` from the pipeline's artifacts (tables read back from the store)."""
    files = {rel: store.get_bytes(ref) for rel, ref in report.tables().items()}
    tables = {Path(rel).stem: pq.read_table(io.BytesIO(data)) for rel, data in files.items()}
    names = (
        store.get_table(samples.refs["samples"]).column("name").to_pylist()
        if samples is not None
        else []
    )
    heatmap = report.files.get("entanglement_heatmap.png")
    page = report.files.get("report.html")
    return Publication(
        audit=audit,
        tables=tables,
        params=params,
        metrics=dict(report.metrics),
        model={
            "name": model.name,
            "uri": model.uri,
            "digest": model.digest,
            **{f"registry_{k}": v for k, v in model.registry.items()},
        },
        sample_names=names,
        files=files,
        report_html=store.get_bytes(page).decode("utf-8") if page is not None else None,
        heatmap_png=store.get_bytes(heatmap) if heatmap is not None else None,
        links=links,
    )


@task(name="publish_wandb", retries=1, retry_delay_seconds=2, persist_result=False)
@redacting
def publish_wandb(
    model: ModelRef,
    config: EngineConfig,
    params: dict[str, Any],
    report: ReportOutput,
    store: ArtifactStore,
    baseline: StageOutput | None = None,
    prototypes: list[StageOutput] | None = None,
    entanglement: StageOutput | None = None,
    isolations: list[StageOutput] | None = None,
    samples: StageOutput | None = None,
    project: str | None = None,
    run_name: str | None = None,
    mode: str | None = None,
    tags: list[str] | None = None,
    directory: str | None = None,
    mlflow: dict[str, str] | None = None,
    run_id: str | None = None,
) -> WandbRun:
    """Log the audit as one W&B run; offline when no account is configured.

    ``mlflow`` (``mlflow_run_id``, ``mlflow_tracking_uri``, ``mlflow_url``) links the run to the
    audit's MLflow run (W&B config and summary); the result's ``run_path`` is the link back.
    """
    audit = load_audit(
        store,
        model,
        config,
        baseline=baseline,
        prototypes=prototypes,
        entanglement=entanglement,
        isolations=isolations,
        samples=samples,
    )
    pub = pipeline_publication(model, params, report, store, audit, samples, dict(mlflow or {}))
    options = RunOptions(project, run_name, mode, tags, directory, run_id=run_id)
    return publish(pub, config, options)


# ---------------------------------------------------------------------------------------------- #
# ``engine.generate``'s publisher (entry point ``leapcore.publishers: wandb``)
# ---------------------------------------------------------------------------------------------- #
def publish_generate(
    project_name: str, audit: Any, results: Mapping[str, Any], config: Any
) -> dict[str, Any]:
    """Log a ``generate`` call's results to the W&B project ``project_name``.

    Online with a working key; otherwise (no key, a placeholder, no connection) offline, with the
    ``wandb sync`` command logged as a warning (shown on stderr when logging is not configured).

    Returns:
        :class:`WandbRun` as a dict (``run_id``, ``mode``, ``run_dir``, ``sync_command``, ...).
    """
    cfg = load_config(config) if not isinstance(config, EngineConfig) else config
    tables = dict(results.get("tables") or {})
    files = {}
    for name, table in tables.items():
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        files[f"tables/{name}.parquet"] = buffer.getvalue()
    params = cfg.secret_free()
    params.pop("samples", None)
    pub = Publication(
        audit=audit,
        tables=tables,
        params=params,
        metrics=_generate_metrics(audit),
        model={"name": project_name},
        files=files,
    )
    mode = generate_mode(cfg)
    options = RunOptions(project=project_name, mode=mode, job_type="generate")
    try:
        info = publish(pub, cfg, options)
    except Exception as err:
        if mode != "online":
            raise
        log.warning("W&B: online logging failed (%s); logging offline.", type(err).__name__)
        info = publish(pub, cfg, options, mode="offline")
    if info.mode == "offline":
        log.warning("W&B: logged offline to %s; upload with: %s", info.run_dir, info.sync_command)
    return asdict(info)


def _generate_metrics(audit: Any) -> dict[str, float]:
    from leapcore.report import audit_metrics

    return audit_metrics(audit)


def tag_mlflow_run(tracking_uri: str, run_id: str, info: WandbRun) -> None:
    """The link back: tag the audit's MLflow run with the W&B run (``wandb.run_path``, and
    ``wandb.url`` online, ``wandb.run_dir`` offline). Called once both publications are done."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    client.set_tag(run_id, "wandb.run_path", info.run_path)
    client.set_tag(run_id, "wandb.mode", info.mode)
    if info.url:
        client.set_tag(run_id, "wandb.url", info.url)
    else:
        client.set_tag(run_id, "wandb.run_dir", info.run_dir)
