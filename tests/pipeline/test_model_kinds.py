"""A Hugging Face segmentation model through the whole pipeline (issue 17): a save_pretrained
SegFormer folder audited with a region; the stages compute what the engine computes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from leapcore import engine
from tests.engine.kinds_support import save_tiny_segformer

CONFIG = {
    "input_dim": [3, 32, 32],
    "max_steps": 4,
    "find_lr_steps": 0,
    "transform": "s",
    "isolation_steps": 2,
    "max_isolate_classes": 1,
    "log_freq": 2,
    "region": [0, 0, 16, 16],
    "project_name": "pipeline-tests",
}


@pytest.fixture(scope="module")
def segformer_folder(tmp_path_factory) -> Path:
    pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("segformer-pipeline")
    save_tiny_segformer(folder)
    return folder


def test_segformer_folder_audit_matches_the_engine(prefect_server, segformer_folder, tmp_path):
    from flows import audit_model
    from leapcore.sources import load_model
    from tasks import ArtifactStore
    from tasks.audit_io import load_audit

    store = str(tmp_path / "store")
    result = audit_model(
        str(segformer_folder),
        ["square"],
        CONFIG,
        artifact_store=store,
        output_dir=str(tmp_path / "out"),
        skip=["wandb"],
    )
    out = result.outputs
    got = load_audit(
        ArtifactStore(store),
        out["fetch_model"],
        engine.load_config(CONFIG),
        out["generate_baseline"],
        out["find_learning_rate"],
        out["optimise_prototypes"],
        out["score_entanglement"],
        out["isolate_features"],
    )
    loaded = load_model(segformer_folder)
    expected = engine.run(loaded.model, loaded.class_list, CONFIG, [1], loaded.preprocessing)
    assert got.region == expected.region == "box:0,0,16,16"
    assert got.model_kind == "segmentation"
    assert torch.equal(got.prototypes.logits, expected.prototypes.logits)
    assert torch.equal(got.isolation.masks, expected.isolation.masks)
    page = Path(result.report_path).read_text()
    assert "averaged over region box:0,0,16,16" in page
