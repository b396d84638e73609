"""The secret canary: a secret placed in the config, in a secret-named option or inside a URI
appears in no log, MLflow param/tag/artifact, W&B file, Arrow table, report, stored Prefect
parameter, database file or exception text."""

from __future__ import annotations

import logging
import os
import traceback
import uuid
from pathlib import Path

import pytest

from tests.pipeline.conftest import tiny_config
from tests.pipeline.support import files_containing, flow_run, flow_run_logs

pytestmark = [pytest.mark.services, pytest.mark.slow, pytest.mark.timeout(600)]


def _prefect_database_folder() -> Path:
    from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL

    url = str(PREFECT_SERVER_DATABASE_CONNECTION_URL.value())
    assert url.startswith("sqlite"), url
    return Path(url.split(":///", 1)[1]).parent


def test_a_secret_canary_appears_nowhere(
    prefect_server, registered_model, pipeline_home, tmp_path, caplog, capfd
) -> None:
    from mlflow import MlflowClient

    from flows import audit_model

    caplog.set_level(logging.DEBUG)
    canary = f"CANARY{uuid.uuid4().hex}"
    config = tiny_config(wandb_api_key=canary, leap_api_key=canary + "leap")
    store = str(tmp_path / "store")
    texts: list[str] = []

    # 1. A successful audit, published to MLflow and W&B (offline: WANDB_MODE wins over the key).
    done = audit_model(
        registered_model.uri, [3], config, artifact_store=store, output_dir=str(tmp_path / "out")
    )
    assert done.stages["publish_wandb"] == "Completed" and done.wandb_mode == "offline"
    flow_runs = [done.flow_run_id]

    # 2. A stage that fails, with the secret in a secret-named model option.
    failed = audit_model(
        registered_model.uri,
        [3],
        config,
        artifact_store=store,
        model_options={"access_token": canary},
        skip=["wandb"],
        return_state=True,
    )
    assert failed.is_failed()
    error = failed.result(raise_on_failure=False)
    assert "access_token" in str(error)  # the option is named, its value is not
    texts += [str(error), "".join(traceback.format_exception(error))]
    flow_runs.append(str(failed.state_details.flow_run_id))

    # 3. Credentials inside a URI: an artifact store that cannot be opened.
    with pytest.raises(Exception) as caught:
        audit_model(
            registered_model.uri,
            [3],
            config,
            artifact_store=f"file://auditor:{canary}@localhost{tmp_path}/elsewhere",
        )
    assert "***@localhost" in str(caught.value)
    texts += [str(caught.value), "".join(traceback.format_exception(caught.value))]

    # Everything the services hold, read back through their APIs ...
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"], os.environ["MLFLOW_REGISTRY_URI"])
    for run in client.search_runs([client.get_experiment_by_name("leapcore-audits").experiment_id]):
        texts += [repr(run.data.params), repr(run.data.tags), repr(run.data.metrics)]
    for version in client.search_model_versions("name = 'digits-cnn'"):
        texts.append(repr(version.tags))
    for run_id in flow_runs:
        texts += [flow_run_logs(run_id), repr(flow_run(run_id).parameters)]
    captured = capfd.readouterr()
    texts += [caplog.text, captured.out, captured.err]
    leaks = [i for i, text in enumerate(texts) if canary in text]
    assert not leaks, [texts[i][:300] for i in leaks]
    assert "fetch_model: Completed" in flow_run_logs(done.flow_run_id)  # the logs were there

    # ... and every file they wrote: MLflow's database and artifacts, W&B's run files, staging and
    # cache, the artifact store's Arrow tables, the report, Parquet and PNG files, Prefect's result
    # storage and its server database.
    roots = [pipeline_home, tmp_path, _prefect_database_folder()]
    assert files_containing(
        "digits-cnn", pipeline_home / "mlflow.db"
    )  # the search does find things
    assert files_containing(canary, *roots) == []
