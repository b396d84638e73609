"""The model's own eval transform travels from its source to the pipeline's sample loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sources_support import CLASSES, MEAN, SHAPE, STD, tiny_net

SPEC = {"resize": [20], "crop": [16, 16], "interpolation": "bicubic", "source": "test metadata"}


def _photo(path, h=30, w=50):
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return torch.from_numpy(np.asarray(Image.open(path)).copy()).permute(2, 0, 1).float() / 255


def test_mlflow_metadata_carries_the_eval_transform(mlflow_store) -> None:
    from leapcore.sources import load_model
    from tasks.mlflow_models import log_model_with_metadata

    ref = log_model_with_metadata(
        tiny_net(0), CLASSES, mean=MEAN, std=STD, input_shape=SHAPE, eval_transform=SPEC
    )
    loaded = load_model(ref.uri)
    assert loaded.metadata["eval_transform"] == SPEC


def test_zoo_models_bring_their_own_transform() -> None:
    from leapcore.sources import load_model

    loaded = load_model("resnet18", pretrained=False)
    spec = loaded.metadata["eval_transform"]
    assert spec["resize"] == [256] and spec["crop"] == [224, 224]
    assert spec["interpolation"] == "bilinear" and "ResNet18_Weights" in spec["source"]
    assert [type(p).__name__ for p in loaded.preprocessing] == ["Normalize"]


def test_load_samples_uses_the_models_transform_not_a_stretch(tmp_path) -> None:
    from torchvision.transforms.v2 import functional as tvf

    from leapcore.config import load_config
    from leapcore.images import load_image
    from leapcore.results import sample_transform_spec, samples_from_arrow
    from tasks.artifacts import ArtifactStore
    from tasks.model import ModelRef
    from tasks.stages import SampleFile, load_samples

    pixels = _photo(tmp_path / "wide.png")
    model = ModelRef("m", "d", "i", "pt", SHAPE, tuple(CLASSES), "test", eval_transform=SPEC)
    store = ArtifactStore(str(tmp_path / "store"))
    out = load_samples.fn(
        [SampleFile(str(tmp_path / "wide.png"), "x")], model, load_config({}), store
    )
    table = store.get_table(out.refs["samples"])
    images, _, names = samples_from_arrow(table)
    expected = tvf.center_crop(
        tvf.resize(pixels[None], [20], interpolation=tvf.InterpolationMode.BICUBIC, antialias=True),
        [16, 16],
    ).clamp(0, 1)
    assert images.shape == (1, *SHAPE) and names == ["wide.png"]
    assert torch.allclose(images, expected, atol=1e-6)
    stretched = load_image(tmp_path / "wide.png", SHAPE[1:])
    assert float((images[0] - stretched).abs().mean()) > 0.05  # a stretch would be another image
    assert sample_transform_spec(table) == SPEC
    assert "centre crop 16x16" in out.summary[0]["transform"]


def test_without_metadata_the_default_is_named_as_such() -> None:
    from tasks.model import ModelRef, sample_transform

    model = ModelRef("m", "d", "i", "pt", (3, 224, 224), ("a",), "file")
    transform = sample_transform(model, None)
    assert transform.spec()["resize"] == [256]
    assert transform.source.startswith("default: ImageNet convention")


@pytest.mark.parametrize("bad", [{"crop": [16, 16]}, {"resize": [0], "crop": [16, 16]}])
def test_a_bad_transform_spec_is_a_clear_error(bad) -> None:
    from leapcore.errors import InputError
    from leapcore.preprocess import from_spec

    with pytest.raises(InputError, match="eval transform"):
        from_spec(bad)


def test_hugging_face_image_processors_give_their_geometry() -> None:
    transformers = pytest.importorskip("transformers")
    from leapcore.preprocess import image_processor_spec

    vit = image_processor_spec(transformers.ViTImageProcessor())
    assert vit["resize"] == [224, 224] and vit["crop"] == [224, 224]
    assert vit["interpolation"] == "bilinear"
    bit = image_processor_spec(transformers.BitImageProcessor())
    assert bit["resize"] == [224] and bit["crop"] == [224, 224]
    assert bit["interpolation"] == "bicubic"
    convnext = image_processor_spec(
        transformers.ConvNextImageProcessor(size={"shortest_edge": 224})
    )
    assert convnext["resize"] == [256] and convnext["crop"] == [224, 224]


def test_weights_with_an_architecture_get_its_transform(tmp_path) -> None:
    import torchvision

    from leapcore.sources import load_model

    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "w.pt")
    loaded = load_model(str(tmp_path / "w.pt"), arch="resnet18")
    spec = loaded.metadata["eval_transform"]
    assert spec["resize"] == [256] and spec["crop"] == [224, 224]
