"""Every code example of leap-ie's README runs with only its import lines changed."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from tests.compat.conftest import GENERATE, block, code_blocks
from tests.pipeline.support import wandb_contents


class TwoClassNet(nn.Module):
    """A small stand-in for the README's ``your_model`` (hotdog / not hotdog)."""

    def __init__(self, as_dict: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.as_dict = as_dict
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 5, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten()
        )
        self.head = nn.Linear(128, 2)

    def forward(self, x):
        logits = self.head(self.features(x))
        return {"logits": logits} if self.as_dict else logits


def run(code: str, **names) -> dict:
    scope = dict(names)
    exec(compile(code, "<leap-ie README>", "exec"), scope)
    return scope


def test_the_readme_has_the_examples_this_file_runs() -> None:
    headings = [h for h, _ in code_blocks()]
    for wanted in (
        "Get started!",
        "Usage",
        "Weights and Biases Integration",
        "Prototype Generation",
        "Sample Feature Isolation",
        "engine.generate()",
    ):
        assert wanted in headings, wanted


def test_get_started(compat_home, fast_defaults) -> None:
    scope = run(block("Get started!"))
    df, results = scope["results_df"], scope["results_dict"]
    assert isinstance(df, pd.DataFrame) and isinstance(results, dict)
    assert scope["class_list"][1] == "goldfish"
    # target_classes=[1]: one prototype of 'goldfish', at the input size get_model's transform gives.
    assert results["prototypes"].shape == (1, 3, 224, 224)
    assert "goldfish" in set(df["target_class"].astype(str))


def test_usage_and_the_model_wrapper(compat_home, fast_defaults) -> None:
    usage, wrapper = (code for head, code in code_blocks() if head == "Usage")
    scope = run(block("Usage"), your_model=TwoClassNet())
    assert scope["dict_results"]["prototypes"].shape[0] == 1
    assert set(scope["df_results"]["target_class"].astype(str)) >= {"hotdog"}
    wrapped = run(wrapper, nn=nn, your_model=TwoClassNet(as_dict=True))["model"]
    out = wrapped(torch.rand(1, 3, 224, 224))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 2)


def test_weights_and_biases_integration(compat_home, fast_defaults) -> None:
    from leapcore import engine  # the README imports it once, in the block before

    scope = run(block("Weights and Biases Integration"), engine=engine, your_model=TwoClassNet())
    published = scope["dict_results"]["publications"]["wandb"]
    # The placeholder key cannot work: offline, with the sync command to upload it later.
    assert published["mode"] == "offline", published
    assert published["sync_command"] == f"wandb sync {published['run_dir']}"
    run_dir = Path(published["run_dir"])
    assert run_dir.parent == compat_home / "wandb" / "wandb"
    contents = wandb_contents(run_dir)
    run_path = f"your_wandb_entity/your_wandb_project_name/{published['run_id']}"
    assert published["run_path"] == run_path
    assert contents["config"]["max_steps"] == fast_defaults["max_steps"]
    assert "wandb_api_key" not in contents["config"]
    assert contents["history"]["prototypes.nrows"] == 1
    assert contents["history"]["isolations._type"] == "table-file"
    assert any(key.startswith("trajectory/hotdog") for key in contents["history"])
    tables = contents["artifacts"]["audit-your_wandb_project_name"]["files"]
    assert "tables/prototypes.parquet" in tables
    # No key, entity or secret is written into the run.
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert b"YOUR_WANDB_API_KEY" not in path.read_bytes(), path
    # Nothing staged outside the run folder.
    assert not any((compat_home / "wandb-data").rglob("*.*"))


def test_prototype_generation(compat_home, fast_defaults) -> None:
    scope = run(block("Prototype Generation"))
    results = scope["dict_results"]
    assert results["prototypes"].shape == (3, 3, 224, 224)
    assert list(scope["df_results"]["target_class"].astype(str).unique())[:3] == [
        "tench",
        "goldfish",
        "great white shark",
    ]


def test_sample_feature_isolation(compat_home, fast_defaults) -> None:
    from PIL import Image
    from sklearn.datasets import load_sample_image

    photo = load_sample_image("china.jpg")  # 427 x 640
    Image.fromarray(photo).save(compat_home / "tools.jpeg")
    scope = run(block("Sample Feature Isolation"))
    image = scope["image"]
    # preprocessing_fn[0] is resnet18's own eval transform: resize 256 + centre crop 224, in [0, 1].
    assert image.shape == (1, 3, 224, 224)
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    from torchvision.models import ResNet18_Weights

    tv = ResNet18_Weights.IMAGENET1K_V1.transforms()
    saved = np.asarray(Image.open(compat_home / "tools.jpeg"))  # the JPEG the example read
    pixels = torch.from_numpy(saved.copy()).permute(2, 0, 1)[None]
    normalised = scope["preprocessing_fn"][1](image)
    # The same transform as torchvision's on float pixels; on the PIL image (resized in 8 bits)
    # only rounding differs.
    expected = tv(pixels.float() / 255)
    assert torch.allclose(normalised, expected, atol=1e-4), (normalised - expected).abs().max()
    via_pil = tv(Image.open(compat_home / "tools.jpeg"))[None]
    assert float((normalised - via_pil).abs().mean()) < 0.03
    results = scope["dict_results"]
    # target_classes=None: the top 3 predicted classes are isolated in the one sample.
    assert results["masks"].shape[0] == 3
    logits = scope["model"](normalised)
    top3 = set(logits.topk(3).indices[0].tolist())
    assert {int(c) for _, c in results["isolation_pairs"]} == top3


def test_raw_images_and_prepared_samples_give_the_same_isolation(compat_home, fast_defaults):
    from sklearn.datasets import load_sample_image

    from leapcore import engine
    from leapcore.models import get_model

    pre, model, classes = get_model("resnet18", source="torchvision")
    raw = torch.from_numpy(load_sample_image("flower.jpg")).permute(2, 0, 1)[None].float() / 255
    config = {"leap_api_key": "YOUR_LEAP_API_KEY", "isolate_classes": [[1, 2]]}
    _, prepared = engine.generate(
        "p", model, classes, config, preprocessing=pre, samples=pre[0](raw)
    )
    _, direct = engine.generate("p", model, classes, config, preprocessing=pre, samples=raw)
    assert np.allclose(prepared["masks"], direct["masks"], atol=1e-5)


def test_the_generate_signature_is_leap_ies() -> None:
    from leapcore import engine

    (signature,) = [c for h, c in code_blocks() if h == "engine.generate()"]
    documented = re.search(r"generate\((.*)\)", signature, re.S).group(1)
    params = [p.strip() for p in documented.split(",") if p.strip()]
    ours = inspect.signature(engine.generate).parameters
    assert [p.split("=")[0] for p in params] == list(ours)
    for p in params:
        if "=" in p:
            name, default = p.split("=")
            assert repr(ours[name].default) == default.replace('"', "'"), name
    text = GENERATE.read_text()
    for name in ours:
        assert f"{name} (" in text or f"{name}\n(" in text, name


def test_the_huggingface_source_of_the_readme() -> None:
    from leapcore.errors import ModelSourceError
    from leapcore.models import get_model
    from leapcore.sources import list_sources

    if "huggingface" not in list_sources():
        pytest.skip("leapcore.sources has no 'huggingface' source yet (issue 17 adds it)")
    try:
        pre, model, classes = get_model("nateraw/vit-age-classifier", source="huggingface")
    except ModelSourceError as err:  # not in the local cache: leapcore never downloads
        assert "cache" in str(err).lower()
    else:
        assert callable(pre[0]) and len(classes) > 1
