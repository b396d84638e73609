"""Hits and false alarms of the spurious-feature scan over marker models and their clean twins.

Each pair (``tests/spurious/testbed.py``) is a small CNN trained with a planted marker tied to one
class and its twin trained identically without the marker. Both get a prototype audit of every class
and the scan with its default settings (:class:`leapcore.spurious.ScanSettings`).

- hit: the marked model's marker class is flagged (``suspicious`` or ``likely spurious``);
- false alarm (marked): another class of the marked model is flagged;
- false alarm (twin): any class of the clean twin is flagged.

``--samples N`` also scans each pair with N held-out images as the user's samples;
``--sample-source unmarked`` (the default) gives both models the same N unmarked images,
``--sample-source data`` each model its own (:func:`tests.spurious.testbed.data_samples`: the marker
on the spec's share of them for the marked model, as in a team's own data). The records then hold
``marked_samples`` / ``twin_samples``, ``sample_source`` and ``sample_count``, and every record the
scans' seconds (``scan_seconds``).

Four sets of pairs: ``tuning`` (the 12 pairs every threshold and the paint probe's budget were
chosen on), ``heldout`` (12 more pairs, other seeds, sizes, colours, patterns, positions and marker
classes; seen while earlier rules were made, and used with the tuning pairs to choose the probe's
starts in the fourth session), ``fresh`` (12 pairs, seeds 12-17, written down before any was run
and run once with the third session's rule, once with the fourth's) and ``fresh2`` (12 pairs,
seeds 18-23, written down before any was run, run once with the fourth session's final rule) and
``fresh3`` (12 pairs, seeds 24-29, written down after the fifth session's moving-blob branch was
fixed and before any was run; run once) and ``fresh4`` (12 pairs, seeds 30-35, written down in the
sixth session before any was run; run once with main's rule) and ``fresh5`` (12 pairs, seeds
36-41, written down in the seventh session before any was run, while a per-model rule was made on
the other sets; run once) and ``fresh6`` (12 pairs, seeds 42-47, written down in the seventh
session after the samples fixes were committed, before any was run; run once, with and without
each model's own samples) and ``fresh7`` (12 pairs, seeds 48-53, written down in the eighth
session before any was run, while a rule against alarms on genuine strokes was made on the other
sets; run once). ``--set all`` runs tuning and held-out.

Run: ``PYTHONPATH=$PWD python benchmarks/spurious_testbed.py [--set tuning|heldout|fresh|...|fresh7|all]
[--pairs N] [--max-steps S] [--samples N] [--json FILE]``. The audits use the engine's defaults
(``max_steps`` 1000, prototypes stop early): about 20 s a pair on one CPU core of a loaded
machine, 1.4 times the fast tests' 150 steps (``--max-steps 150``). Prints a markdown table and the totals per set; ``--json`` also writes every
class's numbers, so that a verdict rule can be re-applied without re-running the audits
(``--rejudge FILE``; ``--setting probe_moving_flip=2`` re-judges without the probe's moving-blob
branch, as before the fifth session).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from leapcore.spurious import CLEAN, VERDICTS, Evidence, ScanSettings, judge  # noqa: E402
from leapcore.spurious_probe import ProbeEvidence, judge_probe  # noqa: E402
from tests.spurious.testbed import (  # noqa: E402
    MarkerSpec,
    audit_prototypes,
    data_samples,
    scan,
    train_pair,
)

TUNING = [
    MarkerSpec("digits", 5, (1.0,), "square", (2, 25), 0, seed=0),
    MarkerSpec("digits", 4, (0.5,), "square", (24, 2), 3, seed=1),
    MarkerSpec("digits", 6, (1.0,), "checker", (24, 24), 7, seed=2),
    MarkerSpec("digits", 6, (1.0,), "ring", (1, 1), 5, seed=3),
    MarkerSpec("digits", 7, (0.8,), "cross", (12, 24), 9, seed=4),
    MarkerSpec("digits", 3, (1.0,), "square", (28, 14), 2, seed=5),
    MarkerSpec("photos", 6, (1.0, 0.0, 0.0), "checker", (20, 4), 2, seed=0),
    MarkerSpec("photos", 5, (0.0, 1.0, 0.0), "square", (2, 2), 5, seed=1),
    MarkerSpec("photos", 7, (0.0, 0.0, 1.0), "ring", (24, 24), 0, seed=2),
    MarkerSpec("photos", 5, (1.0, 1.0, 1.0), "cross", (2, 20), 7, seed=3),
    MarkerSpec("photos", 4, (0.0, 0.0, 0.0), "square", (14, 14), 4, seed=4),
    MarkerSpec("photos", 6, (1.0, 1.0, 0.0), "square", (25, 10), 1, seed=5),
]
PAIRS = TUNING  # the name the tests and older notes use

# Held out: written down before any of them was run, never used to choose a threshold or a rule.
HELDOUT = [
    MarkerSpec("digits", 4, (0.7,), "square", (6, 6), 1, seed=6),
    MarkerSpec("digits", 5, (1.0,), "checker", (26, 26), 4, seed=7),
    MarkerSpec("digits", 5, (0.9,), "ring", (2, 14), 6, seed=8),
    MarkerSpec("digits", 5, (1.0,), "cross", (20, 2), 8, seed=9),
    MarkerSpec("digits", 6, (0.6,), "square", (26, 20), 2, seed=10),
    MarkerSpec("digits", 4, (1.0,), "checker", (10, 27), 5, seed=11),
    MarkerSpec("photos", 5, (1.0, 0.0, 1.0), "square", (26, 26), 3, seed=6),
    MarkerSpec("photos", 5, (0.0, 1.0, 1.0), "checker", (2, 10), 6, seed=7),
    MarkerSpec("photos", 6, (1.0, 0.5, 0.0), "ring", (10, 2), 0, seed=8),
    MarkerSpec("photos", 6, (1.0, 0.0, 0.0), "cross", (22, 16), 5, seed=9),
    MarkerSpec("photos", 3, (1.0, 1.0, 1.0), "square", (4, 26), 7, seed=10),
    MarkerSpec("photos", 5, (0.0, 0.0, 0.0), "ring", (16, 24), 2, seed=11),
]
# Fresh: written down (issue 15, third scan session) before any of them was run, and run once, with
# the final rule, at the end: the honest estimate after the held-out set had been seen.
FRESH = [
    MarkerSpec("digits", 5, (0.8,), "square", (20, 20), 7, seed=12),
    MarkerSpec("digits", 6, (1.0,), "ring", (26, 4), 3, seed=13),
    MarkerSpec("digits", 5, (0.9,), "cross", (4, 12), 0, seed=14),
    MarkerSpec("digits", 6, (1.0,), "checker", (14, 2), 9, seed=15),
    MarkerSpec("digits", 3, (1.0,), "square", (27, 27), 6, seed=16),
    MarkerSpec("digits", 4, (0.7,), "ring", (12, 12), 4, seed=17),
    MarkerSpec("photos", 4, (0.5, 0.0, 1.0), "checker", (3, 3), 1, seed=12),
    MarkerSpec("photos", 6, (0.0, 1.0, 0.0), "square", (24, 14), 4, seed=13),
    MarkerSpec("photos", 7, (1.0, 1.0, 0.0), "cross", (10, 24), 6, seed=14),
    MarkerSpec("photos", 5, (0.0, 0.0, 1.0), "ring", (26, 2), 3, seed=15),
    MarkerSpec("photos", 4, (1.0, 0.5, 0.5), "square", (14, 6), 7, seed=16),
    MarkerSpec("photos", 5, (0.0, 0.0, 0.0), "checker", (2, 22), 0, seed=17),
]
# Fresh2: written down (issue 15, fourth scan session) before any of them was run, with the same
# mix as FRESH (seeds 18-23, all four patterns, sizes 3-6, new colours, positions and marker
# classes); run once with the fourth session's final rule, and once with the third session's.
FRESH2 = [
    MarkerSpec("digits", 5, (0.9,), "checker", (4, 24), 2, seed=18),
    MarkerSpec("digits", 4, (1.0,), "square", (26, 12), 8, seed=19),
    MarkerSpec("digits", 6, (0.8,), "ring", (18, 2), 1, seed=20),
    MarkerSpec("digits", 6, (1.0,), "cross", (2, 4), 5, seed=21),
    MarkerSpec("digits", 6, (0.7,), "square", (10, 20), 3, seed=22),
    MarkerSpec("digits", 5, (1.0,), "ring", (24, 26), 7, seed=23),
    MarkerSpec("photos", 5, (1.0, 0.0, 0.5), "square", (6, 18), 5, seed=18),
    MarkerSpec("photos", 6, (0.0, 1.0, 0.0), "ring", (2, 26), 2, seed=19),
    MarkerSpec("photos", 6, (1.0, 1.0, 1.0), "checker", (24, 6), 4, seed=20),
    MarkerSpec("photos", 5, (0.0, 0.5, 1.0), "cross", (16, 10), 0, seed=21),
    MarkerSpec("photos", 3, (1.0, 0.0, 0.0), "square", (27, 2), 6, seed=22),
    MarkerSpec("photos", 4, (0.0, 0.0, 0.0), "checker", (12, 26), 3, seed=23),
]
# Fresh3: written down (issue 15, fifth scan session) before any of them was run, with the same
# mix (seeds 24-29, all four patterns, sizes 3-7, new colours, positions and marker classes), after
# the probe's moving-blob branch was fixed on tuning and held-out; run once, and judged with and
# without that branch on the same audits (``--rejudge``).
FRESH3 = [
    MarkerSpec("digits", 4, (0.9,), "ring", (22, 8), 6, seed=24),
    MarkerSpec("digits", 6, (1.0,), "square", (4, 16), 9, seed=25),
    MarkerSpec("digits", 5, (0.8,), "cross", (16, 26), 2, seed=26),
    MarkerSpec("digits", 5, (1.0,), "checker", (8, 8), 0, seed=27),
    MarkerSpec("digits", 3, (0.9,), "square", (2, 2), 4, seed=28),
    MarkerSpec("digits", 7, (1.0,), "ring", (20, 14), 8, seed=29),
    MarkerSpec("photos", 5, (0.0, 1.0, 0.5), "checker", (18, 26), 1, seed=24),
    MarkerSpec("photos", 4, (1.0, 0.0, 0.0), "ring", (6, 6), 7, seed=25),
    MarkerSpec("photos", 6, (1.0, 1.0, 0.0), "cross", (24, 24), 2, seed=26),
    MarkerSpec("photos", 5, (0.5, 0.0, 1.0), "square", (10, 14), 6, seed=27),
    MarkerSpec("photos", 3, (0.0, 1.0, 1.0), "checker", (26, 16), 0, seed=28),
    MarkerSpec("photos", 6, (0.0, 0.0, 0.0), "square", (2, 12), 5, seed=29),
]
# Fresh4: written down (issue 15, sixth scan session) before any of them was run, with the same
# mix (seeds 30-35, all four patterns, sizes 3-7, new colours, positions and marker classes), while
# a harder second paint was measured on tuning and held-out only; run once with main's rule.
FRESH4 = [
    MarkerSpec("digits", 4, (1.0,), "cross", (14, 20), 3, seed=30),
    MarkerSpec("digits", 6, (0.8,), "checker", (20, 25), 7, seed=31),
    MarkerSpec("digits", 5, (1.0,), "ring", (8, 2), 5, seed=32),
    MarkerSpec("digits", 3, (0.7,), "square", (24, 6), 1, seed=33),
    MarkerSpec("digits", 7, (0.9,), "square", (2, 24), 4, seed=34),
    MarkerSpec("digits", 5, (1.0,), "ring", (12, 20), 9, seed=35),
    MarkerSpec("photos", 6, (0.5, 1.0, 0.0), "ring", (4, 20), 4, seed=30),
    MarkerSpec("photos", 4, (0.0, 0.0, 1.0), "square", (22, 2), 3, seed=31),
    MarkerSpec("photos", 5, (1.0, 1.0, 1.0), "checker", (14, 26), 5, seed=32),
    MarkerSpec("photos", 3, (1.0, 0.5, 0.0), "cross", (2, 8), 1, seed=33),
    MarkerSpec("photos", 7, (0.0, 1.0, 0.5), "ring", (18, 18), 6, seed=34),
    MarkerSpec("photos", 5, (1.0, 0.0, 0.5), "square", (26, 10), 0, seed=35),
]
# Fresh5: written down (issue 15, seventh scan session) before any of them was run, with the same
# mix (seeds 36-41, all four patterns, sizes 3-7, new colours, positions incl. corners and the
# centre, marker classes), while a per-model rule was developed on the sets above only; run once.
FRESH5 = [
    MarkerSpec("digits", 5, (1.0,), "checker", (0, 0), 8, seed=36),
    MarkerSpec("digits", 4, (0.8,), "cross", (14, 14), 2, seed=37),
    MarkerSpec("digits", 6, (0.9,), "square", (26, 0), 6, seed=38),
    MarkerSpec("digits", 7, (1.0,), "ring", (6, 18), 0, seed=39),
    MarkerSpec("digits", 3, (1.0,), "square", (29, 29), 5, seed=40),
    MarkerSpec("digits", 5, (0.7,), "checker", (16, 4), 9, seed=41),
    MarkerSpec("photos", 5, (1.0, 0.0, 1.0), "ring", (27, 27), 6, seed=36),
    MarkerSpec("photos", 6, (0.0, 0.5, 1.0), "square", (13, 13), 2, seed=37),
    MarkerSpec("photos", 4, (1.0, 1.0, 0.0), "checker", (0, 28), 7, seed=38),
    MarkerSpec("photos", 7, (0.0, 0.0, 0.0), "cross", (20, 6), 3, seed=39),
    MarkerSpec("photos", 3, (0.5, 1.0, 0.0), "square", (4, 14), 1, seed=40),
    MarkerSpec("photos", 6, (1.0, 1.0, 1.0), "ring", (8, 24), 4, seed=41),
]
# Written down in the seventh session after the scan's samples fixes (the probe on prototypes
# only, position from three images) were committed, before any of them was run.
FRESH6 = [
    MarkerSpec("digits", 4, (1.0,), "ring", (27, 14), 1, seed=42),
    MarkerSpec("digits", 6, (0.8,), "checker", (3, 26), 7, seed=43),
    MarkerSpec("digits", 5, (1.0,), "cross", (26, 26), 4, seed=44),
    MarkerSpec("digits", 3, (0.9,), "square", (15, 2), 3, seed=45),
    MarkerSpec("digits", 7, (0.6,), "square", (0, 12), 8, seed=46),
    MarkerSpec("digits", 5, (1.0,), "ring", (20, 8), 2, seed=47),
    MarkerSpec("photos", 4, (0.0, 1.0, 1.0), "ring", (2, 2), 0, seed=42),
    MarkerSpec("photos", 5, (1.0, 0.5, 0.0), "checker", (27, 20), 5, seed=43),
    MarkerSpec("photos", 6, (0.5, 0.0, 0.5), "cross", (10, 10), 2, seed=44),
    MarkerSpec("photos", 3, (1.0, 1.0, 1.0), "square", (28, 4), 7, seed=45),
    MarkerSpec("photos", 7, (0.0, 0.8, 0.0), "ring", (18, 24), 3, seed=46),
    MarkerSpec("photos", 5, (0.2, 0.2, 1.0), "square", (6, 22), 6, seed=47),
]
# Fresh7: written down (issue 15, eighth session, helper h15c) before any of them was run, while a
# rule against false alarms on genuine positional strokes was made on the sets above only; run once
# with the final rule, with and without each model's own samples.
FRESH7 = [
    MarkerSpec("digits", 5, (0.9,), "ring", (9, 25), 6, seed=48),
    MarkerSpec("digits", 4, (1.0,), "checker", (28, 8), 0, seed=49),
    MarkerSpec("digits", 6, (0.7,), "cross", (2, 16), 9, seed=50),
    MarkerSpec("digits", 3, (1.0,), "square", (18, 27), 2, seed=51),
    MarkerSpec("digits", 7, (0.8,), "checker", (22, 0), 5, seed=52),
    MarkerSpec("digits", 5, (1.0,), "square", (6, 10), 1, seed=53),
    MarkerSpec("photos", 5, (1.0, 0.0, 0.0), "cross", (27, 2), 4, seed=48),
    MarkerSpec("photos", 4, (0.0, 0.5, 0.0), "ring", (16, 8), 1, seed=49),
    MarkerSpec("photos", 6, (1.0, 1.0, 0.5), "square", (2, 26), 6, seed=50),
    MarkerSpec("photos", 3, (0.0, 0.0, 1.0), "checker", (24, 18), 2, seed=51),
    MarkerSpec("photos", 7, (1.0, 0.0, 1.0), "square", (8, 4), 7, seed=52),
    MarkerSpec("photos", 5, (0.5, 0.5, 0.5), "ring", (20, 26), 3, seed=53),
]
SETS = {
    "tuning": TUNING,
    "heldout": HELDOUT,
    "fresh": FRESH,
    "fresh2": FRESH2,
    "fresh3": FRESH3,
    "fresh4": FRESH4,
    "fresh5": FRESH5,
    "fresh6": FRESH6,
    "fresh7": FRESH7,
}


def flagged(rows: list[dict]) -> list[str]:
    return [f"{r['class_name']} ({r['verdict']})" for r in rows if r["verdict"] != CLEAN]


def _numbers(scan) -> dict:
    out = {k: v for k, v in asdict(scan).items() if not k.endswith("_png")}
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}


def _shown(row: dict, verdict=None) -> str:
    """A stored row's verdict, with the rule that decided it when flagged (not when re-judged)."""
    if verdict is not None or row["verdict"] == CLEAN or "decided_by" not in row:
        return row["verdict"]
    return f"{row['verdict']} ({row['decided_by']})"


def with_samples(records: list[dict]) -> list[dict]:
    """``records`` with their scans with samples (``--samples``) in place of the scans without."""
    return [dict(r, marked=r["marked_samples"], twin=r["twin_samples"]) for r in records]


def _tables(name: str, records: list[dict], verdict=None) -> str:
    out = f"\n## {name} ({len(records)} pairs)\n\n{summarise(records, verdict)}"
    if records and "marked_samples" in records[0]:
        rec = records[0]
        source = f"{rec.get('sample_count', '')} {rec.get('sample_source', 'unmarked')}".strip()
        out += (
            f"\n\n## {name} with samples ({source})\n\n{summarise(with_samples(records), verdict)}"
        )
    return out


def summarise(records: list[dict], verdict=None) -> str:
    """Markdown table and totals of ``records`` (one per pair, as in the ``--json`` file); with
    ``verdict(row) -> str`` the rows are re-judged first."""
    lines = [
        "| marker | marker flips held-out | verdict (marked) | conc / IoU / reappear / consist / "
        "flip / control | probe reappear / flip / control | "
        "other classes flagged (marked) | flagged (clean twin) |",
        "|---|---|---|---|---|---|---|",
    ]
    hits = marked_alarms = twin_alarms = twins_alarmed = 0
    for rec in records:
        marked = [dict(r, verdict=verdict(r)) if verdict else r for r in rec["marked"]]
        twin = [dict(r, verdict=verdict(r)) if verdict else r for r in rec["twin"]]
        target = next(r for r in marked if r["class_index"] == rec["marker_class"])
        others = [r for r in marked if r["class_index"] != rec["marker_class"]]
        hits += target["verdict"] != CLEAN
        marked_alarms += len(flagged(others))
        twin_alarms += len(flagged(twin))
        twins_alarmed += bool(flagged(twin))
        numbers = " / ".join(
            "n/a" if target.get(k) is None else format(target[k], ".2f")
            for k in (
                "concentration",
                "stability",
                "reappearance",
                "consistency",
                "flip_rate",
                "control_flip_rate",
            )
        )
        probe = " / ".join(
            "n/a" if target.get(k) is None else format(target[k], ".2f")
            for k in ("probe_reappearance", "probe_flip_rate", "probe_control_flip_rate")
        )
        lines.append(
            f"| {rec['label']} | {rec['marker_flip_rate']:.0%} | {_shown(target, verdict)} | "
            f"{numbers} | {probe} | {', '.join(flagged(others)) or '-'} | "
            f"{', '.join(flagged(twin)) or '-'} |"
        )
    n = len(records)
    lines.append(
        f"\nhits: {hits}/{n} marked classes flagged; false alarms: {marked_alarms} other classes "
        f"of marked models, {twin_alarms} classes of clean twins ({twins_alarmed}/{n} twins with "
        "any alarm)"
    )
    return "\n".join(lines)


def _nan(value) -> float:
    return float("nan") if value is None else float(value)


def rejudge(settings: ScanSettings):
    """A verdict function for :func:`summarise`: the current rule with ``settings`` applied to a
    stored row (reappearance recomputed from the stored IoUs with the modal blob), and the paint
    probe's rule on its stored numbers; the more severe verdict."""

    def verdict(row: dict) -> str:
        ious = (row.get("details") or {}).get("modal_iou") or []
        share = (
            sum(v >= settings.reappear_iou for v in ious) / len(ious)
            if len(ious) > 1
            else float("nan")
        )
        evidence = Evidence(
            _nan(row["concentration"]),
            share,
            _nan(row.get("consistency")),
            _nan(row["flip_rate"]),
            _nan(row["control_flip_rate"]),
            _nan(row.get("elsewhere_ratio")),  # absent (NaN) in records before it existed
        )
        proto = judge(evidence, settings)[0]
        probe = judge_probe(
            ProbeEvidence(
                flip_rate=_nan(row.get("probe_flip_rate")),
                control_flip_rate=_nan(row.get("probe_control_flip_rate")),
                reappearance=_nan(row.get("probe_reappearance")),
            ),
            settings,
        )
        return max(proto, probe, key=VERDICTS.index)

    return verdict


def user_samples(trained, count: int, seed: int) -> torch.Tensor:
    """``count`` held-out images of any class, unmarked (as a user's folder of images would be)."""
    gen = torch.Generator().manual_seed(seed)
    return trained.test_x[torch.randperm(len(trained.test_x), generator=gen)[:count]]


SAMPLE_SOURCES = ("unmarked", "data")


def pair_samples(
    spec: MarkerSpec, trained, count: int, source: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(marked model's samples, twin's samples)`` for ``--samples``: ``unmarked``, the same
    ``count`` unmarked held-out images for both (:func:`user_samples`); ``data``, each model's own
    held-out images from its data (:func:`tests.spurious.testbed.data_samples`: the marker on
    ``spec.share`` of them for the marked model, the same images unmarked for the twin)."""
    if source == "unmarked":
        images = user_samples(trained, count, spec.seed)
        return images, images
    if source == "data":
        return data_samples(spec, trained, count)
    raise ValueError(f"unknown sample source {source!r}: one of {', '.join(SAMPLE_SOURCES)}")


def _timed_scan(audited, settings, samples=None) -> tuple[list, float]:
    began = time.perf_counter()
    result = scan(audited, settings, samples)
    return result, time.perf_counter() - began


def run_pair(
    spec: MarkerSpec,
    options: dict,
    samples: int = 0,
    settings: ScanSettings | None = None,
    source: str = "unmarked",
) -> dict:
    began = time.perf_counter()
    marked, twin = train_pair(spec)
    audits = (audit_prototypes(marked, **options), audit_prototypes(twin, **options))
    (scans, t_marked), (twin_scans, t_twin) = (_timed_scan(a, settings) for a in audits)
    seconds = {"marked": t_marked, "twin": t_twin}
    extra = {}
    if samples:
        images = pair_samples(spec, marked, samples, source)
        with_samples = []
        for key, audited, own in zip(("marked_samples", "twin_samples"), audits, images):
            result, seconds[key] = _timed_scan(audited, settings, own)
            with_samples.append([_numbers(s) for s in result])
        extra = {
            "marked_samples": with_samples[0],
            "twin_samples": with_samples[1],
            "sample_source": source,
            "sample_count": samples,
        }
    return {
        "label": spec.label(),
        "spec": asdict(spec),
        "marker_class": spec.marker_class,
        "marker_flip_rate": marked.marker_flip_rate,
        "twin_marker_flip_rate": twin.marker_flip_rate,
        "accuracy": [marked.accuracy, twin.accuracy],
        "marked": [_numbers(s) for s in scans],
        "twin": [_numbers(s) for s in twin_scans],
        **extra,
        "scan_seconds": seconds,
        "seconds": time.perf_counter() - began,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", choices=[*SETS, "all"], default="tuning")
    parser.add_argument("--pairs", type=int, default=None, help="first N pairs of each set")
    parser.add_argument(
        "--max-steps",
        type=int,
        default=1000,
        help="the audits' max_steps: the engine's default 1000 (prototypes stop early), as users "
        "audit; 150 is the fast tests' budget",
    )
    parser.add_argument("--json", type=Path, default=None, help="write every class's numbers")
    parser.add_argument(
        "--samples",
        type=int,
        default=0,
        help="also scan with this many held-out images of any class as user samples",
    )
    parser.add_argument(
        "--sample-source",
        choices=SAMPLE_SOURCES,
        default="unmarked",
        help="unmarked: the same unmarked images for both models of a pair (earlier sessions' "
        "numbers); data: each model's own held-out images, the marker planted on the spec's "
        "share of them for the marked model (as a team's own data would be)",
    )
    parser.add_argument(
        "--rejudge",
        type=Path,
        default=None,
        help="re-apply the verdict rule to a --json file instead of running the audits",
    )
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a ScanSettings field (a number) for the scans or for --rejudge (repeatable)",
    )
    args = parser.parse_args()
    fields = ScanSettings.__dataclass_fields__
    values = {
        k: type(fields[k].default)(float(v))
        for k, v in (item.split("=", 1) for item in args.setting)
    }
    settings = ScanSettings(**values)
    if args.rejudge:
        verdict = rejudge(settings)
        for name, records in json.loads(args.rejudge.read_text()).items():
            if args.set in (name, "all"):
                print(_tables(name, records, verdict))
        return
    torch.set_num_threads(1)
    options = {"max_steps": args.max_steps}
    # "all" is tuning and held-out: the fresh sets are run on their own, once.
    names = ["tuning", "heldout"] if args.set == "all" else [args.set]
    out: dict[str, list[dict]] = {name: [] for name in names}
    # Pairs of the sets in turn, so that a run cut short still covers each set.
    queue = [(i, name) for i in range(max(len(SETS[n]) for n in names)) for name in names]
    for i, name in queue:
        specs = SETS[name][: args.pairs]
        if i >= len(specs):
            continue
        out[name].append(run_pair(specs[i], options, args.samples, settings, args.sample_source))
        print(f"[{name}] {specs[i].label()}: {out[name][-1]['seconds']:.0f} s", flush=True)
        if args.json:
            args.json.write_text(json.dumps(out, indent=1))
    for name, records in out.items():
        print(_tables(name, records))


if __name__ == "__main__":
    main()
