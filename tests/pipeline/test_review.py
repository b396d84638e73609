"""Reviewing an audit as people do: the report and the ``mlflow ui`` page of the audit's run in a real
headless Chromium (no broken image, every section there, nothing wider than a 1280 px window,
screenshots kept), and what MLflow holds (the LoggedModel link, step metrics, keys, params,
experiment kind, the version's description)."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from tests.browser_support import PAGE_CHECK, Browser, find_chromium
from tests.pipeline.conftest import MODEL_NAME, tiny_config

pytestmark = pytest.mark.services
needs_browser = pytest.mark.skipif(find_chromium() is None, reason="no Chromium installed")
SCREENS = (
    Path(os.environ.get("LEAP_SCREENSHOTS", "")) if os.environ.get("LEAP_SCREENSHOTS") else None
)


def _client():
    from mlflow import MlflowClient

    return MlflowClient(os.environ["MLFLOW_TRACKING_URI"], os.environ["MLFLOW_REGISTRY_URI"])


@pytest.fixture(scope="module")
def audit(prefect_server, registered_model, tmp_path_factory):
    from flows import audit_model

    root = tmp_path_factory.mktemp("review")
    return audit_model(
        registered_model.uri,
        [3, "digit-7"],
        tiny_config(output_dir=str(root / "config-output"), wandb_entity="someone"),
        artifact_store=str(root / "store"),
        output_dir=str(root / "out"),
        skip=["wandb"],
    )


@pytest.fixture
def screenshot_dir(tmp_path: Path) -> Path:
    """``LEAP_SCREENSHOTS`` when set (kept for the closing note), else the test's tmp folder."""
    return SCREENS if SCREENS is not None else tmp_path


def test_mlflow_links_the_audit_to_the_logged_model_with_step_metrics(
    audit, registered_model
) -> None:
    client = _client()
    run = client.get_run(audit.mlflow_run_id)
    version = client.get_model_version(MODEL_NAME, registered_model.version)
    model_id = version.model_id or version.source.removeprefix("models:/")
    assert client.get_logged_model(model_id).name == "model"  # MLflow 3 logged it as a LoggedModel
    # The model is the run's input, and the audit's numbers show on the model.
    assert [m.model_id for m in run.inputs.model_inputs] == [model_id]
    on_model = {m.key: m for m in client.get_logged_model(model_id).metrics}
    assert on_model["target_prob/3_digit_3"].run_id == audit.mlflow_run_id
    assert on_model["target_prob/3_digit_3"].value == pytest.approx(
        run.data.metrics["target_prob/3_digit_3"]
    )
    # Keys without spaces; trajectories as step metrics, one point per logged step.
    assert all(re.fullmatch(r"[A-Za-z0-9_\-./]+", key) for key in run.data.metrics)
    history = client.get_metric_history(audit.mlflow_run_id, "target_prob_trajectory/3_digit_3/0")
    steps = [m.step for m in history]
    assert len(steps) >= 3 and steps == sorted(steps) and steps[0] == 0
    import pyarrow.parquet as pq

    table = pq.read_table(Path(audit.output_dir) / "tables" / "trajectories.parquet").to_pylist()
    expected = {r["step"]: r["prob"] for r in table if r["row"] == 0 and r["class_index"] == 3}
    assert {m.step: m.value for m in history} == pytest.approx(expected)
    # Options only; where files go and which W&B team are not parameters of the audit.
    params = run.data.params
    assert params["max_steps"] == "12"
    for environment in ("output_dir", "wandb_entity", "project_name", "wandb_api_key"):
        assert environment not in params, environment
    # Classic ML in MLflow 3's UI, not GenAI.
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    # The version says where its audit is.
    run_link = f"#/experiments/{run.info.experiment_id}/runs/{audit.mlflow_run_id}"
    assert f"]({run_link}?workflowType=machine_learning)" in version.description
    assert (
        f"]({run_link}/artifacts/report.html?workflowType=machine_learning)" in version.description
    )
    assert audit.mlflow_run_page == run_link.replace("#", "#", 1) + "?workflowType=machine_learning"
    assert any(audit.mlflow_run_page in line for line in audit.where_to_look())


def test_the_pipeline_report_names_this_run(audit) -> None:
    page = Path(audit.report_path).read_text()
    assert audit.mlflow_run_id in page and audit.flow_run_id in page
    assert "<!--leapcore:provenance-->" not in page


@needs_browser
def test_the_report_reads_well_in_chromium(audit, screenshot_dir) -> None:
    with Browser(width=1280, height=900) as browser:
        browser.goto(Path(audit.report_path).resolve().as_uri())
        seen = browser.evaluate(PAGE_CHECK)
        browser.screenshot(screenshot_dir / "report.png")
    broken = [i["alt"] for i in seen["images"] if not i["loaded"]]
    assert not broken, broken
    assert len(seen["images"]) >= 2 + 2 + 4  # prototypes, plots, isolations
    shown = {s["id"] for s in seen["sections"] if s["height"] > 10}
    expected = {"provenance", "summary", "prototypes", "entanglement", "isolation", "configuration"}
    assert expected <= shown, expected - shown
    assert seen["scrollWidth"] <= 1280, seen["wide"]
    assert (screenshot_dir / "report.png").stat().st_size > 20_000


@needs_browser
def test_the_mlflow_ui_shows_the_audit_run(
    audit, registered_model, pipeline_home, screenshot_dir
) -> None:
    from tests.deployments.deploy_support import BIN, LOOPBACK, base_env, free_port, server_process

    client = _client()
    run = client.get_run(audit.mlflow_run_id)
    port = free_port()
    cmd = [
        str(BIN / "mlflow"),
        "server",
        "--backend-store-uri",
        os.environ["MLFLOW_TRACKING_URI"],
        "--host",
        LOOPBACK,
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    env = base_env(pipeline_home)
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    base = f"http://{LOOPBACK}:{port}"
    page = f"{base}/{audit.mlflow_run_page}"
    with (
        server_process(
            "mlflow ui", cmd, env, pipeline_home / "mlflow-ui.log", f"{base}/health", timeout=90
        ),
        Browser(width=1280, height=900, timeout=90) as browser,
    ):
        browser.goto(page)
        # The run page renders client-side: wait for the run's name and a metric key.
        text = "document.body && document.body.innerText"
        browser.wait_for(f"({text} || '').includes({run.info.run_name!r})", timeout=90)
        browser.wait_for(f"({text} || '').includes('target_prob/3_digit_3')", timeout=60)
        seen = browser.evaluate(PAGE_CHECK)
        body = browser.evaluate(text)
        browser.screenshot(screenshot_dir / "mlflow-run.png", full_page=False)
        # The step metrics as charts on the run's "Model metrics" tab.
        charts = audit.mlflow_run_page.replace("?", "/model-metrics?", 1)
        browser.goto(f"{base}/{charts}")
        # chart titles are SVG text: textContent, not innerText
        browser.wait_for(
            "(document.body.textContent || '').includes('target_prob_trajectory')", timeout=60
        )
        # Show the trajectories: type into the chart search box as a person would.
        browser.evaluate("document.querySelector('input[placeholder*=\"Search\"]').focus()")
        browser.send("Input.insertText", text="target_prob_trajectory")
        time.sleep(3)  # let the charts draw before the screenshot
        browser.screenshot(screenshot_dir / "mlflow-model-metrics.png", full_page=False)
        # The model version's page: its description links the audit (markdown, marker hidden).
        browser.goto(f"{base}/#/models/{MODEL_NAME}/versions/{registered_model.version}")
        browser.wait_for(f"({text} || '').includes('leapcore audit')", timeout=60)
        version_text = browser.evaluate(text)
        links = browser.evaluate("Array.from(document.links).map(a => a.getAttribute('href'))")
        browser.screenshot(screenshot_dir / "mlflow-model-version.png", full_page=False)
    broken = [i["alt"] for i in seen["images"] if not i["loaded"]]
    assert not broken, broken
    assert "max_steps" in body  # params table
    # The classic ML pages (runs, models, registry), not the GenAI ones (judges, agents).
    assert "Model registry" in body and "Judges" not in body and "Agent versions" not in body
    assert "output_dir" not in body and "wandb_entity" not in body
    assert seen["scrollWidth"] <= 1280, seen["wide"]
    assert "<!--" not in version_text and "mean target probability" in version_text
    assert any(audit.mlflow_run_id in (link or "") for link in links), links
