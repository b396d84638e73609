"""The learning-rate range test: ``pick_rate``'s choice, and the early stop of the range test."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from leapcore import engine
from leapcore.lr_finder import pick_rate

RATES = [10.0**e for e in range(-4, 3)]  # 7 windows, one decade apart


def test_picks_the_start_of_the_steepest_fall():
    # Smoothed (3-window mean): 9.5, 9, 7.67, 4.33, 2, 1.67, 3.5 -> steepest between windows 2 and 3.
    losses = [10.0, 9.0, 8.0, 6.0, -1.0, 2.0, 5.0]
    rate, reason = pick_rate(RATES, losses)
    assert reason == ""
    assert rate == RATES[2]


def test_a_loss_that_only_rises_gives_no_rate():
    rate, reason = pick_rate(RATES, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    assert rate is None
    assert "only rose" in reason


def test_non_finite_windows_are_left_out_and_too_few_give_no_rate():
    rate, reason = pick_rate(RATES[:4], [5.0, math.nan, math.inf, 1.0])
    assert rate is None and reason == "only 2 finite loss windows (need 3)"
    # The NaN window is skipped, not read as a fall: the steepest finite fall is picked.
    rate, _ = pick_rate(RATES[:5], [5.0, math.nan, 4.9, 1.0, 0.9])
    assert rate == RATES[2]


def _reference(rates: list[float], losses: list[float]) -> float | None:
    """The same rule written directly: 3-window mean, slope per unit of log rate, steepest fall."""
    import numpy as np

    r, y = np.log(np.asarray(rates)), np.asarray(losses)
    smooth = np.array([y[max(0, i - 1) : i + 2].mean() for i in range(len(y))])
    slopes = np.diff(smooth) / np.diff(r)
    best = int(np.argmin(slopes))
    return float(rates[best]) if slopes[best] < 0 else None


def test_matches_a_direct_reference_on_uneven_rates():
    """Uneven spacing: the slope is per log rate, so a fall over a short span can beat a bigger one."""
    import random

    gen = random.Random(5)
    for _ in range(50):
        rates = sorted({10 ** gen.uniform(-4, 1) for _ in range(8)})
        losses = [gen.uniform(-2, 5) for _ in rates]
        assert pick_rate(rates, losses)[0] == _reference(rates, losses)


class NearGrey(nn.Module):
    """Class 0's logit peaks at a uniform 0.6 image: large rates overshoot into saturated pixels, so
    the range test's loss rises far above its best (a loss that only a bounded image cannot hide)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = 1 - 100 * (x - 0.6).pow(2).mean((1, 2, 3))
        return torch.stack([score, torch.zeros_like(score)], 1)


def _range_test(stop_lr_early: bool):
    return engine.run(
        NearGrey(),
        ["peak", "other"],
        {
            "input_dim": [1, 16, 16],
            "find_lr_steps": 60,
            "num_lr_windows": 30,
            "min_lr": 1e-4,
            "max_lr": 1e4,
            "max_steps": 0,
            "isolation": False,
            "stop_lr_early": stop_lr_early,
        },
        [0],
    ).lr


def test_lr_finder_stops_early_when_the_loss_diverges():
    early, full = _range_test(True), _range_test(False)
    assert len(full.losses) == 30
    # The stop fires once a window's loss passes best + 3 * |best|, long before the last window ...
    assert len(early.losses) < 25, early.losses
    best = min(early.losses)
    assert early.losses[-1] > best + 3 * abs(best)
    # ... and the windows it ran are the same windows the full test ran.
    assert early.losses == full.losses[: len(early.losses)]


def test_a_short_range_test_sweeps_the_whole_range():
    """A few dozen steps (fewer than ``num_lr_windows``) still reach ``max_lr``: one step per window
    over the whole range (before, the first ``find_lr_steps`` of 50 windows ended near 1e-3)."""
    from leapcore.config import load_config
    from leapcore.lr_finder import window_rates

    config = load_config({"find_lr_steps": 12, "min_lr": 1e-4, "max_lr": 1.0})
    rates = window_rates(config)
    assert len(rates) == 12
    assert rates[0] == pytest.approx(1e-4) and rates[-1] == pytest.approx(1.0)
    assert len(window_rates(load_config({"find_lr_steps": 500}))) == 50
    short = engine.run(
        NearGrey(),
        ["peak", "other"],
        {
            "input_dim": [1, 16, 16],
            "find_lr_steps": 12,
            "min_lr": 1e-4,
            "max_lr": 1.0,
            "max_steps": 0,
            "isolation": False,
            "stop_lr_early": False,
        },
        [0],
    ).lr
    assert len(short.losses) == 12 and short.rates[-1] == pytest.approx(1.0)
