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


def test_explain_with_methods_writes_a_cached_attributions_table(
    prefect_server, registered_model, fresh_store, tmp_path
) -> None:
    from flows import explain_samples
    from leapcore.attribution.arrow import attributions_from_arrow
    from leapcore.results import schema_name
    from tasks import ArtifactStore

    folder = _folder(tmp_path)
    options = {
        "config": tiny_config(),
        "artifact_store": fresh_store,
        "skip": ["report", "export", "wandb"],
        "output_dir": str(tmp_path / "out"),
        "methods": "ig,lrp",
    }
    result = explain_samples(registered_model.uri, [str(folder)], **options)
    assert result.stages["attribute_samples"] == "Completed"
    ref = result.outputs["attribute_samples"].refs["attributions"]
    table = ArtifactStore(fresh_store).get_table(ref)
    assert schema_name(table) == "attributions"
    assert table.num_rows == 2 * 2  # 2 images x their top class x 2 methods
    assert set(table.column("method").to_pylist()) == {
        "integrated_gradients",
        "lrp_epsilon_plus_flat",
    }
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
    again = explain_samples(registered_model.uri, [str(folder)], **options)
    assert again.stages["attribute_samples"] == "Cached"
    assert again.outputs["attribute_samples"].refs["attributions"].sha256 == ref.sha256


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
    # Refused by the CLI's check, before the flow: no stage was asked to stop, so a later
    # engine.run in this process is not stopped at its first step.
    assert not stopping.requested()
