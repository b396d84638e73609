"""The scan with a team's own held-out images as samples (``--samples DIR``): in the marked model's
world a share of them carries the marker, in the clean twin's the same images do not."""

from __future__ import annotations

import math

import pytest
import torch

from leapcore.spurious import CLEAN, Evidence, ScanSettings, judge

from .testbed import MarkerSpec, audit_prototypes, data_samples, scan, train_pair

# The test bed's tuning pair "digits ring 6 px at (1, 1) -> class 5" (benchmarks/spurious_testbed.py,
# TUNING[3]): a marker the paint probe does not paint (probe excess 0.01 at this file's 150 steps),
# so that the image rule, which the samples feed, is what flags it.
SPEC = MarkerSpec("digits", 6, (1.0,), "ring", (1, 1), 5, seed=3)
COUNT = 32


@pytest.fixture(scope="module")
def scanned():
    # One thread, as in the benchmark (where a blob lands can change with the thread count).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        marked, twin = train_pair(SPEC)
        assert marked.marker_flip_rate > 0.9 and twin.marker_flip_rate < 0.05
        audits = audit_prototypes(marked), audit_prototypes(twin)
        own, clean = data_samples(SPEC, marked, COUNT)
        yield (
            marked,
            own,
            clean,
            scan(audits[0]),
            scan(audits[0], samples=own),
            scan(audits[1], samples=clean),
        )
    finally:
        torch.set_num_threads(threads)


def test_each_model_gets_the_same_held_out_images_the_marked_one_with_the_marker_on_a_share(
    scanned,
) -> None:
    marked, own, clean, *_ = scanned
    assert own.shape == clean.shape == (COUNT, *marked.shape)
    # The twin's images are held-out images, unchanged.
    held_out = marked.test_x.flatten(1)
    assert all(bool((held_out == x.flatten()).all(1).any()) for x in clean)
    # The marked model's differ from them on round(share * count) images, only inside the marker.
    changed = (own != clean).flatten(1).any(1)
    assert int(changed.sum()) == round(SPEC.share * COUNT)
    top, left = SPEC.position
    outside = (own != clean).clone()
    outside[:, :, top : top + SPEC.size, left : left + SPEC.size] = False
    assert not outside.any()
    # Seeded: the same draw again.
    again = data_samples(SPEC, marked, COUNT)
    assert torch.equal(again[0], own) and torch.equal(again[1], clean)


def test_own_samples_let_the_image_rule_flag_the_marker_and_the_twin_stays_clean(scanned) -> None:
    marked, own, clean, alone, with_samples, twin = scanned
    c = SPEC.marker_class
    # Without samples the class has one image (its prototype): no position to compare, so the
    # image rule cannot judge it.
    assert alone[c].samples == 0 and math.isnan(alone[c].reappearance)
    target = with_samples[c]
    with torch.no_grad():
        to_c = marked.model(marked.preprocessing(own)).argmax(1) == c
    assigned = int(to_c.sum())
    # The samples the model assigns to the class are its evidence: the marked ones among them.
    planted = (own != clean).flatten(1).any(1)
    assert int((to_c & planted).sum()) >= int(planted.sum()) - 1
    assert target.samples == assigned
    assert f"1 prototypes and {assigned} samples" in target.reason
    # Flagged by the image rule (not the paint probe): the class's blob lands in one place across
    # its images and, pasted onto other classes' images, flips them; the same shape elsewhere does
    # not. Measured (150 steps): reappearance 0.79 of 14 images, flip 0.72 vs control 0.00.
    assert target.verdict != CLEAN and target.decided_by == "images", target.reason
    settings = ScanSettings()
    evidence = Evidence(
        target.concentration,
        target.reappearance,
        target.consistency,
        target.flip_rate,
        target.control_flip_rate,
    )
    assert judge(evidence, settings)[0] == target.verdict
    assert target.reappearance >= settings.placed_share
    assert target.flip_rate - target.control_flip_rate >= settings.likely_flip
    # No other class of the marked model is flagged, and the twin, scanned with the same images
    # unmarked, raises no alarm (measured: its highest image-rule excess flip 0.20, with its blob
    # in place in 0.33 of the class's images; its highest paint-probe excess 0.06).
    assert [s.class_name for s in with_samples if s.verdict != CLEAN] == [target.class_name]
    assert [(s.class_name, s.reason) for s in twin if s.verdict != CLEAN] == []
    # Each of the twin's samples joined the evidence of the one class the twin assigns it to.
    assert sum(s.samples for s in twin) == COUNT


def test_the_paint_probe_starts_from_and_pastes_onto_prototypes_only(scanned) -> None:
    """The user's images feed the image rule, never the probe: as paste targets, real images flip
    under a genuine class's paint far more often than prototypes (on the test bed with 32 own
    held-out images, 8 of 10 clean classes flagged were the probe's, excess 0.35-0.49 against
    0.02-0.33 without samples). So each class's probe numbers are those of the scan without
    samples."""
    _, _, _, alone, with_samples, _ = scanned
    for a, s in zip(alone, with_samples, strict=True):
        assert s.probe_pastes == a.probe_pastes, s.class_name
        for name in ("probe_flip_rate", "probe_control_flip_rate", "probe_reappearance"):
            x, y = getattr(s, name), getattr(a, name)
            assert (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, abs=1e-9), name
