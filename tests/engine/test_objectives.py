"""Objectives compose like lucent's: logit terms and image penalties add, subtract and scale, and the
config's objective is built from them (bit-identical runs: tests/engine/test_determinism.py)."""

from __future__ import annotations

import pytest
import torch

from leapcore import penalties
from leapcore.config import load_config
from leapcore.errors import InputError
from leapcore.objectives import (
    CentreCoverage,
    Coverage,
    Diversity,
    HighFrequency,
    ImageView,
    TargetLogit,
    TargetMargin,
    build_objective,
)


def _batch():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 5, generator=gen)
    weights = torch.zeros(4, 5)
    weights[torch.arange(4), torch.tensor([0, 2, 4, 1])] = 1.0
    images = torch.rand(4, 3, 8, 8, generator=gen)
    alphas = torch.rand(4, 1, 8, 8, generator=gen)
    group = torch.tensor([0, 0, 1, 1])
    return logits, weights, images, alphas, group


def test_terms_add_subtract_and_scale():
    z, w, images, alphas, group = _batch()
    objective = TargetMargin() - 0.5 * HighFrequency() - 0.25 * Coverage() + 2 * TargetLogit()
    others = z.masked_fill(w != 0, float("-inf")).amax(1)
    margin = (z * w).sum(1) - w.sum(1) * others
    torch.testing.assert_close(objective(z, w), margin + 2 * (z * w).sum(1))
    view = ImageView(lambda: images, alphas, group)
    expected = 0.5 * penalties.high_frequency(images) + 0.25 * penalties.coverage(alphas)
    torch.testing.assert_close(objective.penalty(view), expected)
    assert objective.name == "margin + -0.5 * high_frequency + -0.25 * coverage + 2 * logit"
    # a - b is a + (-1) * b, and scaling a sum scales every term
    twice = 2 * (TargetLogit() - HighFrequency())
    assert [t.scale for t in twice.terms] == [2.0, -2.0]
    torch.testing.assert_close(
        twice.penalty(ImageView(lambda: images, None, group)),
        2 * penalties.high_frequency(images),
    )


def test_image_terms_render_the_images_once_and_skip_what_is_not_there():
    _, _, images, _, group = _batch()
    calls = []

    def render():
        calls.append(1)
        return images

    objective = TargetLogit() - HighFrequency() - Diversity() - Coverage() - CentreCoverage()
    penalty = objective.penalty(ImageView(render, None, group))  # no alpha channel: no coverage
    assert len(calls) == 1
    torch.testing.assert_close(
        penalty, penalties.high_frequency(images) + penalties.diversity(images, group)
    )


def test_an_objective_without_a_logit_term_is_refused_when_it_meets_the_model():
    z, w, *_ = _batch()
    with pytest.raises(InputError, match="has no term that reads the model's logits"):
        (-HighFrequency())(z, w)


def test_the_config_builds_the_objective_it_describes():
    plain = build_objective(load_config({}))
    assert [(t.name, t.scale) for t in plain.terms] == [("margin", 1.0)]
    config = load_config(
        {
            "objective": "logit",
            "hf_weight": 0.5,
            "diversity_weight": 0.2,
            "use_alpha": True,
            "alpha_weight": 0.3,
            "alpha_mask": True,
        }
    )
    assert [(t.name, t.scale) for t in build_objective(config).terms] == [
        ("logit", 1.0),
        ("high_frequency", -0.5),
        ("diversity", -0.2),
        ("coverage", -0.3),
        ("centre_coverage", -1.0),
    ]
    # alpha penalties need an alpha channel
    no_alpha = build_objective(load_config({"alpha_weight": 0.3, "alpha_mask": True}))
    assert [t.name for t in no_alpha.terms] == ["margin"]
