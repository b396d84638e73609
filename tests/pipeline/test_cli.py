"""The ``leap`` console script: help everywhere, light imports, audits and the demo end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from leapcore.cli import main
from tests.pipeline.conftest import tiny_config

LEAP = [sys.executable, "-m", "leapcore.cli"]


@pytest.mark.parametrize("command", [[], ["audit"], ["explain"], ["demo"], ["server"]])
def test_every_subcommand_has_help(command: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as done:
        main([*command, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: leap")
    if command == ["audit"]:
        for option in (
            "--classes",
            "--config",
            "--skip",
            "--chunk-size",
            "--task-runner",
            "--store",
        ):
            assert option in out


def test_serve_delegates_to_the_deployments(capsys) -> None:
    with pytest.raises(SystemExit) as done:
        main(["serve", "--help"])
    assert done.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_server_prints_how_to_start_the_servers(capsys) -> None:
    assert main(["server"]) == 0
    out = capsys.readouterr().out
    assert (
        "prefect server start --host 127.0.0.1" in out and "mlflow server --host 127.0.0.1" in out
    )


def test_importing_leapcore_and_its_cli_imports_no_pipeline_service() -> None:
    code = (
        "import sys, leapcore, leapcore.cli, leapcore.report\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'prefect', 'mlflow', 'wandb'})\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


def _leap(args: list[str], prefect_server: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_server,
        "PYTHONPATH": str(Path(__file__).parents[2]),
    }
    return subprocess.run(
        [*LEAP, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=500
    )


@pytest.mark.services
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_leap_audit_runs_an_audit_and_reports_bad_input_plainly(
    prefect_server, registered_model, tmp_path
) -> None:
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps(tiny_config()))
    done = _leap(
        [
            "audit",
            registered_model.uri,
            "--classes",
            "3",
            "digit-7",
            "--config",
            str(config),
            "--set",
            "max_steps=8",
            "--skip",
            "wandb",
            "--store",
            str(tmp_path / "store"),
            "--output-dir",
            str(tmp_path / "out"),
            "--json",
        ],
        prefect_server,
        tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["targets"] == [[3], [7]]
    assert result["stages"]["optimise_prototypes"] == "Completed"
    assert result["stages"]["publish_wandb"] == "Skipped"
    assert Path(result["report_path"]).is_file()
    from mlflow import MlflowClient

    run = MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.params["max_steps"] == "8"

    bad = _leap(
        ["audit", registered_model.uri, "--classes", "digit-77", "--skip", "wandb", "mlflow"],
        prefect_server,
        tmp_path,
    )
    assert bad.returncode == 1
    assert "leap: InputError: the model has no class named 'digit-77'" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.services
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_leap_demo_registers_efficientnet_and_prints_where_to_look(
    prefect_server, pipeline_home, tmp_path
) -> None:
    """The README's main job, with a step budget that keeps the test short."""
    done = _leap(
        [
            "demo",
            "--classes",
            "goldfish",
            "--max-steps",
            "4",
            "--isolation-steps",
            "2",
            "--store",
            str(tmp_path / "store"),
            "--output-dir",
            str(tmp_path / "out"),
            "--no-progress",
        ],
        prefect_server,
        pipeline_home,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "models:/efficientnet-lite0@demo" in out
    assert "mlflow ui --backend-store-uri sqlite:///" in out
    assert "wandb sync " in out
    report = Path(out.split("Report:", 1)[1].split()[0])
    assert report.is_file() and "goldfish" in report.read_text()
    from mlflow import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"], os.environ["MLFLOW_REGISTRY_URI"])
    version = client.get_model_version_by_alias("efficientnet-lite0", "demo")
    assert version.tags["leapcore.audit_status"] == "FINISHED"
    assert (
        client.get_run(version.tags["leapcore.audit_run_id"]).data.metrics["target_prob/1_goldfish"]
        > 0
    )
