"""The engine's progress events reach the Prefect UI as progress artifacts of the task that ran."""

from __future__ import annotations

import torch
from prefect import flow, task
from torch import nn

from leapcore.config import load_config
from leapcore.isolation import isolate_features
from tasks.progress import task_progress


def _progress_artifacts(flow_run_id: str) -> dict[str, float]:
    from prefect.client.orchestration import get_client

    body = {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}, "type": {"any_": ["progress"]}}}
    with get_client(sync_client=True) as client:
        found = client.request("POST", "/artifacts/filter", json=body).json()
    return {a["key"]: float(a["data"]) for a in found}


@task
def _isolate() -> int:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3)).eval()
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    config = load_config({"input_dim": [3, 8, 8], "isolation_steps": 6, "log_freq": 2})
    seen = []
    show = task_progress("isolate_features", 3)
    isolate_features(
        net,
        images,
        [[0], [1]],
        config,
        8,
        progress=lambda e: (seen.append(e.step), show(e)),
    )
    return len(seen)


@flow
def _isolation_flow() -> tuple[int, str]:
    from prefect.runtime import flow_run

    return _isolate(), flow_run.id


def test_isolation_steps_show_as_a_progress_artifact(prefect_server) -> None:
    events, flow_run_id = _isolation_flow()
    assert events == 3  # steps 2, 4, 6
    assert _progress_artifacts(flow_run_id) == {"progress-isolate-features-3": 100.0}


def test_outside_a_task_the_events_are_dropped() -> None:
    assert task_progress("isolate_features").__name__ == "_ignore"
    isolate_features(
        nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2)).eval(),
        torch.rand(1, 3, 8, 8),
        [[0]],
        load_config({"input_dim": [3, 8, 8], "isolation_steps": 2, "log_freq": 1}),
        8,
        progress=task_progress("isolate_features"),
    )
