"""Local files: weights with an architecture, TorchScript, torch.export, and the refusal of pickles."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
import torch
import torchvision
from sources_support import (
    CLASSES,
    MEAN,
    SHAPE,
    STD,
    adapter_logits,
    reference_logits,
    tiny_net,
)

from leapcore.errors import ModelSourceError, UntrustedSourceError
from leapcore.models import IMAGENET_MEAN, IMAGENET_STD, state_dict_digest
from leapcore.sources import load_model
from leapcore.sources.files import save_safetensors
from leapcore.sources.torch_files import ExportedModel


class WritesMarker:
    """Unpickling this calls ``Path.write_text(marker, ...)``: code that runs on load."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "the pickle ran code"))


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_pickle_that_runs_code_is_refused_and_never_runs(tmp_path, zip_format):
    marker = tmp_path / "pickle.marker"
    path = tmp_path / "model.pt"
    torch.save(
        {"weights": torch.ones(2), "payload": WritesMarker(marker)},
        path,
        _use_new_zipfile_serialization=zip_format,
    )
    with pytest.raises(UntrustedSourceError) as err:
        load_model(path)
    message = str(err.value)
    assert "pickled Python object" in message and "trusted=True" in message
    assert "pathlib" in message  # names what the pickle would call
    assert not marker.exists()


def test_whole_pickled_module_needs_trusted(tmp_path, pixels):
    path = tmp_path / "whole.pth"
    torch.save(tiny_net(0), path)
    with pytest.raises(UntrustedSourceError, match=r"load_model\(\.\.\., trusted=True\)"):
        load_model(path)
    loaded = load_model(
        path, trusted=True, class_list=CLASSES, mean=MEAN, std=STD, input_shape=SHAPE
    )
    assert loaded.metadata["format"] == "pickle"
    torch.testing.assert_close(
        adapter_logits(loaded, pixels), reference_logits(tiny_net(0), pixels), atol=1e-5, rtol=1e-5
    )


@pytest.fixture(scope="module")
def resnet3():
    """torchvision's ResNet-18 architecture with 3 classes (random, seeded weights)."""
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=3).eval()


def test_state_dict_with_an_architecture_name(tmp_path, resnet3):
    path = tmp_path / "resnet.pt"
    torch.save(resnet3.state_dict(), path)
    loaded = load_model(path, arch="resnet18", class_list=CLASSES)
    assert loaded.metadata["library"] == "torchvision" and loaded.metadata["format"] == "state_dict"
    assert loaded.input_shape == (3, 224, 224)
    assert loaded.mean == pytest.approx(IMAGENET_MEAN) and loaded.std == pytest.approx(IMAGENET_STD)
    assert loaded.digest == state_dict_digest(resnet3.state_dict())
    x = torch.rand(2, 3, 224, 224)
    expected = resnet3(
        (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    )
    torch.testing.assert_close(adapter_logits(loaded, x), expected.detach(), atol=1e-4, rtol=1e-4)


def test_training_checkpoint_with_dataparallel_prefix(tmp_path, resnet3):
    path = tmp_path / "checkpoint.ckpt"
    state = {f"module.{k}": v for k, v in resnet3.state_dict().items()}
    torch.save({"epoch": 7, "state_dict": state, "optimizer": {"lr": 0.1}}, path)
    loaded = load_model(path, arch="resnet18", class_list=CLASSES)
    assert loaded.digest == state_dict_digest(resnet3.state_dict())


def test_weights_without_an_architecture(tmp_path, resnet3):
    path = tmp_path / "resnet.pth"
    torch.save(resnet3.state_dict(), path)
    with pytest.raises(ModelSourceError, match=r"holds weights only .* arch='resnet18'"):
        load_model(path)
    with pytest.raises(
        ModelSourceError, match=r"do not fit the torchvision architecture 'alexnet'"
    ):
        load_model(path, arch="alexnet")
    with pytest.raises(ModelSourceError, match=r"no architecture 'resnet_nope'"):
        load_model(path, arch="resnet_nope")


def test_safetensors_with_leapcore_metadata(tmp_path):
    import timm

    torch.manual_seed(0)
    net = timm.create_model("resnet10t", pretrained=False, num_classes=3).eval()
    path = save_safetensors(
        net, tmp_path / "net.safetensors", "resnet10t", CLASSES, MEAN, STD, (3, 32, 32)
    )
    loaded = load_model(path)
    assert loaded.class_list == CLASSES and loaded.input_shape == (3, 32, 32)
    assert loaded.mean == pytest.approx(MEAN) and loaded.metadata["library"] == "timm"
    assert loaded.digest == state_dict_digest(net.state_dict())


def test_safetensors_without_metadata_needs_arch(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "bare.safetensors"
    save_file(dict(tiny_net(0).state_dict()), str(path))
    with pytest.raises(ModelSourceError, match="holds weights only"):
        load_model(path)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 16)
    with pytest.raises(ModelSourceError, match="not a readable safetensors file"):
        load_model(broken)


def test_torchscript_file(tmp_path, pixels):
    path = tmp_path / "scripted.pt"
    with pytest.warns(FutureWarning):
        torch.jit.save(torch.jit.trace(tiny_net(0), torch.rand(1, *SHAPE)), str(path))
    loaded = load_model(path, class_list=CLASSES, mean=MEAN, std=STD, input_shape=SHAPE)
    assert loaded.metadata["format"] == "torchscript"
    torch.testing.assert_close(
        adapter_logits(loaded, pixels), reference_logits(tiny_net(0), pixels), atol=1e-5, rtol=1e-5
    )


def export(model: torch.nn.Module, batch: int) -> torch.export.ExportedProgram:
    dims = {0: torch.export.Dim.AUTO}
    return torch.export.export(model, (torch.rand(batch, *SHAPE),), dynamic_shapes=[dims])


@pytest.mark.slow
def test_pt2_file_with_fixed_batch_and_shape_inference(tmp_path, pixels):
    path = tmp_path / "fixed.pt2"
    torch.export.save(export(tiny_net(0), 1), path)  # batch 1: exported with a fixed batch size
    loaded = load_model(path, class_list=CLASSES, mean=MEAN, std=STD)
    assert isinstance(loaded.model, ExportedModel) and loaded.model.fixed_batch == 1
    assert loaded.input_shape == SHAPE  # read from the program
    torch.testing.assert_close(
        adapter_logits(loaded, pixels), reference_logits(tiny_net(0), pixels), atol=1e-5, rtol=1e-5
    )
    assert loaded.digest == state_dict_digest(tiny_net(0).state_dict())


@pytest.mark.slow
def test_pt2_with_a_pickled_record_is_refused(tmp_path):
    good = tmp_path / "good.pt2"
    torch.export.save(export(tiny_net(0), 2), good)
    marker = tmp_path / "pt2.marker"
    payload = io.BytesIO()
    torch.save(WritesMarker(marker), payload)
    bad = tmp_path / "bad.pt2"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("sample_inputs/model.pt"):
                data = payload.getvalue()
            dst.writestr(info, data)
    with pytest.raises(
        UntrustedSourceError, match=r"record '.*sample_inputs/model.pt'.*trusted=True"
    ):
        load_model(bad)
    assert not marker.exists()


def test_files_that_are_not_models(tmp_path):
    notes = tmp_path / "notes.pt"
    notes.write_text("hello, not a model")
    with pytest.raises(ModelSourceError, match=r"notes.pt is not a model file that torch can read"):
        load_model(notes)
    text = tmp_path / "readme.txt"
    text.write_text("hello")
    with pytest.raises(ModelSourceError, match=r"readme.txt is not a model file"):
        load_model(text)
    folder = tmp_path / "empty"
    folder.mkdir()
    with pytest.raises(ModelSourceError, match=r"is a folder but holds no model"):
        load_model(folder)
    with pytest.raises(ModelSourceError, match=r"no such model file or folder: .*missing.pt2"):
        load_model(tmp_path / "missing.pt2")
    tensors = tmp_path / "tensor.pt"
    torch.save(torch.ones(3), tensors)
    with pytest.raises(ModelSourceError, match=r"holds a Tensor, not weights"):
        load_model(tensors)
