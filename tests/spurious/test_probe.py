"""The scan's paint probe (leapcore.spurious_probe) on a hand-built model whose numbers are known."""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from leapcore.spurious import CLEAN, LIKELY, SUSPICIOUS, ClassScan, ScanSettings, model_probs
from leapcore.spurious_probe import (
    ProbeEvidence,
    combine,
    describe_probe,
    judge_probe,
    paint,
    probe_classes,
    probe_rule,
)


class _MarkerModel(torch.nn.Module):
    """Three classes of 1x8x8 images: 0 "bright" and 2 "dark" (the whole image's mean, a spread
    feature) and 1, a marker: the top-left 2x2 pixels bright."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean((1, 2, 3))
        corner = x[:, 0, :2, :2].mean((1, 2))
        return torch.stack([10 * (mean - 0.5), 40 * (corner - 0.5) - 3, 10 * (0.5 - mean)], 1)


def _pool() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    dark = 0.1 + 0.02 * torch.rand(4, 1, 8, 8, generator=gen)
    bright = 0.9 - 0.02 * torch.rand(4, 1, 8, 8, generator=gen)
    bright[:, :, :2, :2] = 0.1  # no marker
    return torch.cat([dark, bright])


SETTINGS = ScanSettings(probe_step=0.2)  # the hand-built logits need a full-strength marker


def test_the_probe_paints_the_marker_in_place_and_it_flips_other_images() -> None:
    model, pool = _MarkerModel(), _pool()
    probs = model_probs(model, pool, 8)
    assert (probs.max(1).values > 0.99).all() and probs.argmax(1).tolist() == [2] * 4 + [0] * 4
    found = probe_classes(model, [0, 1, 2], pool, probs, SETTINGS, 8)
    marker = found[1]
    # Eight starts (every image of another class); every blob in the corner.
    assert marker.starts == 8 and marker.reappearance == 1.0
    assert marker.regions[:, :2, :2].flatten(1).sum(1).tolist() == [3] * 8  # 5 % of 64 px
    # Pasted onto the 7 images that are not its own start, each painted corner flips all of them;
    # the same shape half an image away flips none.
    assert marker.pastes == 8 * 7 and marker.flip_rate == 1.0 and marker.control_flip_rate == 0.0
    assert judge_probe(marker, SETTINGS) == LIKELY
    # The spread classes: painting moves every pixel alike, and 3 brighter pixels change nothing.
    for c in (0, 2):
        assert found[c].flip_rate == 0.0 and judge_probe(found[c], SETTINGS) == CLEAN


def test_starts_need_not_be_confident() -> None:
    model = _MarkerModel()
    grey = torch.full((1, 1, 8, 8), 0.5)
    grey[:, :, :2, :2] = 0.1  # classes 0 and 2 tie: no paste target, but a start
    pool = torch.cat([_pool(), grey])
    probs = model_probs(model, pool, 8)
    assert probs[-1].max() < SETTINGS.target_confidence
    marker = probe_classes(model, [1], pool, probs, SETTINGS, 8)[1]
    # Starts: 8 of the 9 images not of the class, taken from row 1 on (rows 1-8: the grey one
    # too); targets: the eight confident images, each start's own image left out (the grey start
    # is no target): 8 x 8 - 7 pastes.
    assert marker.starts == 8 and marker.targets == 8
    assert marker.pastes == 8 * 8 - 7 and marker.flip_rate == 1.0 and marker.reappearance == 1.0
    # Capped at probe_starts.
    capped = ScanSettings(probe_step=0.2, probe_starts=2)
    assert probe_classes(model, [1], pool, probs, capped, 8)[1].starts == 2


def test_paint_moves_the_largest_gradient_by_the_step() -> None:
    model, pool = _MarkerModel(), _pool()
    with torch.no_grad():  # as a caller might hold it: paint turns gradients on itself
        painted, moved = paint(model, pool[:1], [1], 1, 0.2, 8)
    # The corner's gradient is 10 a pixel against 10/64 elsewhere: the corner moves 0.2.
    assert torch.allclose(moved[0, :2, :2], torch.full((2, 2), 0.2), atol=1e-5)
    assert moved[0, 2:, 2:].max() < 0.01
    assert torch.allclose(painted - pool[:1], moved[:, None], atol=1e-5)


def test_without_two_images_of_other_classes_the_probe_is_not_measured() -> None:
    model, pool = _MarkerModel(), _pool()[:1]  # one dark image: no other image to paste onto
    found = probe_classes(model, [1], pool, model_probs(model, pool, 8), SETTINGS, 8)
    assert math.isnan(found[1].flip_rate) and found[1].pastes == 0
    assert judge_probe(found[1], SETTINGS) == CLEAN


def test_probe_verdict_thresholds() -> None:
    s = ScanSettings()

    def verdict(flip: float, control: float = 0.0, reappear: float = 1.0) -> str:
        return judge_probe(ProbeEvidence(flip, control, reappear), s)

    assert verdict(s.probe_likely_flip) == LIKELY
    assert verdict(s.probe_suspicious_flip) == SUSPICIOUS
    assert verdict(s.probe_suspicious_flip - 0.05) == CLEAN
    # The control counts, and the blob must stay in place over the starts.
    assert verdict(0.9, control=0.9 - s.probe_suspicious_flip + 0.05) == CLEAN
    assert verdict(0.9, reappear=s.probe_placed_share) == LIKELY
    assert verdict(s.probe_moving_flip - 0.05, reappear=s.probe_placed_share - 0.05) == CLEAN
    assert verdict(float("nan"), float("nan"), float("nan")) == CLEAN


def test_a_probe_verdict_is_told_with_the_probes_numbers() -> None:
    import pyarrow as pa

    from leapcore.highlights import spurious_highlights
    from leapcore.report import ReportContext

    common = {"concentration": 0.2, "flip_rate": 0.0, "control_flip_rate": 0.0}
    common |= {"probe_flip_rate": 0.0, "probe_control_flip_rate": 0.0}
    table = pa.Table.from_pylist(
        [
            {"class_name": "ring", "verdict": "suspicious", "decided_by": "images", **common}
            | {"flip_rate": 0.6},
            {"class_name": "marker", "verdict": "likely spurious", "decided_by": "paint probe"}
            | common
            | {"probe_flip_rate": 0.9, "probe_control_flip_rate": 0.05},
        ]
    )
    items = spurious_highlights(None, ReportContext(tables={"spurious": table}))
    # The probe's numbers, not the class's own images' (whose blob flipped nothing).
    assert "marker is likely spurious: painted briefly" in items[0]
    assert "flips 90 % of them" in items[0] and "(5 % when pasted elsewhere)" in items[0]
    assert "ring is suspicious: a small blob holds 20 % of its evidence" in items[1]
    assert "flips 60 % of them" in items[1]


class _MovingMarkerModel(torch.nn.Module):
    """As :class:`_MarkerModel`, but class 1's marker is any of three corners (top-left,
    top-right, bottom-left): painting from an image brightens the corner already brightest, so
    the blob lands in different corners from different starts. Half an image away (the control)
    no corner is."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean((1, 2, 3))
        corners = torch.stack(
            [
                x[:, 0, :2, :2].mean((1, 2)),
                x[:, 0, :2, 6:].mean((1, 2)),
                x[:, 0, 6:, :2].mean((1, 2)),
            ]
        )
        marker = 40 * (corners.max(0).values - 0.5) - 3
        return torch.stack([10 * (mean - 0.5), marker, 10 * (0.5 - mean)], 1)


def _moving_pool() -> torch.Tensor:
    """Four dark and four bright images; in image i the corner ``i % 3`` is a little brighter
    than the other two (3, 3 and 2 images)."""
    pool = _pool()
    corners = ((slice(0, 2), slice(0, 2)), (slice(0, 2), slice(6, 8)), (slice(6, 8), slice(0, 2)))
    for i, image in enumerate(pool):
        for j, (rows, cols) in enumerate(corners):
            image[0, rows, cols] = 0.12 if j == i % 3 else 0.1
    return pool


def test_a_blob_that_moves_between_starts_but_flips_is_suspicious() -> None:
    model, pool = _MovingMarkerModel(), _moving_pool()
    probs = model_probs(model, pool, 8)
    assert (probs.max(1).values > 0.99).all() and probs.argmax(1).tolist() == [2] * 4 + [0] * 4
    found = probe_classes(model, [0, 1, 2], pool, probs, SETTINGS, 8)
    marker = found[1]
    # The blob lands in the start's brightest corner: 3 of the 8 starts share the modal one.
    assert marker.starts == 8 and marker.reappearance == 3 / 8 < SETTINGS.probe_placed_share
    # Each painted corner flips every other image; half an image away, none.
    assert marker.flip_rate == 1.0 and marker.control_flip_rate == 0.0
    verdict, branch = probe_rule(marker, SETTINGS)
    assert (verdict, branch) == (SUSPICIOUS, "paint probe (moving blob)")
    # The class's verdict says so, and its report sentence does not claim one place.
    nan = float("nan")
    own = ClassScan(1, "marker", CLEAN, "own images", 0.2, nan, nan, 0.0, 0.0, 0, 4, 0.05, 1, 0)
    scan = combine(own, marker, SETTINGS)
    assert scan.verdict == SUSPICIOUS and scan.decided_by == "paint probe (moving blob)"
    assert "moving-blob branch" in scan.reason and "in a fixed place" not in scan.reason
    # The spread classes stay clean under both branches.
    for c in (0, 2):
        assert probe_rule(found[c], SETTINGS) == (CLEAN, "")


def test_the_moving_blob_branch_needs_a_high_excess_over_its_control() -> None:
    s = ScanSettings()
    low = s.probe_placed_share - 0.1  # the blob moves between starts

    def rule(flip: float, control: float = 0.0, reappear: float = low) -> tuple[str, str]:
        return probe_rule(ProbeEvidence(flip, control, reappear), s)

    assert rule(s.probe_moving_flip) == (SUSPICIOUS, "paint probe (moving blob)")
    assert rule(s.probe_moving_flip - 0.05) == (CLEAN, "")
    # A region of any place flips as well: the control counts.
    assert rule(1.0, control=1.0 - s.probe_moving_flip + 0.05) == (CLEAN, "")
    # In place, the placed branch decides (and says so).
    assert rule(s.probe_moving_flip, reappear=s.probe_placed_share) == (LIKELY, "paint probe")
    assert rule(float("nan"), reappear=float("nan")) == (CLEAN, "")


def test_a_moving_blob_verdict_is_not_told_as_one_place() -> None:
    import pyarrow as pa

    from leapcore.highlights import spurious_highlights
    from leapcore.report import ReportContext
    from leapcore.spurious_report import _why

    row = {
        "class_name": "marker",
        "verdict": "suspicious",
        "decided_by": "paint probe (moving blob)",
    }
    row |= {"probe_flip_rate": 0.87, "probe_control_flip_rate": 0.0, "reason": "r"}
    items = spurious_highlights(
        None, ReportContext(tables={"spurious": pa.Table.from_pylist([row])})
    )
    assert "marker is suspicious: painted briefly" in items[0]
    assert "a small blob not always in one place" in items[0] and "flips 87 % of them" in items[0]
    assert "its blob not always in one place" in _why(row)


def test_a_class_whose_first_starts_flip_nothing_stops_there_and_a_marker_paints_all() -> None:
    model, pool = _MarkerModel(), _pool()
    probs = model_probs(model, pool, 8)
    early = ScanSettings(probe_step=0.2, probe_early_starts=2)
    found = probe_classes(model, [0, 1, 2], pool, probs, early, 8)
    # The spread classes flip nothing with their first 2 of 4 starts: the other 2 are not painted.
    for c in (0, 2):
        assert (found[c].starts, found[c].planned, found[c].flip_rate) == (2, 4, 0.0)
        assert found[c].pastes == 2 * 4 - 2 and "the first 2 of 4" in describe_probe(found[c])
    # The marker flips everything with its first 2: all 8 are painted, and its numbers are those
    # of the probe that never stops.
    full = probe_classes(model, [0, 1, 2], pool, probs, replace(early, probe_early_stop=0.0), 8)
    marker = found[1]
    assert (marker.starts, marker.planned, marker.pastes) == (8, 8, 8 * 7)
    assert "the first" not in describe_probe(marker)
    assert (marker.flip_rate, marker.reappearance, judge_probe(marker, early)) == (
        full[1].flip_rate,
        full[1].reappearance,
        LIKELY,
    )
    # Stopping hid nothing: painted from all their starts, the spread classes still flip nothing.
    assert [(full[c].starts, full[c].flip_rate) for c in (0, 2)] == [(4, 0.0), (4, 0.0)]
