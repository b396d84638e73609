"""``audit_model`` on two versions of one registered model (real MLflow SQLite registry, Prefect's
temporary server, W&B offline): the second audit is diffed against the first.

Version 2 is the same CNN (the engine tests' diff test bed) trained with 60 % of the 8s labelled 3;
audited with the default objective (margin) and held-out digits as the user's samples (the default
pair measure ``samples``), it must name the pair digit-3 / digit-8 first, tag the version, describe
the change in the version's description, show the report section, log a W&B table and emit the
drift event.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from torch import nn

from tests.engine.diff_support import train_version
from tests.engine.engine_support import Normalise
from tests.pipeline.conftest import DIGITS, SHAPE, tiny_config
from tests.pipeline.support import flow_run_logs, wandb_contents

pytestmark = [pytest.mark.services, pytest.mark.slow, pytest.mark.timeout(600)]

NAME = "digits-diff"
TARGETS = list(range(10))
CONFIG = tiny_config(max_steps=30, find_lr_steps=0, lr=0.05)  # the default objective, margin


def _sample_folder(root: Path, per_class: int = 5) -> Path:
    """Held-out digits (no version trained on them) as PNG files: the user's samples."""
    from PIL import Image

    from tests.engine.diff_support import held_out_digits

    folder = root / "samples"
    folder.mkdir()
    images, labels = held_out_digits(per_class)
    for i, (image, label) in enumerate(zip(images, labels.tolist())):
        pixels = (image[0] * 255).round().byte().numpy()
        Image.fromarray(pixels, mode="L").save(folder / f"{label}-{i:03d}.png")
    return folder


def _version(merge: bool) -> nn.Module:
    """The engine tests' digits CNN (its normalisation inside), 3 and 8 merged when ``merge``."""
    return nn.Sequential(Normalise(), train_version((3, 8) if merge else None)).eval()


def _client():
    from mlflow import MlflowClient

    uri = os.environ["MLFLOW_TRACKING_URI"]
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.fixture(scope="module")
def two_audits(prefect_server, pipeline_home, tmp_path_factory):
    """Register v1 (clean) and v2 (3 and 8 merged in part of the data), audit both."""
    import mlflow

    from flows import audit_model
    from tasks.mlflow_models import log_model_with_metadata

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    mlflow.set_experiment("pipeline-diff-models")
    uris = []
    for merge in (False, True):
        with mlflow.start_run():
            ref = log_model_with_metadata(
                _version(merge), DIGITS, input_shape=SHAPE, registered_model_name=NAME
            )
        uris.append(ref.uri)
    assert uris == [f"models:/{NAME}/1", f"models:/{NAME}/2"]
    store = str(tmp_path_factory.mktemp("diff-store"))
    samples = _sample_folder(tmp_path_factory.mktemp("diff-samples"))
    results = []
    for uri, skip in zip(uris, (["wandb"], [])):  # W&B is checked on the second audit only
        out = tmp_path_factory.mktemp("diff-out")
        given = str(samples) if uri.endswith("/2") else None  # the diff runs at v2
        results.append(
            audit_model(
                uri, TARGETS, CONFIG, skip, artifact_store=store, output_dir=str(out), samples=given
            )
        )
    return results


def test_the_first_version_has_nothing_to_compare_with(two_audits):
    first = two_audits[0]
    assert first.stages["diff_audits"] == "Skipped"
    logs = flow_run_logs(first.flow_run_id)
    assert "diff_audits skipped: no version of digits-diff before v1 has a finished audit" in logs
    assert not (Path(first.output_dir) / "tables" / "diff.parquet").exists()
    assert "leapcore.diff.previous_version" not in _client().get_model_version(NAME, "1").tags


def test_the_second_audit_names_the_merged_pair_first(two_audits):
    second = two_audits[1]
    assert second.stages["diff_audits"] == "Completed"
    timing = [
        x
        for x in flow_run_logs(second.flow_run_id).splitlines()
        if "diff_audits: Completed in" in x
    ]
    assert timing, "the stage's time is logged"
    print(f"\n{timing[0]} (whole audit {second.seconds:.1f} s)")
    table = pq.read_table(Path(second.output_dir) / "tables" / "diff.parquet")
    pairs = [r for r in table.to_pylist() if r["kind"] == "entanglement"]
    assert {pairs[0]["target"], pairs[0]["other"]} == {"digit-3", "digit-8"}, pairs[:3]
    assert pairs[0]["flag"] == "entangled"
    assert pairs[0]["change"] - abs(pairs[1]["change"]) >= 0.25, pairs[:3]
    assert "samples)" in pairs[0]["detail"]  # measured on the user's samples
    protos = [r for r in table.to_pylist() if r["kind"] == "prototype"]
    assert len(protos) == 10 and all(-1 <= r["cosine_current_model"] <= 1 for r in protos)
    assert second.metrics["diff/max_entanglement_change"] == pytest.approx(pairs[0]["change"])

    version = _client().get_model_version(NAME, "2")
    assert version.tags["leapcore.diff.previous_version"] == "1"
    assert version.tags["leapcore.diff.pair_basis"] == "samples"
    assert version.tags["leapcore.diff.judged_on"] == "the change on your samples"
    assert version.tags["leapcore.diff.top_pair"].startswith(
        ("digit-3 <-> digit-8", "digit-8 <-> digit-3")
    )
    assert "Changes since digits-diff v1" in version.description
    assert "became entangled" in version.description
    run = _client().get_run(second.mlflow_run_id)
    assert run.data.metrics["diff/entangled_pairs"] >= 1
    assert run.data.tags["leapcore.diff.previous_run_id"] == two_audits[0].mlflow_run_id
    assert "tables/diff.parquet" in [
        a.path for a in _client().list_artifacts(second.mlflow_run_id, "tables")
    ]


def test_the_report_shows_the_section(two_audits):
    page = (Path(two_audits[1].output_dir) / "report.html").read_text()
    assert "Changes since the previous version" in page
    assert "Compared with <b>digits-diff v1</b>" in page
    assert "digit-3 ↔ digit-8" in page or "digit-8 ↔ digit-3" in page
    at = page.index('<section id="diff">')
    assert page.index('id="summary"') < at < page.index('<section id="prototypes">')
    look = page[page.index('class="look"') :].split("</ol>")[0]
    assert "Since digits-diff v1: digit-" in look and "became entangled" in look
    first = (Path(two_audits[0].output_dir) / "report.html").read_text()
    assert "Changes since the previous version" not in first


def test_the_diff_is_a_wandb_table(two_audits):
    contents = wandb_contents(two_audits[1].wandb_run_dir)
    table = pq.read_table(Path(two_audits[1].output_dir) / "tables" / "diff.parquet")
    assert contents["history"].get("diff.nrows") == table.num_rows, sorted(contents["history"])
    assert contents["history"].get("diff.ncols") == table.num_columns


def test_the_drift_event_reaches_prefect(two_audits):
    from tests.deployments.deploy_support import prefect_events, wait_for

    events = wait_for(
        lambda: prefect_events(f"leapcore.model.{NAME}", "leapcore.audit.drift"),
        30,
        what="the drift event",
    )
    (event,) = events
    payload = event["payload"]
    assert payload["version"] == "2" and payload["previous_version"] == "1"
    assert payload["entangled"][0].startswith(("digit-3 <-> digit-8", "digit-8 <-> digit-3"))
    assert (
        payload["pair_basis"] == "samples" and payload["judged_on"] == "the change on your samples"
    )
    assert "(pairs on samples, judged against the change on your samples)" in payload["summary"]
    assert event["resource"]["leapcore.model_version"] == "2"


def test_leap_diff_compares_two_versions_and_logs_to_mlflow(two_audits, tmp_path, capsys):
    from leapcli.cli import main

    out = tmp_path / "diff"
    samples = _sample_folder(tmp_path)
    code = main(
        [
            "diff",
            f"models:/{NAME}/1",
            f"models:/{NAME}/2",
            "--output-dir",
            str(out),
            "--mlflow",
            "--samples",
            str(samples),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    lines = printed.splitlines()
    first = lines[lines.index(next(x for x in lines if x.startswith("pairs"))) + 1]
    assert first.split()[:3] in (["digit-3", "<->", "digit-8"], ["digit-8", "<->", "digit-3"])
    assert "entangled" in first
    assert "the threshold judged against the change on your samples" in printed
    table = pq.read_table(out / "diff.parquet")
    stage = pq.read_table(Path(two_audits[1].output_dir) / "tables" / "diff.parquet")
    # The same comparison as the audit's own stage (same tables, models and samples; the stage
    # reads the samples with the model's eval transform, leap diff at the prototypes' size).
    assert table.column("change").to_pylist() == pytest.approx(
        stage.column("change").to_pylist(), abs=1e-4
    )
    assert "Changes since the previous version" in (out / "diff.html").read_text()
    run_id = printed.rsplit("MLflow run: ", 1)[1].split()[0]
    run = _client().get_run(run_id)
    assert run.data.tags["leapcore.kind"] == "diff"
    assert run.data.tags["leapcore.diff.current_run_id"] == two_audits[1].mlflow_run_id
    assert run.data.metrics["diff/entangled_pairs"] >= 1

    # Run ids work too; without the models the pairs are each model's on its own prototypes.
    by_runs = tmp_path / "by-runs"
    runs = [r.mlflow_run_id for r in two_audits]
    assert main(["diff", *runs, "--output-dir", str(by_runs), "--no-models"]) == 0
    assert "pair measure 'own' (each model on its own prototypes)" in capsys.readouterr().out
    again = pq.read_table(by_runs / "diff.parquet")
    pairs = [r for r in again.to_pylist() if r["kind"] == "entanglement"]
    assert len(pairs) == 45 and all("(on own prototypes)" in r["detail"] for r in pairs)
    assert not [r for r in again.to_pylist() if r["kind"] == "prototype"]
    # The thresholds come from a config file; a flag wins over it.
    config = tmp_path / "diff.json"
    config.write_text(
        '{"diff_entanglement_threshold": 0.95, "diff_quality_threshold": 0.5, '
        '"diff_prototype_noise": 0.6}'
    )
    strict = tmp_path / "strict"
    args = ["diff", *runs, "--output-dir", str(strict), "--no-models", "--config", str(config)]
    assert main([*args, "--quality-threshold", "0.3"]) == 0
    meta = pq.read_table(strict / "diff.parquet").schema.metadata[b"leapcore.thresholds"]
    thresholds = {"entanglement": 0.95, "quality": 0.3, "similarity": 0.5, "prototype_noise": 0.6}
    assert json.loads(meta) == thresholds


def test_leap_diff_refuses_what_has_no_audit(two_audits, tmp_path, capsys):
    from leapcli.cli import main

    out = tmp_path / "nothing"
    assert main(["diff", f"models:/{NAME}/1", f"models:/{NAME}/9", "--output-dir", str(out)]) == 1
    assert "has no version 9 of 'digits-diff'" in capsys.readouterr().err
    assert main(["diff", "0" * 32, f"models:/{NAME}/2", "--output-dir", str(out)]) == 1
    assert f"MLflow has no run {'0' * 32}" in capsys.readouterr().err
    assert not out.exists()
    bad = tmp_path / "bad.json"
    bad.write_text('{"diff_entanglement_threshold": -1}')
    assert main(["diff", "0" * 32, "1" * 32, "--config", str(bad), "--output-dir", str(out)]) == 1
    assert "diff_entanglement_threshold" in capsys.readouterr().err
    assert not out.exists()


def test_a_version_with_other_classes_is_not_compared_and_still_audited(
    two_audits, tmp_path_factory
):
    """v3 of the same registered name, but a model of other classes: the audit completes, its diff
    stage is skipped and says why (the refusal names both)."""
    import mlflow

    from flows import audit_model
    from tasks.mlflow_models import log_model_with_metadata

    letters = [f"letter-{c}" for c in "abcdefghij"]
    with mlflow.start_run():
        ref = log_model_with_metadata(
            _version(False), letters, input_shape=SHAPE, registered_model_name=NAME
        )
    assert ref.uri == f"models:/{NAME}/3"
    config = tiny_config(max_steps=4, find_lr_steps=0, lr=0.05, isolation=False)
    out = tmp_path_factory.mktemp("diff-other")
    result = audit_model(ref.uri, [0], config, skip=["wandb"], output_dir=str(out))
    assert result.stages["diff_audits"] == "Skipped"
    assert result.stages["publish_mlflow"] == "Completed"
    logs = flow_run_logs(result.flow_run_id)
    assert "digits-diff v2 and digits-diff v3 are different models" in logs
    assert "letter-a" in logs and "digit-0" in logs
    assert "leapcore.diff.previous_version" not in _client().get_model_version(NAME, "3").tags
