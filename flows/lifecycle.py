"""The life of one flow's MLflow run, shared by ``audit_model`` and ``explain_samples``.

Both flows check the user's input first, then open the run (:func:`mlflow_run_scope`), run their
stages, and end the run ``FINISHED``, ``FAILED`` or ``KILLED`` (:func:`end_status`) with the cleaned
error text; :func:`finish` fills the result's run facts and says where everything went.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from prefect import get_run_logger

from leapcore import stopping
from tasks import AuditResult, close_audit_run, markdown_summary, open_audit_run
from tasks.redaction import clean_text


@dataclass(frozen=True)
class RunSpec:
    """The MLflow run a flow opens.

    Attributes:
        uri: the tracking URI; ``experiment`` the experiment; ``name`` the run's name.
        tags: the run's first tags (``tasks.mlflow_registry.run_tags``).
        registry: the registry version whose ``leapcore.audit_*`` tags follow the run (audits only:
            an explain run never touches them).
        secrets: values removed from the error text the run records.
        enabled: False when ``publish_mlflow`` is skipped: no run opens.
    """

    uri: str
    experiment: str
    name: str
    tags: dict[str, str]
    registry: dict[str, str] | None
    secrets: list[str]
    enabled: bool = True


@contextmanager
def mlflow_run_scope(spec: RunSpec) -> Iterator[dict[str, str] | None]:
    """Open the run (``{"uri", "run_id"}``, or None when disabled) and end it as the block ends:
    ``FINISHED``, or ``FAILED`` / ``KILLED`` with the error's cleaned text when the block raises."""
    if not spec.enabled:
        yield None
        return
    run_id = open_audit_run(spec.uri, spec.experiment, spec.name, spec.tags, spec.registry)
    try:
        yield {"uri": spec.uri, "run_id": run_id}
    except BaseException as err:
        error = clean_text(f"{type(err).__name__}: {err}", spec.secrets)
        close_audit_run(spec.uri, run_id, end_status(err), spec.registry, error=error)
        raise
    close_audit_run(spec.uri, run_id, "FINISHED", spec.registry)


def end_status(err: BaseException) -> str:
    """``KILLED`` for a signal (SIGTERM, Ctrl-C), which also stops the stages still running; else
    ``FAILED``."""
    from prefect.exceptions import TerminationSignal

    if isinstance(err, (KeyboardInterrupt, TerminationSignal)) or stopping.requested():
        stopping.request_stop(f"stopped by {type(err).__name__}")
        return "KILLED"
    return "FAILED"


def finish(
    result: AuditResult,
    spec: RunSpec,
    run: dict[str, str] | None,
    flow_run_id: str,
    began: float,
    summary: tuple[str, list[str], list[str]],
) -> AuditResult:
    """Record the run's facts on ``result``, post the flow's Markdown summary (``summary``: its key,
    the lines before the stages' outcomes and the lines after) and log where everything went."""
    if run is not None:
        result.mlflow_run_id = run["run_id"]
        result.mlflow_tracking_uri = clean_text(spec.uri, spec.secrets)
        result.mlflow_experiment = spec.experiment
    result.flow_run_id = flow_run_id
    result.stages_flow_run_id = result.stages_flow_run_id or flow_run_id
    result.seconds = time.perf_counter() - began
    key, heading, notes = summary
    lines = list(heading) + [f"- **{stage}**: {state}" for stage, state in result.stages.items()]
    lines += list(notes) + [""] + [f"    {line}" for line in result.where_to_look()]
    markdown_summary(key, lines)
    for line in result.where_to_look():
        get_run_logger().info(line)
    return result


def published_params(config: Any, kind: str, facts: dict[str, Any]) -> dict[str, Any]:
    """The options a run logs (secrets and the sample list left out) with the run's own facts under
    ``kind`` (``audit`` or ``explain``)."""
    params = config.secret_free()
    params.pop("samples", None)
    params[kind] = facts
    return params
