"""The spurious-feature scan (leapcore.spurious) on the marker test bed and its parts by formula."""

from __future__ import annotations

import math

import pytest
import torch

from leapcore.spurious import (
    CLEAN,
    LIKELY,
    SUSPICIOUS,
    ScanSettings,
    centroid_spread,
    connected_components,
    judge,
    pairwise_iou,
    top_region,
)
from leapcore.spurious_report import spurious_metrics, spurious_tag, spurious_to_arrow

from .testbed import MarkerSpec, audit_prototypes, plant, scan, train_pair

# Two pairs of the benchmark's twelve (benchmarks/spurious_testbed.py), one per dataset.
PAIRS = {
    "digits": MarkerSpec("digits", 7, (0.8,), "cross", (12, 24), 9, seed=4),
    "photos": MarkerSpec("photos", 4, (0.0, 0.0, 0.0), "square", (14, 14), 4, seed=4),
}


@pytest.fixture(scope="module", params=list(PAIRS))
def scanned(request):
    # One thread, as in the benchmark: a verdict rests on two to four short-run prototypes per
    # class, and thread counts change their last bits and so, now and then, where a blob lands.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        spec = PAIRS[request.param]
        marked, twin = train_pair(spec)
        assert marked.marker_flip_rate > 0.9 and twin.marker_flip_rate < 0.05
        audited = audit_prototypes(marked)
        yield spec, audited, scan(audited), scan(audit_prototypes(twin))
    finally:
        torch.set_num_threads(threads)


def test_the_marked_class_is_flagged_and_the_clean_twin_raises_no_alarm(scanned) -> None:
    spec, _, scans, twin_scans = scanned
    by_class = {s.class_index: s for s in scans}
    marked = by_class[spec.marker_class]
    assert marked.verdict in (SUSPICIOUS, LIKELY), marked.reason
    # The blob sits on the marker: most of the outlined blobs overlap its box.
    assert marked.flip_rate >= 0.3 and marked.stability >= 0.2
    assert marked.flip_rate > marked.control_flip_rate + 0.15  # the region, not any region
    assert "prototypes alone (no samples given)" in marked.reason
    assert [s.class_name for s in twin_scans if s.verdict != CLEAN] == []
    assert marked.evidence_png.startswith(b"\x89PNG") and marked.paste_png.startswith(b"\x89PNG")


def test_samples_join_the_evidence_and_the_paste_targets(scanned) -> None:
    spec, audited, _, _ = scanned
    marked = audited.trained
    others = marked.test_x[marked.test_y != spec.marker_class][:6]
    samples = torch.cat([plant(others[:3], spec), others[3:]])  # 3 marked, 3 clean
    scans = scan(audited, samples=samples)
    target = next(s for s in scans if s.class_index == spec.marker_class)
    assert target.samples == 3  # the marked ones, which the model assigns to the marker class
    assert "and 3 samples" in target.reason
    assert target.verdict != CLEAN


# ---------------------------------------------------------------------------------------------- #
# The parts, by formula
# ---------------------------------------------------------------------------------------------- #
def test_top_region_keeps_the_blob_with_most_mass() -> None:
    saliency = torch.zeros(10, 10)
    saliency[1:3, 1:3] = 1.0  # 4 pixels, mass 4
    saliency[7, 7] = 1.5  # 1 pixel, mass 1.5, the single highest value
    region = top_region(saliency, 0.05)  # top 5 pixels: both blobs
    assert region.sum() == 4 and region[1:3, 1:3].all() and not region[7, 7]


def test_connected_components_by_hand() -> None:
    mask = torch.zeros(6, 6, dtype=torch.bool)
    mask[0, 0] = mask[1, 1] = True  # diagonal neighbours: one component
    mask[4, 4] = mask[4, 5] = True
    mask[0, 5] = True
    labels = connected_components(mask)
    assert labels[0, 0] == labels[1, 1] != labels[4, 4] == labels[4, 5] != labels[0, 5]
    assert len(labels.unique()) == 4 and (labels[~mask] == 0).all()


def test_iou_and_centroid_spread_by_hand() -> None:
    a = torch.zeros(2, 8, 8, dtype=torch.bool)
    a[0, 0:2, 0:2] = True
    a[1, 0:2, 1:3] = True  # overlaps 2 of 6 pixels
    assert pairwise_iou(a) == pytest.approx(2 / 6)
    assert math.isnan(pairwise_iou(a[:1]))
    assert centroid_spread(a) == pytest.approx(0.5 / math.hypot(8, 8))
    same = torch.stack([a[0], a[0]])
    assert pairwise_iou(same) == 1.0 and centroid_spread(same) == 0.0


def test_verdict_thresholds() -> None:
    s = ScanSettings()
    assert judge(0.3, 0.6, 0.6, s)[0] == LIKELY
    assert judge(0.3, 0.25, 0.6, s)[0] == LIKELY  # flips most: partly in place suffices
    assert judge(0.3, 0.6, 0.3, s)[0] == SUSPICIOUS
    assert judge(0.3, 0.25, 0.4, s)[0] == CLEAN  # flips some, but not in place
    assert judge(0.3, 0.1, 0.9, s)[0] == CLEAN  # a blob that moves is not a fixed marker
    assert judge(0.6, 0.6, 0.0, s)[0] == SUSPICIOUS  # concentrated and fixed
    verdict, reason = judge(0.3, 0.6, float("nan"), s)
    assert verdict == CLEAN and "not measured (no images of other classes)" in reason


def test_table_metrics_and_tag(scanned) -> None:
    spec, _, scans, _ = scanned
    table = spurious_to_arrow(scans, ScanSettings())
    assert table.num_rows == len(scans)
    assert table.schema.metadata[b"leapcore.schema"] == b"spurious"
    metrics = spurious_metrics(table)
    name = scans[spec.marker_class].class_name
    assert metrics[f"spurious/{name}/severity"] >= 1.0
    assert metrics["spurious/flagged_classes"] == sum(s.verdict != CLEAN for s in scans)
    assert name in spurious_tag(table)
