"""``benchmarks/fidelity.py`` reads issue 19's goal off its own tables: where leapcore's default
wins, is level with or loses to each captum row, and which rows dominate which."""

from __future__ import annotations

import math

from benchmarks.fidelity import against_captum

NAN = math.nan


def row(name, deletion, insertion, mass=NAN):
    return (name, deletion, insertion, mass, 1.0, 0.5, 40, 10)


def test_photo_table_names_the_losses_and_the_trade():
    # The scikit-image photos' numbers of record: IG deletes better, Occlusion inserts better.
    rows = [
        row("leapcore mask", 0.216, 0.518),
        row("leapcore mask (old)", 0.3, 0.3),
        row("Saliency", 0.30, 0.40),
        row("IntegratedGradients signed", 0.108, 0.425),
        row("Occlusion signed", 0.280, 0.553),
        row("random", 0.9, 0.1),
    ]
    verdict = against_captum(rows)
    assert {(m, n) for m, n, *_ in verdict["lost"]} == {
        ("deletion", "IntegratedGradients signed"),
        ("insertion", "Occlusion signed"),
    }
    assert verdict["dominates"] == ["Saliency"]  # not random or leapcore's own rows
    assert verdict["dominated_by"] == []


def test_marker_table_counts_mass_and_calls_small_gaps_level():
    rows = [
        row("leapcore mask", 0.098, 0.949, 0.360),
        row("IntegratedGradients signed", 0.754, 0.969, 0.31),
        row("GradientShap signed", 0.743, 0.952, 0.363),
        row("Occlusion abs", 0.098, 0.915, 0.10),
    ]
    verdict = against_captum(rows)
    assert {(m, n) for m, n, *_ in verdict["lost"]} == {("insertion", "IntegratedGradients signed")}
    assert {(m, n) for m, n, *_ in verdict["level"]} == {
        ("insertion", "GradientShap signed"),
        ("marker mass", "GradientShap signed"),
        ("deletion", "Occlusion abs"),
    }
    assert verdict["dominates"] == ["GradientShap signed", "Occlusion abs"]


def test_a_captum_row_better_on_every_measure_dominates():
    rows = [row("leapcore mask", 0.3, 0.5), row("Occlusion signed", 0.2, 0.6)]
    verdict = against_captum(rows)
    assert verdict["dominated_by"] == ["Occlusion signed"]
    assert verdict["won"] == [] and verdict["dominates"] == []
