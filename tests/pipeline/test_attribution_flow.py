"""``explain_samples(..., methods=...)`` / ``leap explain --methods``: the attribute_samples stage."""

from __future__ import annotations

import pytest
import torch

from tests.pipeline.conftest import digits_images, tiny_config

pytest.importorskip("captum")
pytest.importorskip("zennit")


def _folder(tmp_path):
    from leapcore.images import save_png

    images, labels = digits_images()
    folder = tmp_path / "photos"
    for i in range(2):
        save_png(folder / f"digit{i}_{int(labels[i])}.png", images[i])
    return folder


# The digits CNN of tests/pipeline/conftest.py, as a user's package would define it.
USER_NET = """
import torch
from torch import nn


class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
        )
        self.head = nn.Linear(16 * 16, 10)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))
"""


def _picklable(model: torch.nn.Module, folder, monkeypatch) -> torch.nn.Module:
    """``model``'s weights in an instance of a class from an importable module of its own, as a
    user's model class lives in their package (the fixture's class belongs to whichever ``conftest``
    module pytest imported under that name, which unpickling cannot find in a full run)."""
    import importlib

    (folder / "user_digits_net.py").write_text(USER_NET)
    monkeypatch.syspath_prepend(str(folder))
    copy = importlib.import_module("user_digits_net").DigitsCNN()
    copy.load_state_dict(model.state_dict())  # fails loudly if the two ever differ
    return copy.eval()


def test_explain_with_methods_writes_a_cached_attributions_table(
    prefect_server, digits_model, fresh_store, tmp_path, monkeypatch
) -> None:
    """ig, LRP and CRP, and RelMax over a folder, on the digits CNN as a torch module (a trusted
    pickle: LRP needs layers it can see, which the registry's torch.export program hides)."""
    from flows import explain_samples
    from leapcore.attribution.arrow import attributions_from_arrow
    from leapcore.results import schema_name
    from tasks import ArtifactStore
    from tests.pipeline.conftest import DIGITS, SHAPE

    folder = _folder(tmp_path)
    model_file = tmp_path / "digits.pt"
    torch.save(_picklable(digits_model, tmp_path, monkeypatch), model_file)
    model_uri = str(model_file)
    options = {
        "model_options": {"trusted": True, "class_list": list(DIGITS), "input_shape": SHAPE},
        "config": tiny_config(),
        "artifact_store": fresh_store,
        "skip": ["report", "export", "wandb"],
        "output_dir": str(tmp_path / "out"),
        "methods": "ig,lrp,crp",
        "method_options": {"crp": {"top_k": 2}},
        "relmax": [str(folder)],  # the same two digits as reference images
        "relmax_count": 2,
    }
    result = explain_samples(model_uri, [str(folder)], **options)
    assert result.stages["attribute_samples"] == "Completed"
    ref = result.outputs["attribute_samples"].refs["attributions"]
    table = ArtifactStore(fresh_store).get_table(ref)
    assert schema_name(table) == "attributions"
    assert table.num_rows == 2 * 3  # 2 images x their top class x 3 methods
    assert set(table.column("method").to_pylist()) == {
        "integrated_gradients",
        "lrp_epsilon_plus_flat",
        "crp",
    }
    # RelMax: for every concept CRP found, both reference images, most relevant first.
    assert result.stages["relmax_references"] == "Completed"
    relmax_ref = result.outputs["relmax_references"].refs["relmax"]
    relmax = ArtifactStore(fresh_store).get_table(relmax_ref)
    found = {c for ids in table.column("concept_ids").to_pylist() if ids for c in ids}
    rows = relmax.to_pylist()
    assert {r["concept"] for r in rows} == found and len(rows) == 2 * len(found)
    assert {r["layer"] for r in rows} == {table.schema.metadata[b"leapcore.crp_layer"].decode()}
    for concept in found:
        mine = [r for r in rows if r["concept"] == concept]
        assert {r["image_name"] for r in mine} == {"digit0_0.png", "digit1_1.png"}
        assert mine[0]["score"] >= mine[1]["score"]
    back, scores = attributions_from_arrow(table)
    assert back.maps["integrated_gradients"].shape == (2, 32, 32)
    for values in scores.values():
        assert (
            torch.isfinite(values["deletion_auc"]).all()
            and torch.isfinite(values["sparseness"]).all()
        )
    from mlflow import MlflowClient

    metrics = MlflowClient().get_run(result.mlflow_run_id).data.metrics
    for key in ("deletion_auc", "insertion_auc", "sparseness", "seconds"):
        assert f"attribution.integrated_gradients.{key}" in metrics
    torch.testing.assert_close(
        metrics["attribution.lrp_epsilon_plus_flat.deletion_auc"],
        float(scores["lrp_epsilon_plus_flat"]["deletion_auc"].mean()),
    )
    again = explain_samples(model_uri, [str(folder)], **options)
    assert again.stages["attribute_samples"] == "Cached"
    assert again.outputs["attribute_samples"].refs["attributions"].sha256 == ref.sha256
    assert again.stages["relmax_references"] == "Cached"
    assert again.outputs["relmax_references"].refs["relmax"].sha256 == relmax_ref.sha256


def test_leap_explain_methods_refuses_an_unknown_method_before_anything_runs(
    prefect_server, registered_model, tmp_path, capsys
) -> None:
    from leapcli.cli import main
    from leapcore import stopping

    folder = str(_folder(tmp_path))
    code = main(["explain", registered_model.uri, folder, "--methods", "ig,lpr", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1
    assert "unknown attribution method 'lpr'. Did you mean 'lrp'" in err
    # Refused before anything started: no stop request is left to stop this process's next run.
    assert not stopping.requested()
    code = main(["explain", registered_model.uri, folder, "--methods", "ig", "--relmax", folder])
    assert code == 1
    assert "relmax shows reference images of the concepts CRP finds: add crp" in (
        capsys.readouterr().err
    )


def test_explain_with_methods_shows_and_publishes_the_attributions(
    prefect_server, registered_model, fresh_store, tmp_path
) -> None:
    """The report's ``attributions`` section, the Parquet table as an MLflow artifact and the
    ``attributions`` W&B table (read back from the offline run's files) all show the stage's maps."""
    import io
    import json
    from pathlib import Path

    import numpy as np
    import pyarrow.parquet as pq
    from mlflow import MlflowClient
    from PIL import Image

    from flows import explain_samples
    from leapcore.attribution.arrow import attributions_from_arrow
    from leapcore.attribution.report import map_png
    from tasks import ArtifactStore
    from tasks.wandb_records import wandb_records
    from tests.pipeline.support import wandb_contents

    options = {
        "config": tiny_config(),
        "artifact_store": fresh_store,
        "skip": ["export"],
        "output_dir": str(tmp_path / "out"),
        "methods": "ig,saliency",
    }
    result = explain_samples(registered_model.uri, [str(_folder(tmp_path))], **options)
    store = ArtifactStore(fresh_store)
    table = store.get_table(result.outputs["attribute_samples"].refs["attributions"])
    _, scores = attributions_from_arrow(table)
    methods = ("integrated_gradients", "saliency")

    # 1. The report renders the registered section: one map per (image, method) with its scores.
    page = store.get_bytes(result.outputs["render_report"].report).decode("utf-8")
    assert '<section id="attributions">' in page
    for method in methods:
        assert page.count(f'alt="{method}"') == 2
        for value in scores[method]["deletion_auc"].tolist():
            assert f"del {value:.3f}" in page

    # 2. MLflow holds the attributions table as a Parquet artifact, equal to the stage's table.
    client = MlflowClient()
    local = client.download_artifacts(result.mlflow_run_id, "tables/attributions.parquet")
    assert pq.read_table(local).equals(table)

    # 3. W&B: the ``attributions`` table, one row per (image, class, method), read back from the
    # offline run: its history entry and the run_table artifact that holds the cells and images.
    wandb = wandb_contents(result.wandb_run_dir)
    assert wandb["history"]["attributions._type"] == "table-file"
    assert wandb["history"]["attributions.nrows"] == table.num_rows
    files = {}
    for record in wandb_records(result.wandb_run_dir):
        if record.WhichOneof("record_type") == "artifact" and record.artifact.name.endswith(
            "-attributions"
        ):
            files = {e.path: Path(e.local_path) for e in record.artifact.manifest.contents}
    logged = json.loads(files["attributions.table.json"].read_text())
    columns = logged["columns"]
    assert columns == ["image", "class", "method", "picture", "map"] + [
        "deletion_auc",
        "insertion_auc",
        "sparseness",
    ]
    rows = [dict(zip(columns, row)) for row in logged["data"]]
    maps, _ = attributions_from_arrow(table)
    names = table.column("image_name").to_pylist()
    expected = {
        (r["image_name"], r["method"]): r
        for r in table.select(["image_name", "method", "deletion_auc", "sparseness"]).to_pylist()
    }
    assert len(rows) == table.num_rows
    assert {(r["image"], r["method"]) for r in rows} == set(expected)
    for row in rows:
        want = expected[(row["image"], row["method"])]
        assert row["deletion_auc"] == pytest.approx(want["deletion_auc"], abs=1e-6)
        assert row["sparseness"] == pytest.approx(want["sparseness"], abs=1e-6)
        # The map image is the method's own map for that image, drawn as in the report.
        pair = names.index(row["image"])
        drawn = np.asarray(Image.open(files[row["map"]["path"]]).convert("RGB"))
        own = np.asarray(Image.open(io.BytesIO(map_png(maps.maps[row["method"]][pair]))))
        np.testing.assert_array_equal(drawn, own)
        picture = np.asarray(Image.open(files[row["picture"]["path"]]))
        assert picture.shape[:2] == (32, 32) and picture.std() > 0


def test_audit_with_methods_attributes_prototypes_and_samples_everywhere(
    prefect_server, registered_model, fresh_store, tmp_path
) -> None:
    """``audit_model(methods=["ig"], samples=DIR)``: the ``attribute_prototypes`` analysis stage
    explains each prototype for its own target and each sample for its top audited class; the
    report section, the MLflow Parquet artifact and metrics and the W&B table (read back offline)
    all show that table, and the stage is skipped without methods."""
    import io
    import json
    from pathlib import Path

    import numpy as np
    import pyarrow.parquet as pq
    from mlflow import MlflowClient
    from PIL import Image

    from flows import audit_model
    from leapcore.attribution.arrow import attributions_from_arrow
    from tasks import ArtifactStore
    from tasks.wandb_records import wandb_records
    from tests.pipeline.support import wandb_contents

    folder = _folder(tmp_path)
    result = audit_model(
        registered_model.uri,
        target_classes=[3, 7],
        config=tiny_config(),
        artifact_store=fresh_store,
        skip=["export"],
        output_dir=str(tmp_path / "out"),
        samples=[str(folder)],
        methods=["ig"],
        method_options={"integrated_gradients": {"n_steps": 8}},
    )
    assert result.stages["attribute_prototypes"] == "Completed"
    store = ArtifactStore(fresh_store)
    table = store.get_table(result.outputs["attribute_prototypes"].refs["attributions"])
    rows = table.to_pylist()
    # one prototype per target (tiny_config) for its own class, then the 2 digits for the audited
    # class (3 or 7) with the larger logit
    assert [(r["image_name"], r["target_name"]) for r in rows[:2]] == [
        ("prototype digit-3", "digit-3"),
        ("prototype digit-7", "digit-7"),
    ]
    assert [r["image_name"] for r in rows[2:]] == ["digit0_0.png", "digit1_1.png"]
    assert {r["target_name"] for r in rows[2:]} <= {"digit-3", "digit-7"}
    assert {r["method"] for r in rows} == {"integrated_gradients"}
    _, scores = attributions_from_arrow(table)
    ig = scores["integrated_gradients"]
    assert torch.isfinite(ig["deletion_auc"]).all() and torch.isfinite(ig["sparseness"]).all()

    # The report's section: one row per explained image, the picture beside the map.
    page = store.get_bytes(result.outputs["render_report"].report).decode("utf-8")
    section = page[page.index('<section id="attributions">') :]
    section = section[: section.index("</section>")]
    assert section.count('alt="integrated_gradients"') == 4 and section.count('alt="image"') == 4
    assert "prototype digit-7<br>digit-7" in section and "digit1_1.png" in section
    for value in ig["deletion_auc"].tolist():
        assert f"del {value:.3f}" in section

    # MLflow: the table as a Parquet artifact and the findings as metrics.
    client = MlflowClient()
    local = client.download_artifacts(result.mlflow_run_id, "tables/attributions.parquet")
    assert pq.read_table(local).equals(table)
    metrics = client.get_run(result.mlflow_run_id).data.metrics
    assert metrics["attribution.integrated_gradients.deletion_auc"] == pytest.approx(
        float(ig["deletion_auc"].mean()), abs=1e-6
    )
    assert result.metrics["attribution.integrated_gradients.sparseness"] == pytest.approx(
        float(ig["sparseness"].mean()), abs=1e-6
    )

    # W&B: the attributions table read back from the offline run's files, pictures included.
    wandb = wandb_contents(result.wandb_run_dir)
    assert wandb["history"]["attributions.nrows"] == table.num_rows
    files = {}
    for record in wandb_records(result.wandb_run_dir):
        if record.WhichOneof("record_type") == "artifact" and record.artifact.name.endswith(
            "-attributions"
        ):
            files = {e.path: Path(e.local_path) for e in record.artifact.manifest.contents}
    logged = json.loads(files["attributions.table.json"].read_text())
    got = [dict(zip(logged["columns"], row)) for row in logged["data"]]
    assert [(r["image"], r["class"]) for r in got] == [
        (r["image_name"], r["target_name"]) for r in rows
    ]
    for row, want in zip(got, rows):
        assert row["deletion_auc"] == pytest.approx(want["deletion_auc"], abs=1e-6)
        picture = np.asarray(Image.open(files[row["picture"]["path"]]))
        own = np.asarray(Image.open(io.BytesIO(want["picture"])))
        np.testing.assert_array_equal(picture, own)  # the row's own image, prototype or sample

    # Without methods the stage has nothing to do (and runs no task).
    from leapcore.config import load_config
    from tasks.analysis import AuditContext
    from tasks.attribution import attribute_prototypes

    idle = AuditContext(None, None, load_config({}), store, "cpu", [[3]], ["digit-3"], [])
    assert attribute_prototypes(idle) == (None, "Skipped")
