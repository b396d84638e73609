"""The audit diff's pair measures on planted merges and seed-only retrains of one digits CNN.

v1 is a digits CNN (``tests/engine/diff_support.py``, seed 0). Each other version is trained on the
same data with the same schedule, and either

- **merge a-b**: 60 % of the b's labelled a (the diff must name the pair a-b first), or
- **seed s**: nothing changed but the seed (initial weights, batch order): no pair may cross the
  entanglement threshold (a drift event would fire on noise), or
- **merge a-b + seed s**: both.

Every version is audited (all 10 classes, isolation off) with the engine's defaults except the
objective, which is the default ``margin`` and leap-ie's ``logit`` (``--objectives``), and
``--prototypes-per-class`` (default 1); then ``diff_audits(v1, v)`` runs once per pair measure
(:data:`leapcore.diff_pairs.PAIR_MEASURES`: ``own``, ``fixed``, ``crossed``, and ``samples`` on 10
and on 3 held-out digits per class that no version trained on). Printed per version, objective and
measure: for seed-only retrains the top pair and whether any pair was flagged (an ALARM: the drift
event would fire); for merges the merged pair's rank in the table, its change, its lead over the
next pair's judged change and whether it (and how many other pairs) was flagged.

Run: ``PYTHONPATH=$PWD python benchmarks/diff_testbed.py [--max-steps N] [--threads T]``. About
10 s per trained version and 8 s per default audit on one CPU core (about 4 minutes in all).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from leapcore import engine  # noqa: E402
from leapcore.diff import AuditSide, DiffThresholds, diff_audits  # noqa: E402
from leapcore.results import audit_tables  # noqa: E402
from tests.engine.diff_support import held_out_digits, train_version  # noqa: E402
from tests.engine.engine_support import DIGIT_NAMES, Normalise  # noqa: E402

# (label, merged pair or None, seed)
VERSIONS = [
    ("merge 3-8", (3, 8), 0),
    ("merge 4-9", (4, 9), 0),
    ("merge 5-6", (5, 6), 0),
    ("merge 1-7", (1, 7), 0),
    ("seed 1", None, 1),
    ("seed 2", None, 2),
    ("seed 3", None, 3),
    ("seed 4", None, 4),
    ("merge 3-8 + seed 1", (3, 8), 1),
    ("merge 4-9 + seed 2", (4, 9), 2),
]
OBJECTIVES = ("margin", "logit")
# (pair measure, held-out samples per class or None)
COLUMNS = [("own", None), ("fixed", None), ("crossed", None), ("samples", 10), ("samples", 3)]


def audit(
    model: torch.nn.Module, label: str, objective: str, steps: int | None, per_class: int = 1
) -> AuditSide:
    config = {"input_dim": [1, 32, 32], "isolation": False, "objective": objective}
    config["prototypes_per_class"] = per_class
    if steps:
        config["max_steps"] = steps
    result = engine.run(model, DIGIT_NAMES, config, list(range(10)), Normalise(), device="cpu")
    return AuditSide(label, DIGIT_NAMES, audit_tables(result), model, Normalise())


def _judged(row: dict) -> float:
    """The change the diff judged the row by (``leapcore.diff_pairs.judged_change``)."""
    if "not cross-checked" in row["detail"]:
        return 0.0
    if "cross-checked" in row["detail"]:
        return max(row["change"], 0.0)
    return abs(row["change"])


def describe(diff, merge: tuple[int, int] | None) -> str:
    """Seed-only: the top pair and whether any pair was flagged (an ALARM: the drift event would
    fire). Merge: the merged pair's rank in the table, its change, its lead over the next pair's
    judged change, and whether it was flagged."""
    pairs = diff.rows("entanglement")
    top = pairs[0]
    text = f"{top['target']}-{top['other']} {top['change']:+.2f}"
    flagged = [r for r in pairs if r["flag"]]
    if merge is None:
        return f"top {text} ({'ALARM' if flagged else 'ok'})"
    want = {str(merge[0]), str(merge[1])}
    rank = next(i for i, r in enumerate(pairs) if {r["target"], r["other"]} == want)
    mine = pairs[rank]
    lead = _judged(mine) - max(_judged(r) for r in pairs if r is not mine)
    flag = "flagged" if mine["flag"] else "not flagged"
    extra = [f"top {text}"] if rank else []
    if len(flagged) > (1 if mine["flag"] else 0):
        extra.append(f"{len(flagged) - (1 if mine['flag'] else 0)} other flagged")
    return f"rank {rank + 1} {mine['change']:+.2f} lead {lead:+.2f} {flag}" + (
        f" ({'; '.join(extra)})" if extra else ""
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-steps", type=int, default=None, help="default: the engine's")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", nargs="*", help="version labels to run (default all)")
    parser.add_argument("--objectives", nargs="*", default=list(OBJECTIVES), choices=OBJECTIVES)
    parser.add_argument(
        "--prototypes-per-class", type=int, default=1, help="the audits' prototypes_per_class"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    sample_sets = {n: held_out_digits(n)[0] for n in (10, 3)}
    threshold = DiffThresholds().entanglement
    versions = [v for v in VERSIONS if not args.only or v[0] in args.only]
    base = train_version(None)
    rows = []
    per_class = args.prototypes_per_class
    for objective in args.objectives:
        v1 = audit(base, "v1", objective, args.max_steps, per_class)
        for label, merge, seed in versions:
            model = train_version(merge, seed=seed)
            v2 = audit(model, label, objective, args.max_steps, per_class)
            cells = []
            for measure, images in COLUMNS:
                diff = diff_audits(v1, v2, pair_measure=measure, samples=sample_sets.get(images))
                cells.append(describe(diff, merge))
            rows.append((label, objective, *cells))
            print(
                f"  {label} / {objective} done at {time.perf_counter() - began:.0f} s", flush=True
            )
    steps = args.max_steps or "default"
    print(
        f"\nmax_steps {steps}; prototypes_per_class {per_class}; "
        f"entanglement threshold {threshold}\n"
    )
    heads = [m if n is None else f"{m} ({n}/class)" for m, n in COLUMNS]
    print("| version | objective | " + " | ".join(heads) + " |")
    print("|---|---|" + "---|" * len(COLUMNS))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\n{time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
