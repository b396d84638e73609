"""Reading back what the real services stored: Prefect task states and logs, W&B run files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from uuid import UUID

from tasks.wandb_records import wandb_records


def task_states(flow_run_id: str) -> dict[str, list[str]]:
    """``{task name: [state name, ...]}`` of a flow run's task runs, read from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(flow_run_id)])),
            sort=TaskRunSort.EXPECTED_START_TIME_ASC,
            limit=200,
        )
    states: dict[str, list[str]] = {}
    for run in runs:
        states.setdefault(run.name.rsplit("-", 1)[0], []).append(run.state.name)
    return states


def flow_run(flow_run_id: str) -> Any:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(UUID(flow_run_id))


def flow_run_logs(flow_run_id: str) -> str:
    """Every log line the Prefect API holds for a flow run (its tasks included)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    with get_client(sync_client=True) as client:
        logs = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[UUID(flow_run_id)])),
            limit=200,
            offset=0,
            sort=LogSort.TIMESTAMP_ASC,
        )
    return "\n".join(log.message for log in logs)


def wandb_contents(run_dir: str | Path) -> dict[str, Any]:
    """Config, logged history keys (with table sizes), summary keys and artifacts of a W&B run."""
    config: dict[str, Any] = {}
    history: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    artifacts: dict[str, dict[str, Any]] = {}
    for record in wandb_records(run_dir):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            for item in record.run.config.update:
                config[item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                config[item.key] = json.loads(item.value_json)
        elif kind == "history":
            for item in record.history.item:
                key = item.key or ".".join(item.nested_key)
                history[key] = json.loads(item.value_json)
        elif kind == "summary":
            for item in record.summary.update:
                summary[item.key or ".".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "artifact":
            art = record.artifact
            artifacts[art.name] = {
                "type": art.type,
                "files": [entry.path for entry in art.manifest.contents],
            }
    return {"config": config, "history": history, "summary": summary, "artifacts": artifacts}


def files_containing(text: str, *roots: str | Path) -> list[str]:
    """Every file under ``roots`` whose bytes contain ``text`` (also UTF-16, as some stores use)."""
    needles = [text.encode(), text.encode("utf-16-le")]
    found = []
    for root in roots:
        root = Path(root)
        if not root.exists():
            continue
        for path in [root] if root.is_file() else root.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                if any(n in data for n in needles):
                    found.append(str(path))
    return found


def prefect_artifacts(flow_run_id: str) -> dict[str, str]:
    """``{key: type}`` of the Prefect artifacts (tables, markdown) a flow run created.

    The REST filter is called directly: the client's ``read_artifacts`` sends task-run and flow-run
    filters that leave out artifacts created by the flow itself.
    """
    from prefect.client.orchestration import get_client

    body = {
        "artifacts": {"flow_run_id": {"any_": [flow_run_id]}},
        "limit": 200,
        "offset": 0,
        "sort": "ID_DESC",
    }
    with get_client(sync_client=True) as client:
        found = client.request("POST", "/artifacts/filter", json=body).json()
    return {artifact["key"]: artifact["type"] for artifact in found}
