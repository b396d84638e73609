"""Segmentation models (issue 17): logits ``[B, K, H, W]`` pooled over a region, in every stage."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from leapcore import engine
from leapcore.errors import InputError
from leapcore.outputs import resolve_region

from .kinds_support import SEG_SIZE, SHAPE_NAMES, pixel_accuracy, synthetic_shapes, train_segmenter

STRIP = [0, 0, SEG_SIZE, 10]  # the top strip: x0, y0, x1, y1


@pytest.fixture(scope="session")
def segmenter() -> nn.Module:
    model = train_segmenter()
    assert pixel_accuracy(model) > 0.9
    return model


def seg_config(**overrides) -> dict:
    return {
        "input_dim": [3, SEG_SIZE, SEG_SIZE],
        "max_steps": 60,
        "find_lr_steps": 0,
        "lr": 0.05,
        "transform": "s",
        "isolation": False,
        "log_freq": 20,
        "baseline_init": 0.1,  # dark like the training background; flat mid-grey reads as a shape
        **overrides,
    }


@pytest.fixture(scope="session")
def strip_audit(segmenter):
    return engine.run(segmenter, SHAPE_NAMES, seg_config(region=STRIP), [1, 2])


def test_prototype_makes_its_class_win_in_the_region(segmenter, strip_audit):
    """Quality: each prototype makes its class the per-pixel winner over most of the region, and
    leaves pixels beyond the network's reach (15 px) from the region alone."""
    audit = strip_audit
    assert audit.model_kind == "segmentation" and audit.region == "box:0,0,32,10"
    with torch.no_grad():
        start = segmenter(audit.baseline.image)["out"].argmax(1)[0]
        won = segmenter(audit.prototypes.images)["out"].argmax(1)
    for row, cls in enumerate([1, 2]):
        assert float((start[:10] == cls).float().mean()) == 0.0
        inside = float((won[row, :10] == cls).float().mean())
        far_outside = float((won[row, 25:] == cls).float().mean())
        assert inside > 0.5, (cls, inside)
        assert far_outside < 0.2, (cls, far_outside)
        assert int(audit.prototypes.logits[row].argmax()) == cls


def test_region_column_and_metadata(tmp_path, segmenter):
    df, results = engine.generate(
        "seg",
        segmenter,
        SHAPE_NAMES,
        seg_config(region=STRIP, max_steps=4, output_dir=str(tmp_path)),
        [1],
    )
    assert set(df["region"]) == {"box:0,0,32,10"}
    assert df.attrs["model_kind"] == "segmentation"
    tables = results["tables"]
    for name in ("prototypes", "entanglement"):
        assert set(tables[name].column("region").to_pylist()) == {"box:0,0,32,10"}


def test_classifier_rows_have_an_empty_region(digits):
    from leapcore.results import audit_tables

    from .engine_support import run_digits

    audit = run_digits(digits, max_steps=2)
    assert audit.model_kind == "classifier" and audit.region is None
    assert audit_tables(audit)["prototypes"].column("region").to_pylist() == [None]


def test_isolation_keeps_the_evidence_inside_the_region(segmenter):
    """Two squares, one in a region drawn around it and one far below: isolating 'square' for the
    region keeps the first and drops the second (whole-image pooling keeps neither: noise scores
    higher than this mostly-background image)."""
    image = torch.rand((1, 3, SEG_SIZE, SEG_SIZE), generator=torch.Generator().manual_seed(3)) * 0.2
    image[0, :, 1:8, 10:17] = torch.tensor([0.9, 0.1, 0.1])[:, None, None]
    image[0, :, 22:29, 10:17] = torch.tensor([0.9, 0.1, 0.1])[:, None, None]
    # The soft saliency (isolation_keep 0): where the evidence lies, before calibration to a mask.
    config = seg_config(region=[9, 0, 18, 9], isolation=True, isolation_steps=60, isolation_keep=0)
    audit = engine.run(segmenter, SHAPE_NAMES, config, target_classes=[1], samples=image)
    mask = audit.isolation.masks[0, 0]
    top, bottom = float(mask[1:8, 10:17].mean()), float(mask[22:29, 10:17].mean())
    assert top > 0.3 and bottom < 0.1 and top > 5 * bottom, (top, bottom)  # measured 0.37, 0.03
    assert audit.isolation.logits_isolated[0] > 0


def test_region_outside_the_image_names_size_and_region(segmenter):
    calls = []
    segmenter_hook = segmenter.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(InputError, match=r"\[20, 0, 40, 10\].*32 x 32"):
            engine.run(segmenter, SHAPE_NAMES, seg_config(region=[20, 0, 40, 10]), [1])
    finally:
        segmenter_hook.remove()
    assert calls == []  # refused before the model ran
    with pytest.raises(InputError, match=r"mask has shape \[8, 8\].*32 x 32"):
        engine.run(segmenter, SHAPE_NAMES, seg_config(region=[[1] * 8] * 8), [1])


def test_region_on_a_classifier_is_refused(digits):
    from .engine_support import run_digits

    with pytest.raises(InputError, match="region .* applies to segmentation models"):
        run_digits(digits, region=[0, 0, 8, 8])


def test_mask_region_equals_box_and_pools_at_logit_resolution():
    """A mask and a box over the same pixels pool alike; at 1/4 resolution (SegFormer) a region
    covers the logit pixels it overlaps, weighted by how much."""
    box = resolve_region([0, 0, 16, 16], 32, 32)
    mask = [[1 if x < 16 and y < 16 else 0 for x in range(32)] for y in range(32)]
    as_mask = resolve_region(mask, 32, 32)
    logits = torch.randn(2, 3, 8, 8)
    assert torch.allclose(box.pool(logits), logits[:, :, :4, :4].mean((2, 3)), atol=1e-6)
    assert torch.allclose(as_mask.pool(logits), box.pool(logits), atol=1e-6)
    half = resolve_region([0, 0, 2, 4], 32, 32)  # half of the first logit pixel
    assert torch.allclose(half.pool(logits), logits[:, :, 0, 0], atol=1e-6)


def test_synthetic_shapes_are_labelled():
    images, labels = synthetic_shapes(4, 0)
    assert images.shape == (4, 3, SEG_SIZE, SEG_SIZE) and set(labels.unique().tolist()) == {0, 1, 2}


def test_report_names_the_region(strip_audit):
    from leapcore.report import render_report

    page = render_report(strip_audit, title="seg")
    assert "averaged over region box:0,0,32,10 (logit map 32 x 32)" in page
