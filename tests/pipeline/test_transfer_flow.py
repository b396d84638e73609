"""The ``transfer`` analysis stage: prototypes shown to the config's ``reference_models``.

One audit with two references (the audited model itself and an untrained twin from the registry):
the transfer table, the MLflow metrics and tag, the report section, the Parquet artifact and the W&B
table, read back from where each is written. A reference of another width is refused, naming both.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.pipeline.conftest import DIGITS, SHAPE, DigitsCNN, tiny_config


def _register(name: str, model: torch.nn.Module, classes: list[str]) -> str:
    import mlflow

    from tasks.mlflow_models import log_model_with_metadata

    mlflow.set_experiment("pipeline-test-models")
    with mlflow.start_run(run_name=name):
        ref = log_model_with_metadata(
            model, classes, input_shape=SHAPE, registered_model_name=name, alias="champion"
        )
    return ref.uri


@pytest.fixture(scope="module")
def twin_uri(prefect_server) -> str:
    """An untrained digits CNN in the registry: it believes none of the prototypes."""
    torch.manual_seed(7)
    return _register("digits-twin", DigitsCNN().eval(), DIGITS)


@pytest.fixture(scope="module")
def narrow_uri(prefect_server) -> str:
    """A three-class model: a reference the audit must refuse."""
    torch.manual_seed(8)
    net = DigitsCNN()
    net.head = torch.nn.Linear(16 * 16, 3)
    return _register("digits-three", net.eval(), ["a", "b", "c"])


def test_transfer_stage_measures_and_publishes_every_reference(
    prefect_server, registered_model, twin_uri, fresh_store, tmp_path
) -> None:
    import pyarrow.parquet as pq
    from mlflow import MlflowClient

    from flows import audit_model
    from leapcore.report import slug
    from tasks import ArtifactStore
    from tasks.wandb_records import wandb_records
    from tests.pipeline.support import wandb_contents

    refs = [registered_model.uri, twin_uri]
    result = audit_model(
        registered_model.uri,
        target_classes=[0, 3, 7],
        config=tiny_config(
            reference_models=refs, isolation=False, max_steps=40, find_lr_steps=0, lr=0.05
        ),
        artifact_store=fresh_store,
        output_dir=str(tmp_path / "out"),
        skip=["export"],
    )
    assert result.stages["transfer"] == "Completed"
    store = ArtifactStore(fresh_store)
    table = store.get_table(result.outputs["transfer"].refs["transfer"])
    rows = table.to_pylist()
    assert len(rows) == 3 * 2 and {r["reference"] for r in rows} == set(refs)
    own = [r for r in rows if r["reference"] == registered_model.uri]
    twin = [r for r in rows if r["reference"] == twin_uri]
    # On the audited model itself, transfer is the prototype's own target probability.
    for r in own:
        assert r["target_prob"] == pytest.approx(r["own_prob"], abs=1e-4)
        assert r["low"] == (r["target_prob"] < 0.5)
    # The untrained twin does not believe them: about chance, every one flagged.
    assert max(r["target_prob"] for r in twin) < 0.3
    assert all(r["low"] for r in twin)
    assert all(r["own_prob"] > r["target_prob"] + 0.2 for r in twin)

    # MLflow: a metric per reference and target, the mean, and a tag naming the weak pairs.
    run = MlflowClient().get_run(result.mlflow_run_id)
    labels = {r["reference"]: r["reference_label"] for r in rows}
    for r in rows:
        name = f"transfer/{r['reference_label']}/{r['target_classes'][0]}_{slug(r['target'])}"
        assert run.data.metrics[name] == pytest.approx(r["target_prob"], abs=1e-6)
    twin_label = labels[twin_uri]
    assert run.data.metrics[f"transfer/{twin_label}/low"] == 3
    assert result.metrics[f"transfer/{twin_label}/mean"] == pytest.approx(
        sum(r["target_prob"] for r in twin) / 3, abs=1e-6
    )
    tag = run.data.tags["leapcore.transfer_low"]
    assert tag.count(f"@{twin_label}") == 3 and f"@{labels[registered_model.uri]}" not in tag
    local = MlflowClient().download_artifacts(result.mlflow_run_id, "tables/transfer.parquet")
    assert pq.read_table(local).equals(table)

    # The report's section shows both probabilities and flags the twin's.
    page = store.get_bytes(result.outputs["render_report"].report).decode("utf-8")
    assert "Transfer to reference models" in page
    low = sum(r["low"] for r in rows)
    assert f"{low} prototype-reference pair(s) below 0.5" in page
    for r in rows:
        assert f"{r['target_prob']:.3f}" in page

    # W&B: the transfer table, read back from the offline run's files.
    wandb = wandb_contents(result.wandb_run_dir)
    assert wandb["history"]["transfer.nrows"] == 6
    files = {}
    for record in wandb_records(result.wandb_run_dir):
        if record.WhichOneof("record_type") == "artifact" and record.artifact.name.endswith(
            "-transfer"
        ):
            files = {e.path: Path(e.local_path) for e in record.artifact.manifest.contents}
    logged = json.loads(files["transfer.table.json"].read_text())
    got = {(d[0], d[2]): d[4] for d in logged["data"]}
    for r in rows:
        assert got[(r["target"], r["reference"])] == pytest.approx(r["target_prob"], abs=1e-6)


def test_reference_of_another_width_is_refused_naming_both(
    prefect_server, registered_model, narrow_uri, fresh_store
) -> None:
    from leapcore.config import load_config
    from leapcore.errors import InputError
    from tasks import ArtifactStore, fetch_model, locate_model, tracking_uri
    from tasks.transfer import check_reference_models

    store = ArtifactStore(fresh_store)
    model = fetch_model.fn(locate_model(registered_model.uri, None, tracking_uri()), store)
    config = load_config(tiny_config(reference_models=[narrow_uri]))
    with pytest.raises(InputError, match=r"has 3 outputs but the audited model has 10 classes"):
        check_reference_models(config, model, store)
    ok = check_reference_models(load_config(tiny_config()), model, store)
    assert ok == []
