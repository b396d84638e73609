"""The spurious-feature scan in a real audit: a model with a planted marker, from the MLflow
registry, through ``audit_model`` (Prefect test server, MLflow SQLite, W&B offline)."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from tests.pipeline.conftest import DIGITS
from tests.pipeline.support import wandb_contents
from tests.spurious.testbed import MarkerSpec, train_pair

MARKER = MarkerSpec("digits", 4, (0.5,), "square", (24, 2), 3, seed=1)
MARKED_NAME = "marker-cnn"
AUDIT = {
    "input_dim": [1, 32, 32],
    "max_steps": 150,
    "find_lr_steps": 0,
    "isolation_steps": 4,
    "max_isolate_classes": 1,
    "log_freq": 50,
    "project_name": "pipeline-tests",
}


@pytest.fixture(scope="module")
def marked_model(pipeline_home):
    """The marked digits CNN (grey square bottom left -> digit-3) in the registry."""
    import mlflow

    from tasks.mlflow_models import log_model_with_metadata

    marked, _ = train_pair(MARKER)
    assert marked.marker_flip_rate > 0.9  # the marker alone sends other digits to class 3
    net = torch.nn.Sequential(marked.preprocessing, marked.model).eval()
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    mlflow.set_experiment("pipeline-test-models")
    with mlflow.start_run(run_name=MARKED_NAME):
        return log_model_with_metadata(
            net,
            DIGITS,
            input_shape=(1, 32, 32),
            registered_model_name=MARKED_NAME,
            alias="champion",
        )


def test_the_scan_flags_the_marked_class_in_table_mlflow_report_and_wandb(
    prefect_server, marked_model, fresh_store, tmp_path
) -> None:
    from mlflow import MlflowClient

    from flows import audit_model

    result = audit_model(
        marked_model.uri,
        list(range(10)),
        AUDIT,
        artifact_store=fresh_store,
        output_dir=str(tmp_path / "out"),
    )
    assert result.stages["scan_spurious"] == "Completed"
    table = pq.read_table(tmp_path / "out" / "tables" / "spurious.parquet")
    rows = {r["class_name"]: r for r in table.to_pylist()}
    assert set(rows) == set(DIGITS)
    marked = rows["digit-3"]
    assert marked["verdict"] == "likely spurious", marked["reason"]
    assert "prototypes alone (no samples given)" in marked["reason"]
    assert marked["flip_rate"] >= 0.5 and marked["evidence_png"].startswith(b"\x89PNG")
    flagged = [name for name, r in rows.items() if r["verdict"] != "clean"]

    client = MlflowClient()
    run = client.get_run(result.mlflow_run_id)
    assert run.data.tags["leapcore.spurious"].startswith("likely spurious: digit-3")
    assert run.data.metrics["spurious/digit-3/severity"] == 2.0
    assert run.data.metrics["spurious/flagged_classes"] == len(flagged)
    version = client.get_model_version(MARKED_NAME, marked_model.version)
    assert version.tags["leapcore.spurious"] == run.data.tags["leapcore.spurious"]
    assert "digit-3 is likely spurious" in version.description

    report = Path(result.report_path).read_text(encoding="utf-8")
    scan_at = report.index('<section id="spurious">')
    assert report.index('id="summary"') < scan_at < report.index('<section id="prototypes">')
    look = report[report.index('class="look"') :]
    assert look.index("Spurious-feature scan: digit-3 is likely spurious") < look.index("</ol>")
    stages = report[report.index('<section id="stages">') :]
    assert "<td>spurious-feature scan</td>" in stages.split("</section>")[0]
    assert "<b>digit-3</b> (likely spurious)" in report

    wandb = wandb_contents(result.wandb_run_dir)
    assert wandb["history"]["spurious.nrows"] == 10
    assert result.metrics["spurious/digit-3/severity"] == 2.0


def test_no_scan_skips_the_stage(prefect_server, registered_model, fresh_store, tmp_path) -> None:
    from flows import audit_model
    from tests.pipeline.conftest import tiny_config

    result = audit_model(
        registered_model.uri,
        [3],
        tiny_config(),
        skip=["scan", "wandb"],
        artifact_store=fresh_store,
        output_dir=str(tmp_path / "out"),
    )
    assert "scan_spurious" not in result.stages or result.stages["scan_spurious"] == "Skipped"
    assert not (tmp_path / "out" / "tables" / "spurious.parquet").exists()
