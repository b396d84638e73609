"""Hugging Face transformers models (issue 17): a tiny ViT trained on digits and a tiny SegFormer,
saved with save_pretrained and loaded back through the folder, the local HF cache and MLflow."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from leapcore import engine  # noqa: E402
from leapcore.errors import InputError, ModelSourceError, UntrustedSourceError  # noqa: E402
from leapcore.sources import load_model  # noqa: E402
from tests.engine.kinds_support import save_tiny_segformer

DIGITS = [str(d) for d in range(10)]
MEAN, STD = (0.25,), (0.35,)


def digit_images() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.from_numpy(data.images.astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).clamp(0, 1)
    return x, torch.from_numpy(data.target.astype(np.int64))


@pytest.fixture(scope="session")
def vit_folder(tmp_path_factory) -> Path:
    """A 2-layer ViT (8x8 patches on 1x32x32 digits) trained for a few seconds, with its processor."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        num_channels=1,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=96,
        num_labels=10,
        id2label=dict(enumerate(DIGITS)),
        label2id={d: i for i, d in enumerate(DIGITS)},
    )
    model = ViTForImageClassification(config)
    x, y = digit_images()
    x, y = x[:1000], y[:1000]
    norm = (x - MEAN[0]) / STD[0]
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(10):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 50):
            idx = perm[i : i + 50]
            loss = F.cross_entropy(model(norm[idx]).logits, y[idx])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    model.eval()
    folder = tmp_path_factory.mktemp("vit")
    model.save_pretrained(folder)
    ViTImageProcessor(
        size={"height": 32, "width": 32}, image_mean=list(MEAN), image_std=list(STD)
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def segformer_folder(tmp_path_factory) -> Path:
    """A random tiny SegFormer (logits at 1/4 of the input), no image processor saved."""
    folder = tmp_path_factory.mktemp("segformer")
    save_tiny_segformer(folder, num_channels=3)
    return folder


def test_vit_folder_loads_with_classes_and_processor(vit_folder):
    loaded = load_model(vit_folder)
    assert loaded.source == "file" and loaded.metadata["format"] == "transformers"
    assert loaded.class_list == DIGITS and loaded.input_shape == (1, 32, 32)
    assert loaded.mean == MEAN and loaded.std == STD
    assert loaded.metadata["preprocessing"] == "from the saved image processor"
    x, y = digit_images()
    with torch.no_grad():
        pred = loaded.model(loaded.preprocessing[0](x[1000:1200])).logits.argmax(1)
    assert float((pred == y[1000:1200]).float().mean()) > 0.7  # it learned the digits


def test_vit_prototypes_reach_their_class(vit_folder):
    """Quality: prototypes optimised through the patch embedding make their digit the top class."""
    loaded = load_model(vit_folder, source="huggingface")
    config = {
        "input_dim": [1, 32, 32],
        "max_steps": 100,
        "find_lr_steps": 0,
        "lr": 0.05,
        "transform": "s",
        "isolation": True,
        "isolation_steps": 10,
        "max_isolate_classes": 1,
        "log_freq": 20,
    }
    targets = [1, 3, 7]
    audit = engine.run(loaded.model, loaded.class_list, config, targets, loaded.preprocessing)
    probs = audit.prototypes.probs
    start = audit.baseline.logits.softmax(1)[0]
    for row, t in enumerate(targets):
        assert float(start[t]) < 0.5
        assert int(probs[row].argmax()) == t and float(probs[row, t]) > 0.6, (t, probs[row])
    # Isolation masks on a ViT: optimised on a grid 8x coarser than the image (4 x 4 here, one cell
    # per 8x8 patch; 28 x 28 for 16-px patches at 224), shown at full resolution.
    assert audit.isolation.masks.shape[-2:] == (32, 32)
    assert float(audit.isolation.coverage.min()) < 1.0


def test_vit_has_no_batch_norm_to_fold(vit_folder):
    loaded = load_model(vit_folder)
    wrapped = engine.build_model(loaded.model, DIGITS, loaded.preprocessing, (1, 32, 32), "pt")
    with torch.no_grad():
        assert wrapped(torch.rand(2, 1, 32, 32)).shape == (2, 10)
    assert wrapped.folded is None  # folding does not apply; the model runs as it is
    strict = engine.build_model(
        loaded.model, DIGITS, loaded.preprocessing, (1, 32, 32), "pt", fold_batchnorm=True
    )
    with pytest.raises(InputError, match="cannot be folded"):
        strict(torch.rand(2, 1, 32, 32))


def test_segformer_folder_pools_quarter_resolution_logits(segformer_folder, caplog):
    loaded = load_model(segformer_folder)
    assert loaded.class_list == ["background", "square", "disk"]
    assert "no image processor" in loaded.metadata["preprocessing"]
    assert loaded.preprocessing == [] and loaded.input_shape == (3, 32, 32)
    config = {
        "input_dim": [3, 32, 32],
        "max_steps": 3,
        "find_lr_steps": 0,
        "isolation": False,
        "log_freq": 1,
        "region": [0, 0, 16, 16],
    }
    audit = engine.run(loaded.model, loaded.class_list, config, [1], loaded.preprocessing)
    assert audit.model_kind == "segmentation" and audit.logit_size == (8, 8)
    with torch.no_grad():
        maps = loaded.model(audit.prototypes.images).logits
    assert torch.allclose(audit.prototypes.logits, maps[:, :, :4, :4].mean((2, 3)), atol=1e-4)
    with pytest.raises(InputError, match=r"\[0, 0, 40, 16\].*32 x 32"):
        engine.run(loaded.model, loaded.class_list, {**config, "region": [0, 0, 40, 16]}, [1])


def fake_cache(root: Path, repo: str, folder: Path) -> Path:
    """The Hugging Face cache layout: models--org--name/snapshots/<commit>/ and refs/main."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    base = root / ("models--" + repo.replace("/", "--"))
    shutil.copytree(folder, base / "snapshots" / commit)
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    return base


def test_local_cache_ids_and_get_model(vit_folder, segformer_folder, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from leapcore.models import get_model

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    fake_cache(tmp_path, "acme/tiny-vit", vit_folder)
    for uri in ("hf:acme/tiny-vit", "huggingface:acme/tiny-vit"):
        loaded = load_model(uri)
        assert loaded.source == "huggingface" and loaded.class_list == DIGITS
    fake_cache(tmp_path, "acme/tiny-segformer", segformer_folder)
    seg = load_model("hf:acme/tiny-segformer@main")
    assert seg.metadata["task"] == "segmentation" and seg.class_list[1] == "square"
    preprocessing, model, classes = get_model("acme/tiny-vit", source="huggingface")
    normalize = preprocessing[-1]  # [eval transform of the image processor, Normalize]
    assert classes == DIGITS and normalize.mean.flatten().tolist() == list(MEAN)
    with pytest.raises(
        ModelSourceError, match="not in the local Hugging Face cache.*never downloads"
    ):
        load_model("hf:acme/not-there")


def test_untrusted_folders_are_refused_naming_trusted(vit_folder, tmp_path):
    remote = tmp_path / "remote"
    shutil.copytree(vit_folder, remote)
    config = json.loads((remote / "config.json").read_text())
    config["auto_map"] = {"AutoModelForImageClassification": "modeling_x.XModel"}
    (remote / "config.json").write_text(json.dumps(config))
    with pytest.raises(UntrustedSourceError, match="remote code.*trusted=True"):
        load_model(remote)
    pickled = tmp_path / "pickled"
    shutil.copytree(vit_folder, pickled)
    from transformers import ViTForImageClassification

    model = ViTForImageClassification.from_pretrained(vit_folder)
    (pickled / "model.safetensors").unlink()
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(UntrustedSourceError, match=r"no \.safetensors.*trusted=True"):
        load_model(pickled)
    assert load_model(pickled, trusted=True).class_list == DIGITS


def test_mlflow_transformers_flavor(vit_folder, mlflow_store):
    """Logged with MLflow's transformers flavor into a real sqlite store, read back by models:/."""
    import mlflow
    from transformers import ViTForImageClassification, ViTImageProcessor

    model = ViTForImageClassification.from_pretrained(vit_folder)
    processor = ViTImageProcessor.from_pretrained(vit_folder)
    with mlflow.start_run():
        mlflow.transformers.log_model(
            transformers_model={"model": model, "image_processor": processor},
            name="vit",
            task="image-classification",
            registered_model_name="tiny-vit",
        )
    loaded = load_model("models:/tiny-vit/1")
    assert loaded.source == "mlflow" and loaded.class_list == DIGITS
    assert loaded.mean == MEAN and loaded.input_shape == (1, 32, 32)
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        expected = model(loaded.preprocessing[0](x)).logits
        got = loaded.model(loaded.preprocessing[0](x)).logits
    assert torch.allclose(got, expected, atol=1e-5)


def test_segformer_through_the_mlflow_transformers_flavor(segformer_folder, mlflow_store):
    import mlflow
    from transformers import SegformerForSemanticSegmentation, SegformerImageProcessor

    model = SegformerForSemanticSegmentation.from_pretrained(segformer_folder)
    processor = SegformerImageProcessor(size={"height": 32, "width": 32})
    with mlflow.start_run():
        mlflow.transformers.log_model(
            transformers_model={"model": model, "image_processor": processor},
            name="segformer",
            task="image-segmentation",
            registered_model_name="tiny-segformer",
        )
    loaded = load_model("models:/tiny-segformer/1")
    assert loaded.metadata["task"] == "segmentation" and loaded.input_shape == (3, 32, 32)
    assert loaded.mean == tuple(processor.image_mean)  # the processor from components/
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.model(x).logits, model(x).logits, atol=1e-5)


def test_leapcore_and_its_sources_work_without_transformers():
    """transformers is imported lazily: blocked, leapcore and the source registry still load."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import leapcore, leapcore.engine, leapcore.outputs\n"
        "from leapcore.sources import list_sources, load_model\n"
        "assert 'huggingface' in list_sources()\n"
        "try:\n"
        "    load_model('hf:acme/x')\n"
        "except Exception as e:\n"
        "    print(type(e).__name__)\n"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root
    )
    assert out.stdout.strip() == "ModelSourceError", out.stdout + out.stderr
