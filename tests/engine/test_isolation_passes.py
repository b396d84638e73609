"""The isolation call's model passes: each image it needs is scored once, and reusing a pass changes
no reported number.

Issue 19 (time): the full logits come with the evidence gradient, the calibration's logits of the
chosen mask are its kept logit and probability, deletion and insertion share their end points, and
the calibration scores its candidate levels in blocks. Each test compares against the plain way of
computing the same number (a fresh forward, one curve at a time, one level at a time).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import leapcore.isolation_methods as methods
from leapcore.config import load_config
from leapcore.faithfulness import curve_auc, deletion_insertion_curves, perturbation_curves
from leapcore.isolation import evidence_gradient, evidence_map, isolate_features
from leapcore.isolation_methods import (
    AUC_STEPS,
    LEVELS,
    IsolationResult,
    calibrated,
    class_logits,
    logits_rows,
)

SIZE = 16


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.ReLU(),
            nn.AvgPool2d(4),
            nn.Flatten(),
            nn.Linear(6 * (SIZE // 4) ** 2, 5),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) * 4.0


class _Counted(nn.Module):
    """Counts the images through the model, those with autograd on apart."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.images, self.grad = model, 0, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images += len(x)
        self.grad += len(x) if torch.is_grad_enabled() else 0
        return self.model(x)


@pytest.fixture()
def case():
    model = _Net().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    images = torch.rand(5, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    cls = model(images).argmax(1)
    return model, images, cls


@pytest.mark.parametrize("batch_size", [None, 7])
@pytest.mark.parametrize("given", [False, True])
def test_one_pass_gives_both_curves_of_one_mode_at_a_time(case, batch_size, given):
    model, images, cls = case
    maps = torch.randn(5, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    options = {"steps": 8, "substrate": "blur", "batch_size": batch_size}
    counted = _Counted(model)
    deletion, insertion = deletion_insertion_curves(
        counted,
        images,
        maps,
        cls.tolist(),
        image_logits=model(images) if given else None,
        **options,
    )
    # 2 * steps images each, one fewer when the unperturbed image's logits are given.
    assert counted.images == 5 * (2 * 8 - given)
    alone = perturbation_curves(model, images, maps, cls.tolist(), **options)
    torch.testing.assert_close(deletion, alone, atol=1e-6, rtol=0)
    alone = perturbation_curves(model, images, maps, cls.tolist(), mode="insertion", **options)
    torch.testing.assert_close(insertion, alone, atol=1e-6, rtol=0)


def _one_level_at_a_time(model, source, cls, saliency, background, full, keep):
    """The calibration as it was: one forward per level for the pairs still searching."""
    n, _, h, w = saliency.shape
    ranks = saliency.flatten(1).argsort(1, descending=True).argsort(1).view(n, 1, h, w)
    chosen = [h * w] * n
    need = full - (1 - keep) * full.abs()
    for level in LEVELS[:-1]:
        todo = [p for p in range(n) if chosen[p] == h * w]
        count = round(level * h * w)
        top = (ranks[todo] < count).float()
        view = source[todo] * top + background[todo] * (1 - top)
        ok = model(view).gather(1, cls[todo, None]).squeeze(1) >= need[todo]
        for p, passed in zip(todo, ok.tolist()):
            chosen[p] = count if passed else chosen[p]
    return torch.cat([(ranks[p] < chosen[p]).float()[None] for p in range(n)])


@pytest.mark.parametrize("per_pass", [1, 2, 5, 100])
def test_calibration_in_blocks_chooses_what_one_level_at_a_time_chooses(
    case, per_pass, monkeypatch
):
    """Blocks of 1, 2, 5 and all levels choose the same masks; the logits returned for each chosen
    mask are those of a fresh forward on it (within float noise of another batch size)."""
    model, images, cls = case
    saliency = torch.rand(5, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    background = torch.rand(images.shape, generator=torch.Generator().manual_seed(4))
    full = class_logits(model, images, cls, 5)
    monkeypatch.setattr(methods, "levels_per_pass", lambda device, rows, pairs: per_pass)
    for keep in (0.5, 0.9, 0.99):
        masks, rows = calibrated(model, images, cls, saliency, background, full, keep, 64)
        expected = _one_level_at_a_time(model, images, cls, saliency, background, full, keep)
        assert torch.equal(masks, expected), keep
        isolated = images * masks + background * (1 - masks)
        torch.testing.assert_close(rows, model(isolated), atol=1e-5, rtol=1e-5)
    # The masks differ between pairs and keeps: the test does not pass on one trivial answer.
    coverages = {round(float(c), 3) for c in masks.flatten(1).mean(1)}
    assert len(coverages) > 1, coverages


def test_reused_passes_report_what_fresh_passes_measure(case):
    """kept logit and probability, and the AUCs, from reused passes equal fresh forwards."""
    model, images, cls = case
    saliency = torch.rand(5, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    background = torch.rand(images.shape, generator=torch.Generator().manual_seed(6))
    full_rows = model(images)
    full = full_rows.gather(1, cls[:, None]).squeeze(1)
    pairs = [(i, int(c)) for i, c in enumerate(cls)]
    for keep in (0.9, 0.0):
        result = IsolationResult.from_saliency(
            model, pairs, images, cls, saliency, background, full, "t", 0.0, 5, keep,
            full_rows=full_rows, rows=13,
        )  # fmt: skip
        fresh = model(result.isolated)
        logit = fresh.gather(1, cls[:, None]).squeeze(1)
        torch.testing.assert_close(result.logits_isolated, logit, atol=1e-5, rtol=1e-5)
        prob = fresh.softmax(1).gather(1, cls[:, None]).squeeze(1)
        torch.testing.assert_close(result.prob_isolated, prob, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(
            result.prob_full, full_rows.softmax(1).gather(1, cls[:, None])[:, 0]
        )
        deletion = perturbation_curves(model, images, saliency[:, 0], cls.tolist(), steps=AUC_STEPS)
        insertion = perturbation_curves(
            model, images, saliency[:, 0], cls.tolist(), steps=AUC_STEPS, mode="insertion"
        )
        torch.testing.assert_close(result.deletion_auc, curve_auc(deletion), atol=1e-6, rtol=0)
        torch.testing.assert_close(result.insertion_auc, curve_auc(insertion), atol=1e-6, rtol=0)
        assert result.calibration_seconds is not None and result.map_seconds is not None


def test_the_evidence_gradient_comes_with_the_full_logits(case):
    model, images, cls = case
    logits, gradient = evidence_gradient(model, images, cls, 2)
    torch.testing.assert_close(logits, logits_rows(model, images, 5), atol=1e-6, rtol=0)
    masks = torch.rand(5, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(7))
    background = torch.rand(images.shape, generator=torch.Generator().manual_seed(8))
    evidence = (gradient * (images - background)).sum(1, keepdim=True)
    given = evidence_map(model, images, cls, masks, background, 2, evidence=evidence)
    assert torch.equal(given, evidence_map(model, images, cls, masks, background, 2))


def test_the_default_call_scores_each_image_it_needs_once(case):
    """11 images with autograd per pair (10 mask steps and the evidence gradient at the image,
    which also gives the full logits), then per pair the calibration's levels up to its chosen
    one and ``2 * AUC_STEPS - 1`` AUC images (the unperturbed image's point is the full logits)."""
    model, images, cls = case
    counted = _Counted(model)
    config = load_config({"input_dim": [3, SIZE, SIZE], "isolation_keep": 0.9})
    result = isolate_features(counted, images, [[int(c)] for c in cls], config, 5)
    assert counted.grad == 5 * (config.steps_for_isolation + 1)
    levels = {round(level * SIZE * SIZE): i for i, level in enumerate(LEVELS)}
    kept_pixels = result.masks.flatten(1).sum(1).round().long().tolist()
    searched = sum(min(levels[k] + 1, len(LEVELS) - 1) for k in kept_pixels)
    assert counted.images - counted.grad == searched + 5 * (2 * AUC_STEPS - 1)
