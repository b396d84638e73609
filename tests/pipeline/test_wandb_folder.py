"""The W&B publisher on its own (no Prefect server): an offline run folder holds the whole run.

Real W&B in offline mode; everything is read back from the run's ``.wandb`` records and files.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from leapcore import engine
from leapcore.results import audit_tables
from tasks.wandb_publish import Publication, publish
from tasks.wandb_records import wandb_records
from tests.pipeline.support import wandb_contents

CLASSES = ["zero", "one", "two"]


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3, stride=2), torch.nn.ReLU(), torch.nn.Flatten()
        )
        self.head = torch.nn.Linear(4 * 15 * 15, len(CLASSES))

    def forward(self, x):
        return self.head(self.net(x))


@pytest.fixture
def wandb_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name, folder in (
        ("WANDB_DIR", "wandb"),
        ("WANDB_DATA_DIR", "home-data"),
        ("WANDB_CACHE_DIR", "home-cache"),
        ("WANDB_CONFIG_DIR", "home-config"),
    ):
        (tmp_path / folder).mkdir()
        monkeypatch.setenv(name, str(tmp_path / folder))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_API_KEY", "WANDB_ENTITY"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


@pytest.fixture(scope="module")
def audit():
    config = {
        "max_steps": 6,
        "find_lr_steps": 0,
        "isolation_steps": 3,
        "input_dim": [3, 32, 32],
        "transform_samples": 1,
        "log_freq": 2,
    }
    return engine.run(Tiny(), CLASSES, config, target_classes=[0, 2])


def _manifest(run_dir: Path) -> dict[str, list]:
    found: dict[str, list] = {}
    for record in wandb_records(run_dir):
        if record.WhichOneof("record_type") == "artifact":
            art = record.artifact
            found[art.name] = [(e.path, e.local_path, e.digest) for e in art.manifest.contents]
    return found


def test_an_offline_folder_moved_elsewhere_holds_every_artifact_file(
    wandb_home: Path, audit
) -> None:
    tables = audit_tables(audit)
    # A quality column of the isolations table, published as it is (a known value stands in).
    iso = tables["isolations"]
    kept = (audit.isolation.logits_isolated / audit.isolation.logits_full).float().tolist()
    column = pa.array(kept, pa.float32())
    if "kept_logit" in iso.column_names:
        iso = iso.set_column(iso.column_names.index("kept_logit"), "kept_logit", column)
    else:
        iso = iso.append_column("kept_logit", column)
    tables["isolations"] = iso
    pub = Publication(
        audit=audit,
        tables=tables,
        params={"max_steps": 6},
        metrics={"target_prob/0_zero": 0.5},
        model={"name": "tiny", "uri": "models:/tiny/1", "digest": "abc123"},
        files={"tables/isolations.parquet": b"PAR1 not really"},
        report_html="<!DOCTYPE html><html><body><h1>audit of tiny</h1></body></html>",
        links={"mlflow_run_id": "0123abcd", "mlflow_tracking_uri": "http://127.0.0.1:5000"},
    )
    info = publish(pub, audit.config, project="folder-test", run_name="tiny audit")
    run_dir = Path(info.run_dir)
    assert info.mode == "offline" and info.sync_command == f"wandb sync {run_dir}"
    assert info.run_path == f"folder-test/{info.run_id}"

    before = _manifest(run_dir)
    moved = wandb_home / "elsewhere" / run_dir.name
    shutil.move(str(run_dir), moved)
    assert not run_dir.exists()
    # Every file of every artifact (tables logged as media, images, the Parquet files, the model
    # card) lies inside the moved folder, with the bytes the manifest's MD5 names.
    assert {f"run-{info.run_id}-prototypes", "audit-tiny", "model-tiny"} <= set(before)
    count = 0
    for name, entries in before.items():
        for path, local, digest in entries:
            assert Path(local).is_relative_to(run_dir), (name, path, local)
            data = (moved / Path(local).relative_to(run_dir)).read_bytes()
            assert base64.b64encode(hashlib.md5(data).digest()).decode() == digest, (name, path)
            count += 1
    assert count >= 10
    # Nothing was staged under the user's data folder.
    assert not [p for p in (wandb_home / "home-data").rglob("*") if p.is_file()]

    contents = wandb_contents(moved)
    # Trajectories as history: one row per recorded optimisation step.
    steps = audit.prototypes.trajectory_steps
    history = [
        {i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
        for r in wandb_records(moved)
        if r.WhichOneof("record_type") == "history"
    ]
    rows = [h for h in history if "optimisation_step" in h]
    assert [h["optimisation_step"] for h in rows] == list(steps) and len(steps) >= 3
    label = "trajectory/zero #0"
    got = [h[label] for h in rows]
    want = audit.prototypes.trajectory[:, 0, 0].tolist()
    assert got == pytest.approx(want, abs=1e-6)
    # The report as wandb.Html, its page inside the folder.
    assert contents["history"]["report._type"] == "html-file"
    page = moved / "files" / contents["history"]["report.path"]
    assert "audit of tiny" in page.read_text()
    # Links to MLflow in config and summary; the model artifact for lineage.
    assert contents["config"]["mlflow"]["mlflow_run_id"] == "0123abcd"
    assert contents["summary"]["mlflow/mlflow_run_id"] == "0123abcd"
    assert contents["artifacts"]["model-tiny"]["type"] == "model"
    # The quality column present in the Arrow table is published in the W&B table.
    table_path = moved / "files" / contents["history"]["isolations.path"]
    table = json.loads(table_path.read_text())
    assert "kept_logit" in table["columns"]
    column = table["columns"].index("kept_logit")
    assert [row[column] for row in table["data"]] == pytest.approx(kept, rel=1e-5)
