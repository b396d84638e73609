"""SIGTERM, SIGINT and SIGKILL on a real `leap audit` process: MLflow run status, version tags, the
artifact store, and no Prefect server left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from .conftest import MODEL, leap_env, write_config

pytestmark = [pytest.mark.services, pytest.mark.slow, pytest.mark.timeout(900)]
URI = f"models:/{MODEL}@champion"


def _client(home: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{home / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _runs(home: Path, experiment: str) -> list:
    client = _client(home)
    found = client.get_experiment_by_name(experiment)
    return [] if found is None else client.search_runs([found.experiment_id])


def _start(home: Path, tmp_path: Path, experiment: str, config: Path) -> subprocess.Popen:
    args = [
        sys.executable, "-m", "leapcli", "audit", URI, "--classes", "3",
        "--config", str(config), "--skip", "wandb", "--experiment", experiment,
        "--store", str(tmp_path / "store"), "--output-dir", str(tmp_path / "out"),
        "--no-progress", "--json",
    ]  # fmt: skip
    return subprocess.Popen(
        args,
        env=leap_env(home),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a shell job
    )


def _wait_for_running_run(
    home: Path, experiment: str, proc: subprocess.Popen, settle: float = 3.0
) -> list[int]:
    """Wait until the audit's run is open and a stage computes; returns the process tree's pids."""
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        if any(r.info.status == "RUNNING" for r in _runs(home, experiment)):
            break
        time.sleep(1)
    else:
        pytest.fail("the audit's MLflow run never opened")
    time.sleep(settle)  # into the first stages
    tree = psutil.Process(proc.pid).children(recursive=True)
    return [proc.pid] + [p.pid for p in tree]


def _survivors(pids: list[int], wait: float = 20.0) -> list[str]:
    deadline = time.monotonic() + wait
    while True:
        alive = []
        for pid in pids:
            try:
                p = psutil.Process(pid)
                if p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(" ".join(p.cmdline())[:200])
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)


def _version_tags(home: Path) -> dict[str, str]:
    client = _client(home)
    return client.get_model_version_by_alias(MODEL, "champion").tags


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT"])
def test_a_stopped_audit_is_marked_killed_and_leaves_no_server(home, tmp_path, how) -> None:
    experiment = f"stopped-{how}"
    config = write_config(tmp_path / "cfg.json", max_steps=100_000, find_lr_steps=0, lr=0.05)
    proc = _start(home, tmp_path, experiment, config)
    pids = _wait_for_running_run(home, experiment, proc)
    assert len(pids) > 1, "no Prefect server process was started"
    sent = time.monotonic()
    if how == "SIGINT":
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole process group
    else:
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    seconds = time.monotonic() - sent
    assert proc.returncode != 0
    last = err.strip().splitlines()[-1]
    # The last line (Prefect's own "Error logging to API" may precede it on the same line when
    # Ctrl-C also stopped its server).
    assert f"leap: stopped by {how}; the MLflow run (if any) is marked KILLED" in last, err[-3000:]
    assert seconds < 60, f"{seconds:.0f} s to stop (100,000 steps would take hours)"
    (run,) = _runs(home, experiment)
    assert run.info.status == "KILLED"
    tags = _version_tags(home)
    assert tags["leapcore.audit_run_id"] == run.info.run_id
    assert tags["leapcore.audit_status"] == "KILLED"
    assert _survivors(pids) == []


def test_after_sigkill_the_next_audit_marks_the_stale_run_killed_and_resumes(
    home, tmp_path
) -> None:
    experiment = "sigkilled"
    config = write_config(tmp_path / "cfg.json", max_steps=600)
    proc = _start(home, tmp_path, experiment, config)
    pids = _wait_for_running_run(home, experiment, proc, settle=0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # the OOM killer or `kill -9` of the job
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert _survivors(pids) == []
    (stale,) = _runs(home, experiment)
    assert stale.info.status == "RUNNING"  # nobody could close it
    assert _version_tags(home)["leapcore.audit_status"] == "RUNNING"

    rerun = _start(home, tmp_path, experiment, config)
    out, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err[-3000:]
    result = json.loads(out)
    assert result["stages"]["fetch_model"] == "Cached"  # resumed from the store
    client = _client(home)
    old = client.get_run(stale.info.run_id)
    assert old.info.status == "KILLED" and old.data.tags["leapcore.status"] == "KILLED"
    assert client.get_run(result["mlflow_run_id"]).info.status == "FINISHED"
    tags = _version_tags(home)
    assert tags["leapcore.audit_run_id"] == result["mlflow_run_id"]
    assert tags["leapcore.audit_status"] == "FINISHED"
