"""What the flows share: a secret-safe flow class, running stages, summaries for the Prefect UI.

- :class:`SecretSafeFlow` stores flow-run parameters with secret-named keys dropped and credentials
  removed from URIs, so the Prefect database never holds a secret passed in a config.
- :func:`run_stages` submits stage tasks, waits for them, and re-runs (``refresh_cache``) a stage
  whose cached result points at an artifact that is gone or damaged, so nothing trusts a stale
  reference.
- :func:`summarise` puts a stage's summary in the Prefect UI as a table artifact.
- Progress records on the ``leapcore.pipeline`` logger (``leap_stage``/``leap_event`` attributes)
  drive the CLI's progress display.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from prefect import Flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks.artifacts import ArtifactRef, ArtifactStore
from tasks.model import ModelRef
from tasks.redaction import clean_jsonable, secret_values
from tasks.report import ReportOutput
from tasks.stages import StageOutput

progress_log = logging.getLogger("leapcore.pipeline")

SKIPPED = "Skipped"


class SecretSafeFlow(Flow):
    """A Prefect flow whose stored parameters never hold secrets (see module docstring)."""

    def serialize_parameters(self, parameters: dict[str, Any]) -> dict[str, Any]:
        serialized = super().serialize_parameters(parameters)
        return clean_jsonable(serialized, secret_values(*parameters.values()))

    def with_options(self, *args: Any, **kwargs: Any) -> SecretSafeFlow:
        new = super().with_options(*args, **kwargs)
        new.__class__ = type(self)
        return new  # type: ignore[return-value]


def secret_safe_flow(**options: Any) -> Callable[[Callable[..., Any]], SecretSafeFlow]:
    """Like ``@prefect.flow(...)``, building a :class:`SecretSafeFlow`."""

    def wrap(fn: Callable[..., Any]) -> SecretSafeFlow:
        return SecretSafeFlow(fn, **options)

    return wrap


def artifact_refs(value: Any) -> list[ArtifactRef]:
    """Every artifact a stage result points at."""
    if isinstance(value, StageOutput):
        return list(value.refs.values())
    if isinstance(value, ModelRef):
        return [value.card] if value.card is not None else []
    if isinstance(value, ReportOutput):
        return list(value.files.values())
    return []


def stage_started(stage: str, parts: int = 1) -> None:
    progress_log.info(
        "stage %s started",
        stage,
        extra={"leap_stage": stage, "leap_event": "start", "leap_parts": parts},
    )


def stage_finished(stage: str, state: str, seconds: float | None = None) -> None:
    progress_log.info(
        "stage %s: %s",
        stage,
        state,
        extra={
            "leap_stage": stage,
            "leap_event": "end",
            "leap_state": state,
            "leap_seconds": seconds,
        },
    )


def collect_publications(
    pending: dict[str, Any],
    states: dict[str, str],
    result: Any,
    mlflow: tuple[str, str] | None = None,
) -> None:
    """Wait for the export/publish futures and record their states and outputs on ``result``;
    with ``mlflow`` (tracking URI, run id), tag that run with the W&B run once both are published."""
    wandb_run = None
    for stage, future in pending.items():
        value = future.result()
        states[stage] = future.state.name
        stage_finished(stage, states[stage])
        if stage == "export_results":
            result.report_path = value
        elif stage == "publish_mlflow" and isinstance(value, dict):
            result.mlflow_run_page = value.get("run_page")
        elif stage == "publish_wandb":
            result.wandb_run_dir, result.wandb_mode = value.run_dir, value.mode
            result.wandb_sync_command, result.wandb_url = value.sync_command, value.url
            result.wandb_run_path = value.run_path
            wandb_run = value
    if mlflow is not None and wandb_run is not None and "publish_mlflow" in pending:
        from tasks.wandb_publish import tag_mlflow_run

        try:
            tag_mlflow_run(mlflow[0], mlflow[1], wandb_run)
        except Exception as err:  # a missing link must not fail a finished audit
            get_run_logger().warning(
                "could not tag the MLflow run with the W&B run (%s)", type(err).__name__
            )


def mlflow_link(tracking_uri: str, run_id: str) -> dict[str, str]:
    """What the W&B run records about the audit's MLflow run (credentials removed from the URI)."""
    from leapcore.secrets import redact_uri

    uri = redact_uri(tracking_uri)
    url = f"{uri.rstrip('/')}/#/runs/{run_id}" if uri.startswith(("http://", "https://")) else ""
    return {"mlflow_run_id": run_id, "mlflow_tracking_uri": uri, "mlflow_url": url}


def run_stages(task: Any, calls: list[dict[str, Any]]) -> tuple[list[Any], str]:
    """Submit ``task`` once per parameter dict, wait for all, and return the results in order with
    the combined state name (``Cached`` only when every call was cached).

    A cached result whose artifacts (in the call's ``store``) are missing or damaged is recomputed
    (``refresh_cache``).
    """
    stage = task.name
    stage_started(stage, len(calls))
    futures = [task.submit(**params) for params in calls]
    results, states = [], []
    for params, future in zip(calls, futures):
        value = future.result()
        state = future.state.name
        store: ArtifactStore = params["store"]
        if state == "Cached" and not all(store.is_intact(r) for r in artifact_refs(value)):
            get_run_logger().warning(
                "the cached result of %s points at a missing or damaged artifact; recomputing it",
                stage,
            )
            future = task.with_options(refresh_cache=True).submit(**params)
            value, state = future.result(), future.state.name
        results.append(value)
        states.append(state)
    combined = "Cached" if all(s == "Cached" for s in states) else "Completed"
    seconds = sum(getattr(r, "seconds", 0.0) or 0.0 for r in results)
    stage_finished(stage, combined, seconds)
    get_run_logger().info(
        "%s: %s (%d task run%s)", stage, combined, len(states), "s" * (len(states) > 1)
    )
    return results, combined


def run_stage(task: Any, **params: Any) -> tuple[Any, str]:
    """:func:`run_stages` for a single call."""
    results, state = run_stages(task, [params])
    return results[0], state


def _artifact_key(text: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:100] or "leapcore"


def summarise(flow_name: str, stage: str, outputs: Iterable[Any], state: str) -> None:
    """A Prefect table artifact with the stage's summary rows (all chunks together)."""
    rows = [row for out in outputs for row in (getattr(out, "summary", None) or [])]
    if not rows:
        return
    columns = list(dict.fromkeys(k for row in rows for k in row))
    table = [{k: _cell(row.get(k)) for k in columns} for row in rows]
    create_table_artifact(
        table=table,
        key=_artifact_key(f"{flow_name}-{stage}"),
        description=f"**{stage}** ({state})",
    )


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 6)
    return value if isinstance(value, (int, str, bool)) or value is None else str(value)


def markdown_summary(flow_name: str, lines: list[str]) -> None:
    """A Prefect markdown artifact for the whole run (where to look)."""
    create_markdown_artifact(
        markdown="\n".join(lines), key=_artifact_key(f"{flow_name}-summary"), description="Audit"
    )


@dataclass
class AuditResult:
    """What an audit produced and where it went.

    Attributes:
        flow_run_id: the Prefect flow run of the audit.
        stages_flow_run_id: the flow run holding the stage task runs (a subflow of an audit).
        model_uri: the model URI (credentials removed).
        model_digest: the weights digest.
        registry: registry name/version/alias of the model, when it came from the registry.
        targets: the audited targets as class index lists; ``target_names`` their names.
        stages: each stage's outcome: ``Completed``, ``Cached`` or ``Skipped``.
        outputs: each stage's output (artifact references), by stage.
        metrics: the headline metrics logged to MLflow and W&B.
        report_path: the HTML report in ``output_dir``.
        output_dir: the folder with the report, Parquet tables and PNGs.
        mlflow_run_id / mlflow_tracking_uri / mlflow_experiment: the MLflow run.
        wandb_run_dir / wandb_mode / wandb_sync_command / wandb_url: the W&B run;
            wandb_run_path (entity/project/run id) is the value of the MLflow run's link back.
        mlflow_run_page: the run's page in the MLflow UI, relative to the UI's address (``#/...``).
        wandb_run_dir / wandb_mode / wandb_sync_command / wandb_url: the W&B run.
        seconds: wall time of the audit.
    """

    flow_run_id: str | None
    model_uri: str
    model_digest: str = ""
    registry: dict[str, str] = field(default_factory=dict)
    targets: list[list[int]] = field(default_factory=list)
    target_names: list[str] = field(default_factory=list)
    stages: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    report_path: str | None = None
    output_dir: str | None = None
    stages_flow_run_id: str | None = None
    mlflow_run_id: str | None = None
    mlflow_tracking_uri: str | None = None
    mlflow_experiment: str | None = None
    wandb_run_dir: str | None = None
    wandb_mode: str | None = None
    wandb_sync_command: str | None = None
    wandb_url: str | None = None
    wandb_run_path: str | None = None
    mlflow_run_page: str | None = None
    seconds: float = 0.0

    def where_to_look(self) -> list[str]:
        """Human-readable lines: the report, the MLflow UI command, the W&B folder and sync command."""
        lines = []
        if self.report_path:
            lines.append(f"Report:  {self.report_path}")
        if self.mlflow_run_id:
            lines.append(
                f"MLflow:  run {self.mlflow_run_id} in experiment {self.mlflow_experiment!r}; "
                f"browse with: mlflow ui --backend-store-uri {self.mlflow_tracking_uri}"
            )
            if self.mlflow_run_page:
                lines.append(f"         then open http://127.0.0.1:5000/{self.mlflow_run_page}")
        if self.wandb_run_dir:
            lines.append(f"W&B:     {self.wandb_mode} run in {self.wandb_run_dir}")
            if self.wandb_sync_command:
                lines.append(f"         upload it with: {self.wandb_sync_command}")
            if self.wandb_url:
                lines.append(f"         {self.wandb_url}")
        return lines
