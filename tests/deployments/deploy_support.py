"""Helpers of the deployment tests: server processes on loopback, free ports, bounded waits."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
LOOPBACK = "127.0.0.1"
WEBHOOK_SECRET = "leap-test-webhook-secret-3f9c"  # test-only value, checked never to be logged


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((LOOPBACK, port)) == 0


def http_ok(url: str, timeout: float = 2.0) -> bool:
    assert url.startswith(f"http://{LOOPBACK}:"), url  # loopback only, always
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


class ServerProcess:
    """A server started in its own process group, logged to a file, stopped group-wide."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log_path: Path, cwd: Path):
        self.name, self.cmd, self.log_path = name, cmd, log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_healthy(self, url: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            if http_ok(url):
                return
            time.sleep(0.5)
        raise RuntimeError(
            f"{self.name} not healthy at {url} after {timeout:.0f} s:\n{self.log_tail()}"
        )

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM to the process group, then SIGKILL after ``grace`` seconds."""
        try:
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(grace)
            # Children (uvicorn workers, flow-run subprocesses) may outlive the leader.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
        finally:
            self._log.close()

    @property
    def running(self) -> bool:
        return self.proc.poll() is None


@contextlib.contextmanager
def server_process(
    name: str,
    cmd: list[str],
    env: dict[str, str],
    log_path: Path,
    health_url: str | None = None,
    timeout: float = 120.0,
    cwd: Path = REPO,
) -> Iterator[ServerProcess]:
    """Start a server and yield it once ``health_url`` answers 200; always stop it on exit."""
    server = ServerProcess(name, cmd, env, log_path, cwd)
    try:
        if health_url is not None:
            server.wait_healthy(health_url, timeout)
        yield server
    finally:
        server.stop()


def base_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(
        PREFECT_HOME=str(home / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_UI_ENABLED="false",
        PREFECT_LOGGING_LEVEL="INFO",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
    )
    return env


def prefect_events(resource_id: str, event: str = "leap.model-version.ready") -> list[dict]:
    """Events the Prefect server stored for ``resource_id`` (the test process's API URL)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        response = client.request(
            "POST",
            "/events/filter",
            json={
                "filter": {
                    "event": {"name": [event]},
                    "resource": {"id": [resource_id]},
                    "occurred": {"since": "2000-01-01T00:00:00Z"},
                },
                "limit": 50,
            },
        )
        response.raise_for_status()
        return response.json()["events"]


def wait_for(predicate, timeout: float, interval: float = 0.5, what: str = "condition"):
    """Poll ``predicate`` until it returns something truthy; bounded in time and count."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 2):
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            break
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


# ---------------------------------------------------------------------------------------------- #
# A tiny classifier and an audit config that finishes in seconds
# ---------------------------------------------------------------------------------------------- #
TINY_CLASSES = ["ant", "bee", "cat", "dog", "eel", "fox"]
TINY_SHAPE = (3, 16, 16)


def tiny_classifier(seed: int = 0):
    """A seeded 3x16x16 -> 6 logits CNN (untrained: audits only need gradients)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, len(TINY_CLASSES)),
    )
    return model.eval()


def tiny_config(**overrides) -> dict:
    config = {
        "max_steps": 5,
        "find_lr_steps": 0,
        "lr": 0.05,
        "isolation": True,
        "isolation_steps": 3,
        "max_isolate_classes": 2,
        "transform": "s",
        "transform_samples": 2,
        "seed": 7,
    }
    config.update(overrides)
    return config


def log_tiny_model(name: str, alias: str | None = None, seed: int = 0):
    """Log the tiny classifier to the current MLflow server and register a new version of ``name``."""
    from tasks.mlflow_models import log_model_with_metadata

    return log_model_with_metadata(
        tiny_classifier(seed),
        TINY_CLASSES,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        input_shape=TINY_SHAPE,
        registered_model_name=name,
        alias=alias,
    )
