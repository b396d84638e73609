"""Bad input fails before the MLflow run opens; explain runs never touch the version's audit tags."""

from __future__ import annotations

import os

import pytest

from leapcore.errors import InputError
from tests.pipeline.conftest import MODEL_NAME, tiny_config

SENTINEL_RUN = "0123456789abcdef-last-good-audit"


def _client():
    from mlflow import MlflowClient

    uri = os.environ["MLFLOW_TRACKING_URI"]
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _mark_version_audited(client, version: str) -> None:
    """The tags a finished audit leaves on the version (a release gate reads these)."""
    client.set_model_version_tag(MODEL_NAME, version, "leapcore.audit_run_id", SENTINEL_RUN)
    client.set_model_version_tag(MODEL_NAME, version, "leapcore.audit_status", "FINISHED")


def _runs(client, experiment: str) -> list:
    found = client.get_experiment_by_name(experiment)
    return [] if found is None else client.search_runs([found.experiment_id])


def _audit_tags(client, version: str) -> tuple[str, str]:
    tags = client.get_model_version(MODEL_NAME, version).tags
    return tags["leapcore.audit_run_id"], tags["leapcore.audit_status"]


def test_a_class_typo_opens_no_run_and_keeps_the_audit_tags(
    prefect_server, registered_model, fresh_store, tmp_path
) -> None:
    from flows import audit_model

    client = _client()
    _mark_version_audited(client, registered_model.version)
    with pytest.raises(InputError, match="no class named 'digit-33'"):
        audit_model(
            registered_model.uri,
            ["digit-33"],
            tiny_config(),
            artifact_store=fresh_store,
            experiment="typo-audits",
            output_dir=str(tmp_path / "out"),
            skip=["wandb"],
        )
    assert _runs(client, "typo-audits") == []
    assert _audit_tags(client, registered_model.version) == (SENTINEL_RUN, "FINISHED")


def test_explain_runs_leave_the_audit_tags_alone(
    prefect_server, registered_model, fresh_store, tmp_path
) -> None:
    from flows import explain_samples
    from leapcore.images import save_png
    from tests.pipeline.conftest import digits_images

    client = _client()
    _mark_version_audited(client, registered_model.version)
    images, _ = digits_images()
    save_png(tmp_path / "one.png", images[0])
    with pytest.raises(InputError, match="no class named 'digit-33'"):
        explain_samples(
            registered_model.uri,
            [str(tmp_path / "one.png")],
            ["digit-33"],
            tiny_config(),
            artifact_store=fresh_store,
            experiment="explains",
            skip=["wandb", "report"],
        )
    assert _runs(client, "explains") == []
    result = explain_samples(
        registered_model.uri,
        [str(tmp_path / "one.png")],
        config=tiny_config(),
        artifact_store=fresh_store,
        experiment="explains",
        output_dir=str(tmp_path / "out"),
        skip=["wandb", "report"],
    )
    (run,) = _runs(client, "explains")
    assert run.info.run_id == result.mlflow_run_id and run.info.status == "FINISHED"
    assert _audit_tags(client, registered_model.version) == (SENTINEL_RUN, "FINISHED")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--skip", "wandb", "protoypes"], "unknown stage 'protoypes' in skip"),
        (["--set", "max_stepz=3"], "max_stepz"),
        (["--classes", "3"], "no-such-model"),
        (["--classes", "3", "--samples", "no-such-folder"], "no such image file or folder"),
        (["--classes", "3", "--methods", "ig,lrpp"], "lrpp"),
    ],
    ids=["skip", "config", "model-uri", "samples", "methods"],
)
def test_leap_audit_rejects_bad_input_before_a_server_starts(
    pipeline_home, registered_model, tmp_path, args, message
) -> None:
    """No PREFECT_API_URL: a Prefect server would be started (and would create its database)."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    uri = "models:/no-such-model@champion" if message == "no-such-model" else registered_model.uri
    home = tmp_path / "prefect-home"
    home.mkdir()
    env = {**os.environ, "PREFECT_HOME": str(home), "PYTHONPATH": str(Path(__file__).parents[2])}
    env.pop("PREFECT_API_URL", None)
    client = _client()
    before = len(_runs(client, "leapcore-audits"))
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "leapcli", "audit", uri, *args, "--no-progress"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    seconds = time.monotonic() - began
    assert done.returncode == 1, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("leap: ") and message in lines[0], lines
    assert not list(home.rglob("*.db")), "a Prefect server was started"
    assert len(_runs(client, "leapcore-audits")) == before
    # Imports only (a few seconds on an idle machine); no server start and no model download.
    print(f"rejected in {seconds:.1f} s")
