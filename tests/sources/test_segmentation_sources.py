"""Segmentation models through the model sources (issue 17): torchvision's LR-ASPP (no pretrained
weights) logged to a real MLflow store with the pytorch flavor (pt2), loaded back and audited."""

from __future__ import annotations

import torch

from leapcore import engine
from leapcore.models import IMAGENET_MEAN, IMAGENET_STD
from leapcore.sources import load_model

CLASSES = ["background", "road", "car"]
SIZE = 64


def test_lraspp_through_mlflow_and_every_stage(mlflow_store):
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large

    from tasks.mlflow_models import log_model_with_metadata

    torch.manual_seed(0)
    model = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3).eval()
    log_model_with_metadata(
        model,
        CLASSES,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        input_shape=(3, SIZE, SIZE),
        registered_model_name="lraspp",
        input_example=torch.rand(2, 3, SIZE, SIZE),
    )
    loaded = load_model("models:/lraspp/1")
    assert loaded.class_list == CLASSES and loaded.input_shape == (3, SIZE, SIZE)
    x = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        norm = loaded.preprocessing[0](x)
        assert torch.allclose(loaded.model(norm)["out"], model(norm)["out"], atol=1e-4)
    config = {
        "input_dim": [3, SIZE, SIZE],
        "max_steps": 2,
        "find_lr_steps": 0,
        "isolation": True,
        "isolation_steps": 2,
        "max_isolate_classes": 1,
        "log_freq": 1,
        "region": [8, 8, 40, 24],
    }
    audit = engine.run(loaded.model, CLASSES, config, [1, 2], loaded.preprocessing)
    assert audit.model_kind == "segmentation" and audit.region == "box:8,8,40,24"
    assert audit.logit_size == (SIZE, SIZE)  # LR-ASPP upsamples its logits to the input size
    with torch.no_grad():
        maps = model(loaded.preprocessing[0](audit.prototypes.images))["out"]
    pooled = maps[:, :, 8:24, 8:40].mean((2, 3))
    assert torch.allclose(audit.prototypes.logits, pooled, rtol=1e-3, atol=1e-3)
    assert audit.isolation.masks.shape == (2, 1, SIZE, SIZE)


def test_multilabel_digits_through_mlflow(mlflow_store):
    """The multi-label digits model logged (pt2) and loaded back keeps its sigmoid semantics."""
    from tasks.mlflow_models import log_model_with_metadata
    from tests.engine.kinds_support import MULTI_NAMES, train_multilabel_digits

    multi = train_multilabel_digits(epochs=1)
    log_model_with_metadata(
        multi.model,
        MULTI_NAMES,
        mean=(0.25,),
        std=(0.35,),
        input_shape=(1, 32, 32),
        registered_model_name="multi-digits",
    )
    loaded = load_model("models:/multi-digits/1")
    assert loaded.class_list == MULTI_NAMES
    config = {
        "input_dim": [1, 32, 32],
        "max_steps": 3,
        "find_lr_steps": 0,
        "isolation": False,
        "log_freq": 1,
        "output": "multilabel_logits",
    }
    even = MULTI_NAMES.index("even")
    audit = engine.run(loaded.model, loaded.class_list, config, [even], loaded.preprocessing)
    assert torch.allclose(audit.prototypes.probs, torch.sigmoid(audit.prototypes.logits))
    assert abs(float(audit.entanglement[0, even]) - 1.0) < 1e-5
