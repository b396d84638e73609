"""MLflow registration: one run per audit, opened before the first stage and closed with its outcome.

The run is opened (``RUNNING``) before any stage runs, so a failing stage leaves a ``FAILED`` run, never
a ``FINISHED`` one. ``publish_mlflow`` logs the secret-free config as params, the headline metrics and
the stage times, and the download bundle (Parquet tables, PNGs, heatmap, HTML report) as artifacts.
When the model came from the registry, its version is tagged with the audit's run id and status.

Tracking URI: ``MLFLOW_TRACKING_URI`` when set, else a SQLite store ``mlflow.db`` in the working
folder (artifacts next to it, in ``mlruns/``).
"""

from __future__ import annotations

import json
import os
import re
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from prefect import task

from leapcore import __version__
from leapcore.quality import quality_tags
from leapcore.secrets import redact_uri
from tasks.artifacts import ArtifactStore
from tasks.model import ModelRef
from tasks.redaction import redacting
from tasks.report import ReportOutput

DEFAULT_EXPERIMENT = "leapcore-audits"
TAG_RUN_ID = "leapcore.audit_run_id"
TAG_STATUS = "leapcore.audit_status"
_MAX_PARAM = 6000


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<working folder>/mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def _client(uri: str) -> Any:
    # MLflow prints "View run ... at: http://user:password@host/..." when a run ends on a tracking
    # server, credentials included; leapcore logs its own link with the password redacted.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    from mlflow import MlflowClient

    registry = os.environ.get("MLFLOW_REGISTRY_URI") or uri
    return MlflowClient(tracking_uri=uri, registry_uri=registry)


def flatten_params(values: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested options as ``a.b`` params; lists as JSON; values cut to MLflow's limit."""
    out: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_params(value, f"{name}."))
            continue
        text = value if isinstance(value, str) else json.dumps(value)
        out[name] = text[:_MAX_PARAM]
    return out


def open_audit_run(
    uri: str,
    experiment: str,
    run_name: str,
    tags: dict[str, str],
    registry: dict[str, str] | None = None,
) -> str:
    """Create the audit's run (``RUNNING``) and tag the registry version; returns the run id."""
    client = _client(uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else _create_experiment(client, experiment)
    if found is not None:
        mark_stale_runs(client, experiment_id, tags.get("leapcore.model_uri"), registry)
    owner = {"leapcore.host": socket.gethostname(), "leapcore.pid": str(os.getpid())}
    run = client.create_run(
        experiment_id,
        run_name=run_name,
        tags={**tags, **owner, "leapcore.version": __version__, "mlflow.runName": run_name},
    )
    run_id = run.info.run_id
    _tag_version(client, registry, run_id, "RUNNING")
    return run_id


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def mark_stale_runs(
    client: Any, experiment_id: str, model_uri: str | None, registry: dict[str, str] | None
) -> list[str]:
    """End as ``KILLED`` the RUNNING runs of audits of ``model_uri`` whose process is gone.

    A run records its host and process id when it opens; a process killed with SIGKILL cannot
    close its run, so the next audit of the same model on the same host does. Runs of live
    processes, and of other hosts, are left alone. The version's audit tags follow when they name
    a run ended here.

    Returns:
        The ids of the runs marked ``KILLED``.
    """
    if not model_uri:
        return []
    quoted = model_uri.replace("'", "\\'")
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"attributes.status = 'RUNNING' and tags.`leapcore.model_uri` = '{quoted}'",
    )
    host = socket.gethostname()
    killed = []
    for run in runs:
        tags = run.data.tags
        pid = tags.get("leapcore.pid", "")
        if tags.get("leapcore.host") != host or not pid.isdigit() or _process_alive(int(pid)):
            continue
        run_id = run.info.run_id
        client.set_tag(run_id, "leapcore.status", "KILLED")
        client.set_tag(
            run_id, "leapcore.error", f"process {pid} on {host} ended without closing it"
        )
        client.set_terminated(run_id, status="KILLED")
        killed.append(run_id)
    if killed and registry and registry.get("name") and registry.get("version"):
        version = client.get_model_version(registry["name"], registry["version"])
        if version.tags.get(TAG_RUN_ID) in killed:
            client.set_model_version_tag(
                registry["name"], registry["version"], TAG_STATUS, "KILLED"
            )
    return killed


def _create_experiment(client: Any, name: str) -> str:
    try:
        return client.create_experiment(name)
    except Exception:
        found = client.get_experiment_by_name(name)  # created concurrently
        if found is None:
            raise
        return found.experiment_id


def close_audit_run(
    uri: str,
    run_id: str,
    status: str,
    registry: dict[str, str] | None = None,
    error: str | None = None,
) -> None:
    """End the run as ``FINISHED``, ``FAILED`` or ``KILLED`` (with the cleaned error text) and tag
    the version."""
    client = _client(uri)
    if error:
        client.set_tag(run_id, "leapcore.error", error[:4900])
    client.set_tag(run_id, "leapcore.status", status)
    client.set_terminated(run_id, status=status)
    _tag_version(client, registry, run_id, status)


def _tag_version(client: Any, registry: dict[str, str] | None, run_id: str, status: str) -> None:
    if not registry or not registry.get("name") or not registry.get("version"):
        return
    name, version = registry["name"], registry["version"]
    client.set_model_version_tag(name, version, TAG_RUN_ID, run_id)
    client.set_model_version_tag(name, version, TAG_STATUS, status)


def run_tags(
    model: ModelRef | None,
    model_uri: str,
    registry: dict[str, str],
    flow_run_id: str | None,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """Tags linking the run to the model (name/version/alias/digest) and the Prefect flow run."""
    tags = {"leapcore.model_uri": redact_uri(model_uri)}
    for key in ("name", "version", "alias", "run_id"):
        if registry.get(key):
            tags[f"leapcore.model_{key}"] = str(registry[key])
    if model is not None:
        tags["leapcore.model_digest"] = model.digest
    if flow_run_id:
        tags["prefect.flow_run_id"] = str(flow_run_id)
    tags.update(extra or {})
    return tags


# Options that route or label a run (where files go, which W&B team): not parameters of the audit.
ENVIRONMENT_OPTIONS = frozenset(
    {"leap_api_key", "wandb_api_key", "wandb_entity", "project_name", "output_dir", "samples"}
)
# MLflow 3's UI files an experiment as classic ML (runs, model metrics) or GenAI (traces) by this tag.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
CLASSIC_ML = "custom_model_development"
DESCRIPTION_MARK = "<!-- leapcore audit -->"
# MLflow 3.17's UI picks GenAI or classic ML pages per browser (default GenAI), whatever the
# experiment's kind; links that open the classic pages carry this query.
CLASSIC_VIEW = "?workflowType=machine_learning"


def run_page(experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI, relative to the UI's address, in the classic ML view."""
    return f"#/experiments/{experiment_id}/runs/{run_id}{CLASSIC_VIEW}"


def audit_params(params: dict[str, Any]) -> dict[str, str]:
    """The params an audit logs: the options and the audit's own settings, environment ones left out."""
    kept = {k: v for k, v in params.items() if k not in ENVIRONMENT_OPTIONS}
    return flatten_params(kept)


def trajectory_series(
    prototypes: Any, trajectories: Any, class_list: list[str]
) -> dict[str, list[tuple[int, float]]]:
    """``target_prob_trajectory/<classes>_<slug>/<prototype>`` -> ``[(step, target probability)]``
    from the ``prototypes`` and ``trajectories`` Arrow tables (the mean over a hybrid's classes)."""
    from leapcore.report import target_key

    rows = prototypes.select(["row", "target_classes", "prototype_index"]).to_pylist()
    targets = {r["row"]: (list(r["target_classes"]), r["prototype_index"]) for r in rows}
    sums: dict[tuple[int, int], list[float]] = {}
    for step, row, cls, prob in zip(
        trajectories.column("step").to_pylist(),
        trajectories.column("row").to_pylist(),
        trajectories.column("class_index").to_pylist(),
        trajectories.column("prob").to_pylist(),
    ):
        if row in targets and cls in targets[row][0]:
            sums.setdefault((row, step), []).append(prob)
    series: dict[str, list[tuple[int, float]]] = {}
    for (row, step), values in sorted(sums.items()):
        classes, index = targets[row]
        key = f"target_prob_trajectory/{target_key(classes, class_list)}/{index}"
        series.setdefault(key, []).append((int(step), sum(values) / len(values)))
    return series


def logged_model_id(client: Any, registry: dict[str, str]) -> str | None:
    """The MLflow 3 LoggedModel behind the registry version the audit read, if it has one."""
    if not registry.get("name") or not registry.get("version"):
        return None
    version = client.get_model_version(registry["name"], str(registry["version"]))
    model_id = getattr(version, "model_id", None)
    if not model_id:  # the file and SQL stores leave it unset; the source names the LoggedModel
        found = re.fullmatch(r"models:/(m-[0-9a-f]+)/?", version.source or "")
        model_id = found.group(1) if found else None
    return model_id


def _describe_version(
    client: Any,
    registry: dict[str, str],
    run_id: str,
    experiment_id: str,
    metrics: dict,
    note: str = "",
) -> None:
    """Add (or replace) the leapcore paragraph of the model version's description: links to the
    audit's run and its report, the headline numbers and the analysis stages' ``note``."""
    if not registry.get("name") or not registry.get("version"):
        return
    name, version = registry["name"], str(registry["version"])
    current = client.get_model_version(name, version).description or ""
    kept = current.split(DESCRIPTION_MARK)[0].rstrip()
    run = f"#/experiments/{experiment_id}/runs/{run_id}"
    lines = [
        DESCRIPTION_MARK,
        f"**leapcore audit**: [run {run_id[:8]}]({run}{CLASSIC_VIEW}) · "
        f"[report]({run}/artifacts/report.html{CLASSIC_VIEW})",
    ]
    if "target_prob/mean" in metrics:
        lines.append(f"mean target probability {metrics['target_prob/mean']:.3f}")
    if "entanglement_max_other/max" in metrics:
        lines.append(f"strongest entanglement {metrics['entanglement_max_other/max']:.2f}")
    if note:
        lines.append(note)
    text = (kept + "\n\n" if kept else "") + "\n\n".join(lines)
    client.update_model_version(name, version, description=text)


@task(name="publish_mlflow", retries=2, retry_delay_seconds=2, persist_result=False)
@redacting
def publish_mlflow(
    uri: str,
    run_id: str,
    model: ModelRef,
    params: dict[str, Any],
    metrics: dict[str, float],
    report: ReportOutput,
    store: ArtifactStore,
    tags: dict[str, str] | None = None,
    version_tags: dict[str, str] | None = None,
    version_note: str = "",
) -> dict[str, Any]:
    """Log params, metrics, tags and the download bundle to the audit's run.

    - params: the options (environment ones such as ``output_dir`` left out);
    - metrics: the headline numbers and stage times, and each prototype's target probability per
      optimisation step (``target_prob_trajectory/...``, step metrics); for an audit of a registry
      version backed by an MLflow 3 LoggedModel, every metric carries its ``model_id`` and the model
      is logged as the run's input, so the numbers show on the model's page too;
    - the experiment is tagged as classic ML (not GenAI) for MLflow's UI;
    - the model version's description links the run and its report (audits only, not explain),
      with ``version_note`` (the analysis stages' findings) below; ``version_tags`` go on the
      version.
    """
    from mlflow.entities import LoggedModelInput, Metric, Param, RunTag

    client = _client(uri)
    now = int(time.time() * 1000)
    kind = (tags or {}).get("leapcore.kind", "audit")
    experiment_id = client.get_run(run_id).info.experiment_id
    experiment = client.get_experiment(experiment_id)
    if experiment.tags.get(EXPERIMENT_KIND_TAG) != CLASSIC_ML:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, CLASSIC_ML)
    model_id = logged_model_id(client, model.registry)
    if model_id is not None:
        client.log_inputs(run_id, models=[LoggedModelInput(model_id)])
    flat = audit_params(params)
    items = sorted(flat.items())
    for start in range(0, len(items), 90):
        client.log_batch(run_id, params=[Param(k, v) for k, v in items[start : start + 90]])
    values = [
        Metric(k, float(v), now, 0, model_id=model_id)
        for k, v in sorted({**report.metrics, **metrics}.items())
    ]
    tables = report.tables()
    if "tables/prototypes.parquet" in tables and "tables/trajectories.parquet" in tables:
        series = trajectory_series(
            store.get_table(tables["tables/prototypes.parquet"]),
            store.get_table(tables["tables/trajectories.parquet"]),
            list(model.class_list),
        )
        values += [
            Metric(key, value, now, step, model_id=model_id)
            for key, points in sorted(series.items())
            for step, value in points
        ]
    for start in range(0, len(values), 900):
        client.log_batch(run_id, metrics=values[start : start + 900])
    all_tags = {**(tags or {}), "leapcore.model_digest": model.digest}
    all_tags.update(quality_tags(report.metrics))  # issue 19 (h19): off-target prototypes
    if model_id is not None:
        all_tags["leapcore.logged_model_id"] = model_id
    client.log_batch(run_id, tags=[RunTag(k, str(v)[:4900]) for k, v in sorted(all_tags.items())])
    with tempfile.TemporaryDirectory(prefix="leapcore-mlflow-") as tmp:
        root = Path(tmp)
        for rel, ref in report.files.items():
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(store.get_bytes(ref))
        client.log_artifacts(run_id, str(root))
    if kind == "audit":
        _describe_version(
            client, model.registry, run_id, experiment_id, report.metrics, version_note
        )
        if model.registry.get("name") and model.registry.get("version"):
            for key, value in sorted((version_tags or {}).items()):
                client.set_model_version_tag(
                    model.registry["name"], str(model.registry["version"]), key, str(value)[:4900]
                )
    return {
        "run_id": run_id,
        "params": len(flat),
        "metrics": len(values),
        "files": len(report.files),
        "model_id": model_id,
        "run_page": run_page(experiment_id, run_id),
    }
