"""Hits and false alarms of the spurious-feature scan over marker models and their clean twins.

Each pair (``tests/spurious/testbed.py``) is a small CNN trained with a planted marker tied to one
class and its twin trained identically without the marker. Both get a short prototype audit of
every class and the scan with its default settings (:class:`leapcore.spurious.ScanSettings`).

- hit: the marked model's marker class is flagged (``suspicious`` or ``likely spurious``);
- false alarm (marked): another class of the marked model is flagged;
- false alarm (twin): any class of the clean twin is flagged.

Run: ``PYTHONPATH=$PWD python benchmarks/spurious_testbed.py [--pairs N] [--max-steps S]`` (about
20 s a pair on one CPU core at the test bed's 150 audit steps). Prints a markdown table and the totals.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from leapcore.spurious import CLEAN  # noqa: E402
from tests.spurious.testbed import MarkerSpec, scan_model, train_pair  # noqa: E402

PAIRS = [
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


def flagged(scans) -> list[str]:
    return [f"{s.class_name} ({s.verdict})" for s in scans if s.verdict != CLEAN]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=len(PAIRS))
    parser.add_argument(
        "--max-steps", type=int, default=None, help="the audits' max_steps (test bed default 150)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows, hits, marked_alarms, twin_alarms, twins_alarmed = [], 0, 0, 0, 0
    print(
        "| marker | marker flips held-out | verdict (marked) | conc / IoU / flip | "
        "other classes flagged (marked) | flagged (clean twin) | s |"
    )
    print("|---|---|---|---|---|---|---|")
    for spec in PAIRS[: args.pairs]:
        began = time.perf_counter()
        marked, twin = train_pair(spec)
        options = {} if args.max_steps is None else {"max_steps": args.max_steps}
        scans = scan_model(marked, **options)
        twin_scans = scan_model(twin, **options)
        target = next(s for s in scans if s.class_index == spec.marker_class)
        hit = target.verdict != CLEAN
        hits += hit
        others = [s for s in scans if s.class_index != spec.marker_class]
        marked_alarms += len(flagged(others))
        twin_flags = flagged(twin_scans)
        twin_alarms += len(twin_flags)
        twins_alarmed += bool(twin_flags)
        row = (
            f"| {spec.label()} | {marked.marker_flip_rate:.0%} | {target.verdict} | "
            f"{target.concentration:.2f} / {target.stability:.2f} / {target.flip_rate:.2f} | "
            f"{', '.join(flagged(others)) or '-'} | {', '.join(twin_flags) or '-'} | "
            f"{time.perf_counter() - began:.0f} |"
        )
        rows.append(row)
        print(row, flush=True)
    n = len(rows)
    print(
        f"\nhits: {hits}/{n} marked classes flagged; false alarms: {marked_alarms} other classes "
        f"of marked models, {twin_alarms} classes of clean twins ({twins_alarmed}/{n} twins with "
        "any alarm)"
    )


if __name__ == "__main__":
    main()
