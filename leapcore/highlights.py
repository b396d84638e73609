"""The summary's "look at these first" sentences of the analysis stages' verdicts.

A class the spurious-feature scan flags and a pair that drifted since the previous version are what a
reviewer of a new model version needs first, so their sentences head the list
(:func:`leapcore.report.report_highlights`); the sections themselves render under the summary.
"""

from __future__ import annotations

from typing import Any

from leapcore.report import ReportContext, report_highlights
from leapcore.report_view import fmt_pct, fmt_prob

#: How many drifted pairs the summary names (the diff section lists them all).
PAIRS_NAMED = 3


@report_highlights("spurious")
def spurious_highlights(audit: Any, context: ReportContext) -> list[str]:
    """One sentence per class the scan judged suspicious or likely spurious, the worse first."""
    table = context.tables.get("spurious")
    if table is None or "verdict" not in table.column_names:
        return []
    rows = [r for r in table.to_pylist() if r["verdict"] in ("likely spurious", "suspicious")]

    def probe(r: dict) -> bool:  # the scan's paint probe set the verdict (leapcore.spurious_probe)
        return (r.get("decided_by") or "").startswith("paint probe")

    def where(r: dict) -> str:  # its moving-blob branch: the blob is not in one place every time
        return "not always in one place" if "moving" in r["decided_by"] else "in one place"

    def flips(r: dict) -> float:
        return (r.get("probe_flip_rate") if probe(r) else r.get("flip_rate")) or 0.0

    rows.sort(key=lambda r: (r["verdict"] != "likely spurious", -flips(r)))
    return [
        f"Spurious-feature scan: {r['class_name']} is {r['verdict']}: painted briefly onto images "
        f"of other classes, it puts a small blob {where(r)} that, pasted onto other images, "
        f"flips {fmt_pct(r.get('probe_flip_rate'))} of them to it "
        f"({fmt_pct(r.get('probe_control_flip_rate'))} when pasted elsewhere)."
        if probe(r)
        else f"Spurious-feature scan: {r['class_name']} is {r['verdict']}: a small blob holds "
        f"{fmt_pct(r.get('concentration'))} of its evidence and, pasted onto images of other "
        f"classes, flips {fmt_pct(r.get('flip_rate'))} of them to it "
        f"({fmt_pct(r.get('control_flip_rate'))} when pasted elsewhere)."
        for r in rows
    ]


@report_highlights("diff")
def diff_highlights(audit: Any, context: ReportContext) -> list[str]:
    """Scan verdicts that got worse, then the pairs flagged as (dis)entangled since the previous
    version, largest change first."""
    table = context.tables.get("diff")
    if table is None:
        return []
    from leapcore.diff import diff_from_arrow

    diff = diff_from_arrow(table)
    items = [
        f"Since {diff.previous}: the scan's verdict on {r['target']} got worse "
        f"({r['before_text'] or 'n/a'} → {r['after_text'] or 'n/a'})."
        for r in diff.rows("verdict", "worse")
    ]
    pairs = [r for r in diff.rows("entanglement") if r["flag"] in ("entangled", "disentangled")]
    items += [
        f"Since {diff.previous}: {r['target']} ↔ {r['other']} became {r['flag']} "
        f"(pair probability {fmt_prob(r['before'])} → {fmt_prob(r['after'])}, {r['detail']})."
        for r in pairs[:PAIRS_NAMED]
    ]
    return items
