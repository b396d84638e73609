"""The registry of named sources, zoo names, and what happens when weights are not on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from sources_support import CLASSES

from leapcore.errors import ModelSourceError
from leapcore.models import IMAGENET_MEAN, state_dict_digest
from leapcore.sources import describe_sources, find_source, list_sources, load_model


def test_known_sources_and_how_uris_are_routed():
    assert {"zoo", "mlflow", "file"} <= set(list_sources())
    assert all(describe_sources().values())
    routes = {
        "efficientnet_lite0": "zoo",
        "timm:resnet18": "zoo",
        "vit_small_patch16_224.augreg_in21k": "zoo",
        "hf-hub:org/name": "zoo",
        "models:/name/3": "mlflow",
        "models:/name@champion": "mlflow",
        "runs:/0a1b/model": "mlflow",
        "weights.safetensors": "file",
        "model.pt2": "file",
        "net.keras": "file",
        "s3://bucket/model": None,
        "notes.txt": None,
    }
    assert {uri: find_source(uri) for uri in routes} == routes


def test_unknown_source_name_lists_the_known_ones():
    with pytest.raises(
        ModelSourceError,
        match=r"unknown model source 'hub'; known sources: file, huggingface, mlflow, zoo",
    ):
        load_model("resnet18", source="hub")


def test_uri_that_matches_no_source():
    with pytest.raises(
        ModelSourceError,
        match=r"no model source matches 's3://bucket/model'.*Known sources: file, huggingface, mlflow, zoo",
    ):
        load_model("s3://bucket/model")


def test_unknown_option_lists_the_options():
    with pytest.raises(
        ModelSourceError,
        match=r"source 'zoo' takes no option 'arch'; its options: pretrained, library",
    ):
        load_model("resnet18", arch="resnet18")


def test_trusted_is_accepted_by_every_source():
    """The CLI passes --trusted whatever the URI; sources that never unpickle ignore it."""
    loaded = load_model("resnet18", pretrained=False, trusted=True, check=False)
    assert loaded.source == "zoo" and len(loaded.class_list) == 1000


def test_zoo_name_that_no_library_has():
    with pytest.raises(ModelSourceError, match=r"timm has no model 'not_a_net'"):
        load_model("not_a_net", pretrained=False)
    with pytest.raises(ModelSourceError, match=r"names timm but library='torchvision'"):
        load_model("timm:resnet18", library="torchvision")


@pytest.mark.slow
def test_bundled_efficientnet_lite0():
    loaded = load_model("efficientnet_lite0")
    assert (loaded.source, loaded.framework, loaded.layout) == ("zoo", "pt", "NCHW")
    assert loaded.metadata["library"] == "bundled"
    assert len(loaded.class_list) == 1000 and loaded.class_list[1] == "goldfish"
    assert loaded.mean == pytest.approx(IMAGENET_MEAN) and loaded.input_shape == (3, 224, 224)
    assert loaded.digest == state_dict_digest(loaded.model.state_dict())
    assert load_model("efficientnet_lite0", check=False).digest == loaded.digest


def test_torchvision_weights_not_cached_say_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ModelSourceError) as err:
        load_model("torchvision:resnet18")
    message = str(err.value)
    assert f"Put resnet18-f37072fd.pth in {tmp_path}/hub/checkpoints" in message
    assert "never downloads" in message


def test_torchvision_weights_from_the_local_cache(tmp_path, monkeypatch):
    import torchvision

    folder = tmp_path / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    net = torchvision.models.resnet18()
    torch.save(net.state_dict(), folder / "resnet18-f37072fd.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    loaded = load_model("resnet18")
    assert loaded.metadata["library"] == "torchvision"
    assert loaded.digest == state_dict_digest(net.state_dict())
    assert loaded.class_list[0] == "tench" and loaded.input_shape == (3, 224, 224)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache that the hub library reads at call time."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_timm_weights_not_cached_say_where_to_put_them(hub_cache):
    with pytest.raises(ModelSourceError) as err:
        load_model("timm:resnet10t.c3_in1k")
    message = str(err.value)
    assert f"{hub_cache}/models--timm--resnet10t.c3_in1k/snapshots/<revision>/" in message
    assert "never downloads" in message


def test_hf_hub_id_from_the_local_cache(hub_cache):
    import timm

    torch.manual_seed(0)
    net = timm.create_model("resnet10t", pretrained=False, num_classes=3).eval()
    repo = hub_cache / "models--leapcore--tiny-resnet"
    snapshot = repo / "snapshots" / ("0" * 40)
    timm.models.save_for_hf(
        net, str(snapshot), model_config={"label_names": CLASSES}, safe_serialization=True
    )
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)

    loaded = load_model("hf-hub:leapcore/tiny-resnet")
    assert loaded.class_list == CLASSES
    config = json.loads((snapshot / "config.json").read_text())
    assert list(loaded.input_shape) == config["pretrained_cfg"]["input_size"]
    assert loaded.digest == state_dict_digest(net.state_dict())

    folder = load_model(snapshot)  # the same folder, read as a local file source
    assert folder.class_list == CLASSES and folder.digest == loaded.digest


def test_tracking_uris_in_messages_hide_credentials():
    from leapcore.sources.mlflow import redact_uri

    assert (
        redact_uri("https://alice:s3cret@mlflow.example.com/x")
        == "https://***@mlflow.example.com/x"
    )
    assert redact_uri("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"
