"""The image rule's content check: a genuine stroke in a fixed place that flips other classes'
images is made of what other classes' images hold elsewhere; a planted marker is not."""

from __future__ import annotations

import math

import pytest
import torch

from leapcore.spurious import CLEAN, LIKELY, Evidence, ScanSettings, judge
from leapcore.spurious_verdict import elsewhere_ratio

from .testbed import MarkerSpec, audit_prototypes, data_samples, scan, train_pair

# The test bed's held-out pair "digits ring 5 px at (2, 14) -> class 6, seed 8"
# (benchmarks/spurious_testbed.py, HELDOUT[2]). Its clean twin's class 7, scanned with its 32 own
# held-out images, was the image rule's worst false alarm (likely spurious, excess flip 0.41): the
# empty bottom of a 7 sits in one place in every 7, and pasted onto a 6, 8 or 3 it wipes their
# bottom stroke, so they turn into 7s.
SPEC = MarkerSpec("digits", 5, (0.9,), "ring", (2, 14), 6, seed=8)
# The other one: "digits cross 4 px at (14, 20) -> class 3, seed 30" (FRESH4), whose twin's 4 the
# old rule called suspicious (every image's blob in place, excess flip 0.25): the left end of a 4's
# bar, pasted onto 3s and 8s, makes them 4s.
PAIRS = {
    "heldout s8": (SPEC, 7),
    "fresh4 s30": (MarkerSpec("digits", 4, (1.0,), "cross", (14, 20), 3, seed=30), 4),
}


def _bars(count: int, gen: torch.Generator) -> torch.Tensor:
    """``count`` dark 1x32x32 images, each with a bright 2x8 bar somewhere in its lower half."""
    images = torch.rand(count, 1, 32, 32, generator=gen) * 0.1
    for image in images:
        top, left = (int(v) for v in torch.randint(18, 28, (2,), generator=gen))
        image[:, top : top + 2, left - 14 : left - 6] = 1.0
    return images


def test_the_ratio_is_small_for_content_other_images_hold_elsewhere_and_large_for_a_foreign_one():
    gen = torch.Generator().manual_seed(0)
    targets = _bars(8, gen)
    region = torch.zeros(32, 32, dtype=torch.bool)
    region[2:6, 10:22] = True  # the top: no target has anything bright there
    source = torch.rand(1, 1, 32, 32, generator=gen) * 0.1
    stroke = source.clone()
    stroke[:, :, 3:5, 12:20] = 1.0  # the targets' bar, in a place where none of them has it
    marker = source.clone()
    marker[:, :, 2:6, 10:22] = ((torch.arange(12)[None, :] + torch.arange(4)[:, None]) % 2).float()
    familiar = elsewhere_ratio(stroke, region, targets)
    foreign = elsewhere_ratio(marker, region, targets)
    assert familiar < 0.15 < 0.6 < foreign  # measured 0.06 and 0.95
    # A coarser search (a stride over the placements) finds no better match than the full one.
    assert elsewhere_ratio(stroke, region, targets, max_positions=64) >= familiar - 1e-6
    # Nothing to compare: NaN, and NaN never changes a verdict.
    assert math.isnan(elsewhere_ratio(stroke, region, targets[:0]))
    assert math.isnan(elsewhere_ratio(stroke, torch.zeros_like(region), targets))
    flagged = Evidence(0.3, 1.0, 0.9, 0.6, 0.0)
    settings = ScanSettings()
    assert judge(flagged, settings)[0] == LIKELY
    assert judge(Evidence(0.3, 1.0, 0.9, 0.6, 0.0, float("nan")), settings)[0] == LIKELY
    assert judge(Evidence(0.3, 1.0, 0.9, 0.6, 0.0, settings.elsewhere_ratio), settings)[0] == LIKELY
    verdict, reason = judge(Evidence(0.3, 1.0, 0.9, 0.6, 0.0, familiar), settings)
    assert verdict == CLEAN and "only elsewhere" in reason and f"{familiar:.2f} times" in reason


@pytest.fixture(scope="module", params=list(PAIRS))
def scanned(request):
    spec, genuine = PAIRS[request.param]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the benchmark
    try:
        marked, twin = train_pair(spec)
        audits = audit_prototypes(marked), audit_prototypes(twin)
        own, clean = data_samples(spec, marked, 32)
        old = ScanSettings(elsewhere_ratio=0.0)  # the rule before the content check
        yield {
            "spec": spec,
            "genuine": genuine,
            "marked": scan(audits[0], samples=own),
            "twin": scan(audits[1], samples=clean),
            "twin_old": scan(audits[1], old, samples=clean),
        }
    finally:
        torch.set_num_threads(threads)


def test_a_genuine_stroke_in_place_is_clean_and_the_marker_stays_flagged(scanned) -> None:
    settings = ScanSettings()
    old = {s.class_index: s for s in scanned["twin_old"]}[scanned["genuine"]]
    new = {s.class_index: s for s in scanned["twin"]}[scanned["genuine"]]
    # Without the check the twin's genuine class is flagged by the image rule (measured: the 7
    # likely spurious, reappearance 0.71 of 7 images, excess flip 0.41, ratio 0.06; the 4
    # suspicious, reappearance 1.0, excess 0.25, ratio 0.20) ...
    assert old.verdict != CLEAN and old.decided_by == "images"
    assert (old.verdict, new.verdict) == (judge(_evidence(old, float("nan")), settings)[0], CLEAN)
    # ... with it, the same numbers and a content that other digits hold elsewhere: clean.
    assert new.verdict == CLEAN and "only elsewhere" in new.reason
    assert new.elsewhere_ratio < settings.elsewhere_ratio
    assert (new.reappearance, new.flip_rate) == (old.reappearance, old.flip_rate)
    assert all(s.verdict == CLEAN for s in scanned["twin"]), "the twin raises no alarm"
    # The marker is foreign to the data: still flagged by the image rule (measured ratios 0.33, 0.36).
    marker = {s.class_index: s for s in scanned["marked"]}[scanned["spec"].marker_class]
    assert (marker.verdict, marker.decided_by) == (LIKELY, "images")
    assert marker.elsewhere_ratio >= settings.elsewhere_ratio
    assert judge(_evidence(marker), settings)[0] == marker.verdict
    # Only classes whose numbers the image rule would flag pay for the check; the rest have none.
    for s in scanned["marked"] + scanned["twin"]:
        excess = s.flip_rate - s.control_flip_rate
        placed = not math.isnan(s.reappearance) and s.reappearance >= settings.placed_share
        stable = not math.isnan(s.reappearance) and s.reappearance >= settings.stable_share
        would = (excess >= settings.likely_flip and placed) or (
            excess >= settings.suspicious_flip and stable
        )
        assert math.isnan(s.elsewhere_ratio) == (not would), s.class_name


def _evidence(scan_row, elsewhere: float | None = None) -> Evidence:
    """A scanned class's image-rule numbers as the verdict's :class:`Evidence`."""
    return Evidence(
        scan_row.concentration,
        scan_row.reappearance,
        scan_row.consistency,
        scan_row.flip_rate,
        scan_row.control_flip_rate,
        scan_row.elsewhere_ratio if elsewhere is None else elsewhere,
    )
