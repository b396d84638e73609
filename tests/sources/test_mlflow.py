"""The MLflow source against a real local tracking store and registry (sqlite): no mocks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sources_support import (
    CLASSES,
    MEAN,
    SHAPE,
    STD,
    TinyNet,
    adapter_logits,
    reference_logits,
    tiny_net,
)

from leapcore.errors import ModelSourceError, UntrustedSourceError
from leapcore.sources import load_model
from leapcore.sources.torch_files import ExportedModel

pytestmark = pytest.mark.slow
MARKER_NAME = "pickle_ran.marker"


@pytest.fixture(scope="session")
def pt2_ref(mlflow_store):
    """tiny_net(0) logged in pt2 format, registered as 'tiny-pt2' version 1 with alias 'champion'."""
    from tasks.mlflow_models import log_model_with_metadata

    return log_model_with_metadata(
        tiny_net(0),
        CLASSES,
        mean=MEAN,
        std=STD,
        input_shape=SHAPE,
        registered_model_name="tiny-pt2",
        alias="champion",
    )


def build_with_marker(marker: str) -> TinyNet:
    """Unpickling a MarkedNet calls this: it writes the marker, proving the pickle's code ran."""
    Path(marker).write_text("the pickle ran code")
    return tiny_net(1)


class MarkedNet(TinyNet):
    marker = ""

    def __reduce__(self):
        return (build_with_marker, (self.marker,))


@pytest.fixture(scope="session")
def pickle_ref(mlflow_store, tmp_path_factory):
    """A model in MLflow's pickle format whose unpickling writes a marker file."""
    from tasks.mlflow_models import log_model_with_metadata

    model = MarkedNet()
    model.load_state_dict(tiny_net(1).state_dict())
    model.marker = str(tmp_path_factory.mktemp("marker") / MARKER_NAME)
    ref = log_model_with_metadata(
        model.eval(),
        CLASSES,
        mean=MEAN,
        std=STD,
        input_shape=SHAPE,
        registered_model_name="tiny-pickle",
        serialization_format="pickle",
    )
    Path(model.marker).unlink(missing_ok=True)  # logging pickled (and may have probed) the model
    return ref, Path(model.marker)


def test_pt2_registry_version_alias_and_run_give_the_same_model(pt2_ref, pixels):
    expected = reference_logits(tiny_net(0), pixels)
    assert pt2_ref.uri == "models:/tiny-pt2@champion"
    assert pt2_ref.version == "1"
    digests = set()
    for uri in (
        "models:/tiny-pt2/1",
        "models:/tiny-pt2@champion",
        pt2_ref.runs_uri,
        pt2_ref.model_uri,
    ):
        loaded = load_model(uri)
        assert loaded.source == "mlflow" and loaded.framework == "pt" and loaded.layout == "NCHW"
        assert isinstance(loaded.model, ExportedModel)
        assert loaded.metadata["format"] == "pt2"
        assert loaded.class_list == CLASSES
        assert loaded.mean == pytest.approx(MEAN) and loaded.std == pytest.approx(STD)
        assert loaded.input_shape == SHAPE
        torch.testing.assert_close(adapter_logits(loaded, pixels), expected, atol=1e-5, rtol=1e-5)
        digests.add(loaded.digest)
    assert len(digests) == 1
    registry = load_model("models:/tiny-pt2@champion").metadata
    assert registry["registered_model"] == "tiny-pt2" and registry["version"] == "1"
    assert registry["alias"] == "champion"


def test_pt2_digest_is_the_weights_digest(pt2_ref):
    from leapcore.models import state_dict_digest

    loaded = load_model("models:/tiny-pt2/1")
    assert loaded.digest == state_dict_digest(tiny_net(0).state_dict())
    assert loaded.digest != state_dict_digest(tiny_net(1).state_dict())


def test_engine_runs_on_an_mlflow_pt2_model(pt2_ref, tmp_path):
    """ExportedModel refuses train()/eval(); the engine's eval_mode must still drive it."""
    from leapcore import engine

    loaded = load_model(pt2_ref.uri)
    config = {
        "input_dim": [1, *SHAPE],
        "max_steps": 8,
        "find_lr_steps": 0,
        "isolation_steps": 4,
        "max_isolate_classes": 2,
        "output_dir": str(tmp_path),
        "transform": "s",
    }
    df, results = engine.generate(
        "mlflow-pt2", loaded.model, loaded.class_list, config, [0, 2], loaded.preprocessing
    )
    assert set(df["target_class"].dropna()) == {"cat", "fox"}
    assert results["prototypes"].shape[1:] == SHAPE


def test_pickle_format_is_refused_unless_trusted(pickle_ref, monkeypatch, pixels):
    ref, marker = pickle_ref
    monkeypatch.delenv("LEAPCORE_TRUST_MLFLOW_REGISTRY", raising=False)
    with pytest.raises(UntrustedSourceError) as err:
        load_model("models:/tiny-pickle/1")
    message = str(err.value)
    assert "pickle format" in message and "trusted=True" in message
    assert "LEAPCORE_TRUST_MLFLOW_REGISTRY=1" in message
    with pytest.raises(UntrustedSourceError):
        load_model(ref.runs_uri)
    assert not marker.exists()

    loaded = load_model("models:/tiny-pickle/1", trusted=True)
    assert marker.exists()  # trusting it really runs the pickle's code
    assert loaded.metadata["format"] == "pickle"
    torch.testing.assert_close(
        adapter_logits(loaded, pixels), reference_logits(tiny_net(1), pixels), atol=1e-5, rtol=1e-5
    )


def test_registry_trust_setting_covers_models_uris_only(pickle_ref, monkeypatch):
    ref, marker = pickle_ref
    monkeypatch.setenv("LEAPCORE_TRUST_MLFLOW_REGISTRY", "1")
    marker.unlink(missing_ok=True)
    with pytest.raises(UntrustedSourceError, match="trusted=True"):
        load_model(ref.runs_uri)
    assert not marker.exists()
    loaded = load_model("models:/tiny-pickle/1")
    assert loaded.class_list == CLASSES


def test_unknown_registered_model_lists_the_known_ones(pt2_ref):
    with pytest.raises(
        ModelSourceError, match=r"no registered model 'nope'.*registered models: .*tiny-pt2"
    ):
        load_model("models:/nope/1")


def test_missing_version_lists_versions(pt2_ref):
    with pytest.raises(ModelSourceError, match=r"'tiny-pt2' has no version 99; its versions: 1\."):
        load_model("models:/tiny-pt2/99")


def test_missing_alias_lists_aliases(pt2_ref):
    with pytest.raises(
        ModelSourceError, match=r"no alias 'staging'; its aliases: champion \(version 1\)"
    ):
        load_model("models:/tiny-pt2@staging")


def test_uri_without_version_says_how_to_name_one(pt2_ref):
    with pytest.raises(ModelSourceError, match=r"names no version: use models:/tiny-pt2/<version>"):
        load_model("models:/tiny-pt2")


def test_unknown_run_and_unknown_path(pt2_ref):
    with pytest.raises(ModelSourceError, match=r"MLflow has no run 'abc123'"):
        load_model("runs:/abc123/model")
    with pytest.raises(
        ModelSourceError, match=r"has no model at 'other'; models logged in this run: model"
    ):
        load_model(f"runs:/{pt2_ref.run_id}/other")


def test_class_list_that_disagrees_with_the_output_width(pt2_ref, tmp_path):
    names = tmp_path / "classes.txt"
    names.write_text("a\nb\n")
    with pytest.raises(
        ModelSourceError,
        match=r"returns 3 outputs but the class list from the class_list option has 2 names",
    ):
        load_model("models:/tiny-pt2/1", class_list=names)
    loaded = load_model("models:/tiny-pt2/1", class_list=["x", "y", "z"])
    assert loaded.class_list == ["x", "y", "z"]


def test_log_helper_rejects_what_it_cannot_log(mlflow_store):
    from tasks.mlflow_models import log_model_with_metadata

    with pytest.raises(ModelSourceError, match="needs class_list"):
        log_model_with_metadata(tiny_net(0), [])
    with pytest.raises(ModelSourceError, match="alias needs registered_model_name"):
        log_model_with_metadata(tiny_net(0), CLASSES, alias="champion")
    with pytest.raises(ModelSourceError, match="takes a torch.nn.Module or a Keras model"):
        log_model_with_metadata(object(), CLASSES, input_shape=SHAPE)


def test_log_helper_takes_a_loaded_model(pt2_ref, mlflow_store):
    """A LoadedModel carries its own class list and preprocessing into the registry."""
    from tasks.mlflow_models import log_model_with_metadata

    loaded = load_model("models:/tiny-pt2/1")
    loaded.model = tiny_net(0)  # re-log the eager module (an ExportedModel re-exports too)
    ref = log_model_with_metadata(loaded, registered_model_name="tiny-pt2")
    assert ref.uri == "models:/tiny-pt2/2"
    again = load_model(ref.uri)
    assert again.class_list == CLASSES and again.mean == pytest.approx(MEAN)
    assert again.digest == loaded.digest


def test_import_leapcore_imports_no_mlflow_prefect_wandb_or_tensorflow():
    code = (
        "import sys, leapcore, leapcore.sources as s; s.list_sources(); "
        "import leapcore.sources.mlflow, leapcore.sources.files; "
        "bad = [m for m in ('mlflow', 'prefect', 'wandb', 'tensorflow', 'keras') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_tracking_uri_option_reads_another_server(pt2_ref, mlflow_store, tmp_path):
    """``tracking_uri=`` loads from that server without touching the global tracking URI."""
    import mlflow

    other = f"sqlite:///{tmp_path}/never-created.db"
    mlflow.set_tracking_uri(other)
    try:
        loaded = load_model("models:/tiny-pt2@champion", tracking_uri=mlflow_store)
        for uri in ("models:/tiny-pt2/1", pt2_ref.runs_uri, pt2_ref.model_uri):
            assert load_model(uri, tracking_uri=mlflow_store).digest == loaded.digest
        assert mlflow.get_tracking_uri() == other
    finally:
        mlflow.set_tracking_uri(mlflow_store)
    assert loaded.metadata["tracking_uri"] == mlflow_store
    assert loaded.class_list == CLASSES
