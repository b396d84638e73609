"""Convergence stopping of prototype optimisation (``stop_early``; ``leapcore.convergence``)."""

from __future__ import annotations

import math

import pytest
import torch

from leapcore.convergence import MetricPlateau, PlateauStop
from leapcore.optim import BatchedAdam
from tests.engine.engine_support import EXACT, RowWise, run_digits

LONG = {"max_steps": 240, "log_freq": 40, "transform": "m"}


def run_windows(
    stop: PlateauStop, windows: list[tuple[list[float], list[float]]]
) -> list[list[int]]:
    """Feed windows of 4 steps of constant view scores, each followed by a check with the clean
    scores; rows that stop leave like in the prototype loop. Returns the rows stopped per check."""
    active = list(range(len(stop.groups)))
    out = []
    for k, (clean, view) in enumerate(windows):
        for _ in range(4):
            stop.add(torch.tensor([view[r] for r in active]), active)
        done = stop.check(4 * (k + 1), torch.tensor([clean[r] for r in active]), active)
        active = [r for r in active if r not in done]
        out.append(done)
    return out


def test_a_flat_row_stops_after_patience_and_a_slow_climber_does_not():
    stop = PlateauStop([0, 1], every=4, tolerance=0.01, patience=2)
    # Row 0 sits at 0.995 (converged; its views dip and recover, no gain over the best); row 1
    # climbs from 1e-4 by 5e-4 per window: a tiny change in probability but a large one in log
    # space, i.e. an optimisation that is still starting.
    windows = [
        ([0.995, 1e-4 + 5e-4 * k], [0.99 - 0.05 * (k % 2), 1e-4 + 5e-4 * k]) for k in range(6)
    ]
    # The first check only records; two checks without gain later row 0 stops.
    assert run_windows(stop, windows) == [[], [], [0], [], [], []]
    assert stop.stopped_at == {0: 12}


def test_a_moving_view_score_keeps_a_row_running():
    """Robustness must plateau too: a clean score at 1 with a rising view score does not stop."""
    stop = PlateauStop([0], every=4, tolerance=0.01, patience=1)
    assert run_windows(stop, [([0.999], [0.5 + 0.1 * k]) for k in range(5)]) == [[]] * 5


def test_an_antitype_converges_when_its_target_probability_stops_falling():
    stop = PlateauStop([0, 1], every=4, tolerance=0.01, patience=1, antitype=True)
    # Clean scores are signed like PrototypeProblem.target_score (-p); row 1 keeps halving.
    windows = [([-0.001, -0.5 / 2**k], [0.002, 0.5 / 2**k]) for k in range(4)]
    assert run_windows(stop, windows) == [[], [0], [], []]


def test_a_plateau_below_even_odds_runs_on():
    """A row stuck at target probability 0.05 has not converged to anything worth keeping."""
    stop = PlateauStop([0], every=4, tolerance=0.01, patience=1)
    assert run_windows(stop, [([0.05], [0.05])] * 5) == [[]] * 5


def test_a_group_stops_only_when_all_its_rows_have_converged():
    stop = PlateauStop([0, 0], every=4, tolerance=0.01, patience=1)
    windows = [([0.999, 0.2 + 0.2 * k], [0.999, 0.2 + 0.2 * k]) for k in range(4)]
    assert run_windows(stop, windows) == [[], [], [], []]


def test_adam_on_some_rows_moves_them_as_a_full_step_and_leaves_the_others():
    torch.manual_seed(0)
    grads = [torch.randn(3, 4, 5)]
    full = BatchedAdam([torch.zeros(3, 4, 5)])
    part = BatchedAdam([torch.zeros(3, 4, 5)])
    for _ in range(3):
        full.step(grads, 0.1)
        part.step(grads, 0.1, torch.tensor([0, 2]))
    assert torch.equal(part.params[0][[0, 2]], full.params[0][[0, 2]])
    assert torch.equal(part.params[0][1], torch.zeros(4, 5)) and torch.equal(
        part.m[0][1], 0 * part.m[0][1]
    )


@pytest.fixture(scope="module")
def long_runs(digits):
    """The same three digits with and without convergence stopping."""
    on = run_digits(digits, [0, 3, 5], device=EXACT, **LONG)
    off = run_digits(digits, [0, 3, 5], device=EXACT, stop_early=False, **LONG)
    return on, off


def test_converged_prototypes_stop_early_and_are_as_good(long_runs):
    on, off = long_runs
    p, q = on.prototypes, off.prototypes
    stopped_at = p.extras["stopped_at"]
    assert min(stopped_at) < LONG["max_steps"] / 2, stopped_at
    _, off_on, prob_on = p.flags()
    _, off_off, prob_off = q.flags()
    assert not off_on.any()
    assert (prob_on >= prob_off - 0.02).all(), (prob_on, prob_off)
    assert (p.robust_probs >= q.robust_probs - 0.05).all(), (p.robust_probs, q.robust_probs)


def test_stopping_off_runs_every_step(long_runs):
    _, off = long_runs
    assert off.prototypes.steps == LONG["max_steps"]
    assert off.prototypes.trajectory_steps == list(range(0, LONG["max_steps"] + 1, 40))
    assert "stopped_at" not in off.prototypes.extras


def test_a_tolerance_nothing_meets_runs_to_the_cap(digits):
    audit = run_digits(
        digits, [0, 3], device=EXACT, stop_tolerance=1e-12, max_steps=60, stop_check_every=8
    )
    assert audit.prototypes.steps == 60
    assert audit.prototypes.extras["stopped_at"] == [60, 60]


def test_a_stopping_class_does_not_change_the_others(digits):
    """Rows that leave the batch take nothing with them: a class's prototype is the same bits
    whether the classes beside it stop early or not at all (a row-wise model, see RowWise)."""
    options = {
        **LONG,
        **ISOLATE,
        "model": RowWise(digits.model),
        "max_steps": 120,
        "stop_check_every": 8,
        "isolation_steps": 120,
    }
    alone = run_digits(digits, [3], device=EXACT, **options)
    among = run_digits(digits, [0, 3, 5], device=EXACT, **options)
    stopped_at = among.prototypes.extras["stopped_at"]
    assert len(set(stopped_at)) > 1, stopped_at  # the others left at other steps
    assert torch.equal(among.prototypes.images[1], alone.prototypes.images[0])
    assert stopped_at[1] == alone.prototypes.extras["stopped_at"][0]
    assert math.isclose(float(among.prototypes.logits[1, 3]), float(alone.prototypes.logits[0, 3]))
    # The same for isolation pairs that stop at different steps.
    mine = [k for k, (i, _) in enumerate(among.isolation.pairs) if i == 1]
    assert len(set(among.isolation.steps_run)) > 1, among.isolation.steps_run
    assert torch.equal(among.isolation.masks[mine], alone.isolation.masks)


# ---------------------------------------------------------------------------------------------- #
# Isolation early stop (isolation_stop_early)
# ---------------------------------------------------------------------------------------------- #
def test_metric_plateau_stops_a_flat_row_and_keeps_a_moving_one():
    stop = MetricPlateau(2, every=4, tolerance=0.01, patience=2)
    active, out = [0, 1], []
    for k in range(5):
        for _ in range(4):
            # Row 0: kept 0.9, coverage 0.3 throughout; row 1: coverage still shrinking by 0.05.
            values = torch.tensor([[0.9, 0.3], [0.9, 0.5 - 0.05 * k]])
            stop.add(values[active], active)
        done = stop.check(4 * (k + 1), active)
        active = [r for r in active if r not in done]
        out.append(done)
    assert out == [[], [], [0], [], []] and stop.stopped_at == {0: 12}


ISOLATE = {"isolation": True, "isolation_steps": 150, "max_isolate_classes": 2}


def test_isolation_stops_when_kept_logit_and_coverage_settle_and_reports_the_same(digits):
    """Soft masks (``isolation_keep`` 0: the optimised mask itself) of pairs that stopped early are
    the masks of the full run: measured max coverage difference 0.020 and mean absolute mask
    difference 0.032; with a tolerance 10x too loose (pairs stop at 40-50 steps) 0.110 and 0.114."""
    options = {**ISOLATE, "isolation_keep": 0.0, "isolation_map": "mask", "isolation_lr": 0.1}
    on = run_digits(digits, [0, 3, 5], device=EXACT, **options).isolation
    off = run_digits(digits, [0, 3, 5], device=EXACT, isolation_stop_early=False, **options)
    off = off.isolation
    assert off.steps_run == [150] * 6
    assert max(on.steps_run) < 150, on.steps_run
    assert (on.coverage - off.coverage).abs().max() <= 0.05
    assert (on.masks - off.masks).abs().flatten(1).mean(1).max() <= 0.05
