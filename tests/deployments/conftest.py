"""Real servers on loopback for the deployment tests: ``prefect server start`` and ``mlflow server``.

Each server is started once per test session on a free 127.0.0.1 port, with its own home folder
(PREFECT_HOME, an sqlite MLflow store) under pytest's tmp dir, and stopped in the fixture's
teardown, also when a test fails: the process group is sent SIGTERM, then SIGKILL. In-process
Prefect and MLflow clients point at them through ``temporary_settings`` and
``MLFLOW_TRACKING_URI`` for as long as the fixtures live.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from deploy_support import BIN, LOOPBACK, base_env, free_port, server_process


@pytest.fixture(scope="session")
def services_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("services")


@pytest.fixture(scope="session")
def prefect_server(services_home: Path) -> Iterator[str]:
    """``prefect server start`` on a free loopback port; yields the API URL."""
    port = free_port()
    env = base_env(services_home)
    env.update(
        PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2",
        PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED="false",
        PREFECT_SERVER_SERVICES_FOREMAN_ENABLED="false",
    )
    cmd = [
        str(BIN / "prefect"),
        "server",
        "start",
        "--host",
        LOOPBACK,
        "--port",
        str(port),
        "--no-ui",
    ]
    with server_process(
        "prefect server",
        cmd,
        env,
        services_home / "prefect-server.log",
        f"http://{LOOPBACK}:{port}/api/health",
        timeout=180,
    ):
        yield f"http://{LOOPBACK}:{port}/api"


@pytest.fixture(scope="session")
def mlflow_server(services_home: Path) -> Iterator[str]:
    """``mlflow server`` (sqlite store, proxied artifacts) on a free loopback port; yields its URL.

    Webhooks to loopback need ``MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS`` and the http scheme (MLflow
    allows only public https targets by default); the webhook list cache is shortened so a webhook
    created by a test fires at once.
    """
    from cryptography.fernet import Fernet

    port = free_port()
    env = base_env(services_home)
    env.update(
        MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS="true",
        MLFLOW_WEBHOOK_ALLOWED_SCHEMES="http,https",
        MLFLOW_WEBHOOK_CACHE_TTL="1",
        MLFLOW_WEBHOOK_REQUEST_MAX_RETRIES="1",
        MLFLOW_WEBHOOK_REQUEST_TIMEOUT="10",
        MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY=Fernet.generate_key().decode(),
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
    )
    store = services_home / "mlflow"
    store.mkdir()
    cmd = [
        str(BIN / "mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{store / 'mlflow.db'}",
        "--artifacts-destination",
        str(store / "artifacts"),
        "--host",
        LOOPBACK,
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    with server_process(
        "mlflow server",
        cmd,
        env,
        services_home / "mlflow-server.log",
        f"http://{LOOPBACK}:{port}/health",
    ):
        yield f"http://{LOOPBACK}:{port}"


@pytest.fixture(scope="session")
def services(
    prefect_server: str, mlflow_server: str, services_home: Path
) -> Iterator[dict[str, str]]:
    """Both servers, with this process's Prefect and MLflow clients pointed at them.

    Yields the environment for subprocesses (``leap serve``) that must talk to the same servers.
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    env = base_env(services_home)
    env.update(
        PREFECT_API_URL=prefect_server,
        MLFLOW_TRACKING_URI=mlflow_server,
        PREFECT_RUNNER_POLL_FREQUENCY="2",
        LEAPCORE_TRUST_MLFLOW_REGISTRY="0",
    )
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_server
    try:
        with temporary_settings(
            updates={
                PREFECT_API_URL: prefect_server,
                PREFECT_HOME: str(services_home / "client-home"),
            }
        ):
            yield env
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved


@pytest.fixture
def model_name(request: pytest.FixtureRequest) -> str:
    """A registered model name unique to the test (the servers are shared by the session)."""
    safe = "".join(c if c.isalnum() else "-" for c in request.node.name)[:40]
    return f"leap-{safe}-{int(time.time() * 1000) % 10**8}"


@pytest.fixture
def register_version(services: dict[str, str], tmp_path: Path):
    """``register_version(name) -> version``: a new READY version whose artifact is a stub file.

    Enough for the registry logic (watcher, webhook, claims), which never loads the model.
    """
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    stub = tmp_path / "stub-model"
    stub.mkdir(exist_ok=True)
    (stub / "MLmodel").write_text("flavors: {}\n")

    def register(name: str) -> str:
        with mlflow.start_run() as run:
            mlflow.log_artifacts(str(stub), "model")
        run_id = run.info.run_id
        with contextlib.suppress(Exception):
            client.create_registered_model(name)
        mv = client.create_model_version(name, source=f"runs:/{run_id}/model", run_id=run_id)
        return str(mv.version)

    return register
