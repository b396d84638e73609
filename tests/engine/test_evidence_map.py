"""``isolation_map: evidence`` (:func:`leapcore.isolation.evidence_map`) on models whose answer is known.

Two-pixel linear models, so every gradient is a weight: the map reads the class's log-probability
(the quantity deletion / insertion AUCs measure), and a soft mask admits the evidence outside it at
``1 - peak`` while a confident mask orders the pixels alone.
"""

from __future__ import annotations

import pytest
import torch

from leapcore.isolation import EVIDENCE_FLOOR, evidence_map


def linear(weights: list[list[float]]) -> torch.nn.Module:
    """Logits ``weights @ pixels`` of a ``[N, 1, 1, W]`` image."""
    layer = torch.nn.Linear(len(weights[0]), len(weights), bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weights))
    return torch.nn.Sequential(torch.nn.Flatten(), layer)


def run(model, masks, image=(1.0, 1.0)):
    source = torch.tensor([[[list(image)]]])
    return evidence_map(model, source, torch.tensor([0]), masks, torch.zeros_like(source), 1)[
        0, 0, 0
    ]


def test_evidence_ranks_by_the_class_probability_not_its_logit():
    """Pixel 1 raises class 0's logit twice as much as pixel 0 does, but raises class 1's logit just
    as much: it does nothing for class 0's probability. The map ranks pixel 0 first (a map read off
    the logit's gradient ranks pixel 1 first)."""
    model = linear([[1.0, 2.0], [0.0, 2.0]])
    saliency = run(model, torch.ones(1, 1, 1, 2))
    assert saliency[0] == pytest.approx(1.0)
    assert saliency[1] < 0.05, saliency


def test_multilabel_classes_read_their_own_sigmoid():
    """With ``output: multilabel_logits`` the classes are independent sigmoids: what a pixel does to
    class 1 does not matter, so the pixel that raises class 0's logit most ranks first."""
    model = linear([[1.0, 2.0], [0.0, 2.0]])
    model.output = "multilabel_logits"
    saliency = run(model, torch.ones(1, 1, 1, 2))
    assert saliency[1] == pytest.approx(1.0)
    assert saliency[0] == pytest.approx(0.5 + EVIDENCE_FLOOR / 2, abs=1e-3), saliency


def test_soft_mask_admits_the_evidence_outside_it_at_one_minus_its_peak():
    """Pixels with the same evidence for class 0. A mask that peaks at 1 on pixel 0 (it found the
    region) ranks pixel 1, half in, by the mask's square and leaves pixel 2 outside it at the floor
    (at the region's edge, not in a gap that :mod:`leapcore.evidence_fill` fills); a mask that stays
    soft (peak 0.4) admits pixel 1 at ``(0 + 1 - 0.4) / (0.4 ** 2 + 1 - 0.4)`` of pixel 0."""
    model = linear([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    confident = run(model, torch.tensor([[[[1.0, 0.5, 0.0]]]]), (1.0, 1.0, 1.0))
    assert confident[0] == pytest.approx(1.0)
    assert confident[1] == pytest.approx(0.25, abs=1e-3), confident
    assert confident[2] == pytest.approx(0.0, abs=1e-6)
    soft = run(model, torch.tensor([[[[0.4, 0.0, 0.0]]]]), (1.0, 1.0, 1.0))
    assert soft[0] == pytest.approx(1.0)
    assert soft[1] == pytest.approx(0.6 / 0.76, abs=1e-3), soft


def test_pixels_against_the_class_come_last():
    """A pixel that lowers class 0's probability ranks below one without evidence, inside the mask.
    (At the region's edge: one between two pixels with evidence is a gap that
    :mod:`leapcore.evidence_fill` raises to its lower neighbour's value.)"""
    model = linear([[1.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    source = torch.ones(1, 1, 1, 3)
    masks = torch.ones(1, 1, 1, 3)
    saliency = evidence_map(model, source, torch.tensor([0]), masks, torch.zeros_like(source), 1)
    assert saliency[0, 0, 0, 2] < saliency[0, 0, 0, 1] <= EVIDENCE_FLOOR + 1e-6
    assert saliency[0, 0, 0, 0] == pytest.approx(1.0)
