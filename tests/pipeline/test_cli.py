"""The ``leap`` console script: help everywhere, light imports, audits and the demo end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from leapcli.cli import main
from tests.pipeline.conftest import tiny_config

LEAP = [sys.executable, "-m", "leapcli"]


@pytest.mark.parametrize("command", [[], ["audit"], ["explain"], ["demo"], ["services"], ["diff"]])
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


def test_services_prints_how_to_start_the_servers_and_server_is_a_hidden_old_name(capsys) -> None:
    assert main(["services"]) == 0
    out = capsys.readouterr().out
    assert (
        "prefect server start --host 127.0.0.1" in out and "mlflow server --host 127.0.0.1" in out
    )
    assert main(["server"]) == 0
    old = capsys.readouterr()
    assert old.out == out and "`leap server` is now `leap services`" in old.err
    with pytest.raises(SystemExit):
        main(["--help"])
    listed = capsys.readouterr().out
    assert "    services " in listed and "    server " not in listed


def test_version(capsys) -> None:
    from leapcore import __version__

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert (
        done.value.code == 0 and capsys.readouterr().out.strip() == f"leap (leapcore) {__version__}"
    )


def test_help_imports_no_heavy_module_and_takes_under_half_a_second() -> None:
    """``leap --help`` without PyTorch, pandas, numpy, pydantic or any service; the import and the
    help itself (the interpreter's own start-up aside) take < 0.5 s: the best of three runs."""
    code = (
        "import sys, time, contextlib, io\n"
        "began = time.perf_counter()\n"
        "from leapcli.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    main(['audit', '--help'])\n"
        "took = time.perf_counter() - began\n"
        "heavy = {'torch', 'pandas', 'numpy', 'pydantic', 'prefect', 'mlflow', 'wandb', 'rich'}\n"
        "print(took, sorted(heavy & {m.split('.')[0] for m in sys.modules}))\n"
    )
    runs = []
    for _ in range(3):
        done = subprocess.run(
            [sys.executable, "-c", code],
            check=True,
            capture_output=True,
            text=True,
            cwd=Path(__file__).parents[2],
        )
        took, heavy = done.stdout.split(" ", 1)
        assert heavy.strip() == "[]", heavy
        runs.append(float(took))
    assert min(runs) < 0.5, runs


def test_classes_take_spaces_or_commas_and_a_split_name_gets_a_hint(capsys) -> None:
    from leapcli.cli import _announce_classes, _classes, _hint
    from leapcore.errors import InputError

    assert _classes(["0,1"]) == [0, 1]
    assert _classes(["0", "1"]) == [0, 1]
    assert _classes(["tabby,", "golden retriever", "1+7"]) == ["tabby", "golden retriever", "1+7"]
    assert _classes(None) is None
    err = InputError("the model has no class named 'golden'. Did you mean 'golden retriever'?")
    assert '--classes "golden retriever"' in _hint(err, ["golden", "retriever"])
    assert _hint(err, ["golden"]) == ""
    _announce_classes(None, "audit")
    assert "No --classes given: auditing class 0" in capsys.readouterr().out
    _announce_classes(["1"], "audit")
    assert capsys.readouterr().out == ""


def test_skip_help_names_the_stages_the_flows_accept() -> None:
    from flows.audit import stage_aliases, stage_names
    from flows.explain import ALIASES as EXPLAIN_ALIASES
    from leapcli.skip import EXPLAIN_SKIP, SKIP_STAGES

    aliases, stages = stage_aliases(), stage_names()  # the analysis stages' included
    for short, text in SKIP_STAGES.items():
        assert aliases.get(short, short) == text.split()[0] and text.split()[0] in stages
    assert set(EXPLAIN_SKIP) == set(EXPLAIN_ALIASES)
    shown = {aliases.get(s, s) for s in SKIP_STAGES}
    assert shown == set(stages) - {"fetch_model"}  # every stage that can be switched off


def test_progress_bars_count_steps(tmp_path) -> None:
    import io
    import logging

    from rich.console import Console

    from leapcli.cli import ProgressDisplay
    from leapcore.progress import _listeners, report

    out = io.StringIO()
    console = Console(file=out, width=120, force_terminal=False)
    pipeline = logging.getLogger("leapcore.pipeline")
    with ProgressDisplay(True, console=console) as display:
        for stage in ("fetch_model", "isolate_features"):
            pipeline.info("s", extra={"leap_stage": stage, "leap_event": "start"})
        report("isolate_features", 4, 12)  # what the engine's mask loop sends every log_freq steps
        logging.getLogger("leapcore.isolation").info("isolation step %d/%d", 9, 12)  # text: ignored
        tasks = {t.description: t for t in display.progress.tasks}
        assert (tasks["isolate_features"].completed, tasks["isolate_features"].total) == (4, 12)
        assert (tasks["fetch_model"].completed, tasks["fetch_model"].total) == (0, 1)
        pipeline.info(
            "e", extra={"leap_stage": "fetch_model", "leap_event": "end", "leap_state": "Completed"}
        )
        assert tasks["fetch_model"].completed == 1
        display.progress.refresh()
    assert "4/12" in out.getvalue() and "1/1" in out.getvalue()
    assert display.on_progress not in _listeners  # unsubscribed when the display closes


def test_explain_prints_each_image_top_classes(tmp_path, capsys) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from leapcli.cli import _report
    from leapcore.results import samples_to_arrow
    from tasks.runtime import AuditResult

    tables = tmp_path / "tables"
    tables.mkdir()
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 0.0]])
    pq.write_table(
        samples_to_arrow(torch.zeros(2, 1, 4, 4), logits, ["a.png", "b.png"]),
        tables / "samples.parquet",
    )
    pq.write_table(pa.table({"class_name": ["cat", "dog", "fox"]}), tables / "model.parquet")
    result = AuditResult(flow_run_id="f", model_uri="m", output_dir=str(tmp_path))
    _report(result, False, "explain")
    out = capsys.readouterr().out
    probs = logits.softmax(1)
    assert f"a.png: dog ({float(probs[0, 1]):.3f}), fox ({float(probs[0, 2]):.3f})" in out
    assert f"b.png: cat ({float(probs[1, 0]):.3f})" in out
    assert "(wall time)" in out


def test_importing_leapcore_and_its_cli_imports_no_pipeline_service() -> None:
    code = (
        "import sys, leapcore, leapcli.cli, leapcore.report\n"
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
    # Nothing but leap's own lines: no INFO lines of MLflow, alembic or Prefect, no banners.
    for output in (bad.stdout, bad.stderr, done.stderr):
        assert " INFO " not in output and "INFO  [" not in output, output[-2000:]
        assert "Starting temporary server" not in output


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


def test_a_rejected_input_leaves_no_stop_request_behind(tmp_path, capsys) -> None:
    """``main()`` called in-process (tests, notebooks): a typo must not leave the engine's stop
    flag set, or the next ``engine.run`` in the process stops at its first step."""
    from leapcore import stopping

    stopping.clear()
    code = main(["audit", str(tmp_path / "missing.pt"), "--classes", "1", "--no-progress"])
    assert code == 1 and "no such model file or folder" in capsys.readouterr().err
    assert not stopping.requested()
