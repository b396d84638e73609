"""The report's ``diff`` section: what changed since the previous audited version of the model.

Reads the ``diff`` table (:mod:`leapcore.diff`) from the report's tables; no section without one.
"""

from __future__ import annotations

import html
from typing import Any

from leapcore.diff import diff_facts, diff_from_arrow, judged_text
from leapcore.report import ReportContext, report_section
from leapcore.report_view import fmt_prob

PAIRS_SHOWN = 10
_STYLE = {
    "entangled": "color:#b00020;font-weight:bold",
    "worse": "color:#b00020;font-weight:bold",
    "dissimilar": "color:#b00020",
    "disentangled": "color:#00695c;font-weight:bold",
    "better": "color:#00695c",
}


def _flag(flag: str) -> str:
    if not flag:
        return ""
    return f"<span style='{_STYLE.get(flag, '')}'>{html.escape(flag)}</span>"


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table class='diff'><tr>{head}</tr>{body}</table>"


def _signed(value: Any) -> str:
    if value is None:
        return "n/a"
    value = float(value)
    return f"{0.0 if abs(value) < 5e-4 else value:+.3f}"  # no "-0.000"


@report_section("diff", title="Changes since the previous version", order=-5)
def diff_section(audit: Any, context: ReportContext) -> str | None:
    """Pairs that became (dis)entangled, prototype similarity, quality and verdict changes."""
    table = context.tables.get("diff")
    if table is None:
        return None
    diff = diff_from_arrow(table)
    _, _, thresholds = diff_facts(table)
    e = html.escape
    basis = (table.schema.metadata or {}).get(b"leapcore.pair_basis", b"prototypes").decode()
    judged = judged_text(table)
    on = {
        "samples": "your samples (each target's: those either version assigns to it)",
        "prototypes": "prototypes (see the note below)",
    }.get(basis, basis)
    parts = [
        f"<p>Compared with <b>{e(diff.previous)}</b> (this audit: {e(diff.current)}). "
        "Pair probability: how much a target's images also look like the other class, "
        "sigmoid(z<sub>other</sub> − z<sub>target</sub>) averaged over them (0: no doubt, 0.5: "
        f"the model cannot tell them apart), measured on {e(on)}; both versions see the same "
        "images, so the change is the model's. A change of at least "
        f"{e(str(thresholds.get('entanglement', '')))} is flagged"
        + (f", judged against {e(judged)}" if judged else "")
        + ".</p>"
    ]
    for note in diff.notes:
        parts.append(f"<p class='diff-note'><b>Note:</b> {e(note)}</p>")
    pairs = diff.rows("entanglement")
    if pairs:
        rows = [
            [
                e(f"{r['target']} ↔ {r['other']}"),
                fmt_prob(r["before"]),
                fmt_prob(r["after"]),
                _signed(r["change"]),
                _flag(r["flag"]),
                e(r["detail"]),
            ]
            for r in pairs[:PAIRS_SHOWN]
        ]
        header = ["pair", "before", "after", "change", "", "both directions"]
        parts.append(f"<h3>Pairs, largest change first</h3>{_table(header, rows)}")
    protos = diff.rows("prototype")
    if protos:
        rows = [
            [
                e(r["target"]),
                fmt_prob(r["cosine_previous_model"]),
                fmt_prob(r["cosine_current_model"]),
                _flag(r["flag"]),
                e(r["detail"].removeprefix("nearest current prototype: ")),
            ]
            for r in protos
        ]
        header = ["class", f"in {diff.previous}'s features", f"in {diff.current}'s features", ""]
        parts.append(
            "<h3>Prototype similarity</h3><p>Cosine between the previous and the current "
            "prototype of each class at the input of each model's classifier layer (each "
            f"prototype fed to both models).</p>{_table([*header, 'nearest current prototype'], rows)}"
        )
    quality = [r for r in diff.rows("quality") if r["flag"] or r["measure"] == "target_prob"]
    if quality:
        rows = [
            [
                e(r["target"]),
                e(r["measure"]),
                fmt_prob(r["before"]),
                fmt_prob(r["after"]),
                _signed(r["change"]),
                _flag(r["flag"]),
            ]
            for r in quality
        ]
        header = ["class", "measure", "before", "after", "change", ""]
        parts.append(f"<h3>Quality</h3>{_table(header, rows)}")
    verdicts = diff.rows("verdict")
    if verdicts:
        rows = [
            [e(r["target"]), e(r["before_text"] or ""), e(r["after_text"] or ""), _flag(r["flag"])]
            for r in verdicts
        ]
        parts.append(
            f"<h3>Spurious-feature scan</h3>{_table(['class', 'before', 'after', ''], rows)}"
        )
    return "\n".join(parts)


def diff_page(table: Any, title: str | None = None) -> str:
    """A standalone HTML page of a ``diff`` table (what ``leap diff`` writes)."""
    from leapcore.report import ReportContext

    diff = diff_from_arrow(table)
    title = title or f"leapcore diff: {diff.current} vs {diff.previous}"
    body = diff_section(None, ReportContext(title=title, tables={"diff": table})) or ""
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>body{{font-family:sans-serif;margin:2em}}"
        "table.diff{border-collapse:collapse;margin:0.5em 0 1.5em}"
        "table.diff td,table.diff th{border:1px solid #ccc;padding:2px 8px;text-align:left}"
        f"</style></head><body><h1>{html.escape(title)}</h1>"
        f"<h2>Changes since the previous version</h2>{body}</body></html>"
    )
