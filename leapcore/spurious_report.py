"""The spurious-feature scan's Arrow table, its report section, metrics and model-version tag.

The ``spurious`` table has one row per scanned class (schema in ``docs/spurious.md``); everything
published about the scan (the report's first section, MLflow metrics ``spurious/<class>/...``, the
tag ``leapcore.spurious``) is read from that table, so a stored audit shows the same verdicts.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import asdict
from typing import Any

import pyarrow as pa

from leapcore.report import ReportContext, report_section
from leapcore.spurious import CLEAN, LIKELY, SUSPICIOUS, VERDICTS, ClassScan, ScanSettings

SCHEMA = pa.schema(
    [
        ("class_index", pa.int32()),
        ("class_name", pa.string()),
        ("verdict", pa.string()),
        ("reason", pa.string()),
        ("concentration", pa.float32()),
        ("stability", pa.float32()),
        ("reappearance", pa.float32()),
        ("consistency", pa.float32()),
        ("elsewhere_ratio", pa.float32()),
        ("centroid_spread", pa.float32()),
        ("flip_rate", pa.float32()),
        ("control_flip_rate", pa.float32()),
        ("flips", pa.int32()),
        ("pastes", pa.int32()),
        ("region_share", pa.float32()),
        ("probe_flip_rate", pa.float32()),
        ("probe_control_flip_rate", pa.float32()),
        ("probe_reappearance", pa.float32()),
        ("probe_pastes", pa.int32()),
        ("decided_by", pa.string()),
        ("prototypes", pa.int32()),
        ("samples", pa.int32()),
        ("evidence_png", pa.binary()),
        ("paste_png", pa.binary()),
    ]
)
TAG = "leapcore.spurious"


def spurious_to_arrow(
    scans: list[ClassScan], settings: ScanSettings, not_scanned: list[str] | None = None
) -> pa.Table:
    """The scan as the ``spurious`` table (NaN where a number could not be measured).

    ``not_scanned`` names the audited targets the scan left out (hybrids of several classes); they
    are kept in the schema metadata ``leapcore.not_scanned`` (JSON list) and named in the report.
    """
    columns = {name: [getattr(s, name) for s in scans] for name in SCHEMA.names}
    table = pa.table(columns, schema=SCHEMA)
    return table.replace_schema_metadata(
        {
            b"leapcore.schema": b"spurious",
            b"leapcore.settings": json.dumps(asdict(settings)).encode(),
            b"leapcore.not_scanned": json.dumps(list(not_scanned or [])).encode(),
        }
    )


def not_scanned(table: pa.Table) -> list[str]:
    """The audited targets the scan left out (hybrid targets), from the table's metadata."""
    raw = (table.schema.metadata or {}).get(b"leapcore.not_scanned")
    return json.loads(raw) if raw else []


def _number(value: Any) -> float:
    return float("nan") if value is None else float(value)


def spurious_metrics(table: pa.Table) -> dict[str, float]:
    """MLflow metrics: ``spurious/<class>/{concentration,stability,reappearance,consistency,
    elsewhere_ratio,flip_rate,control_flip_rate,probe_flip_rate,probe_control_flip_rate,
    probe_reappearance,severity}`` (severity 0 clean, 1 suspicious, 2 likely spurious;
    NaN numbers are left out) and the flagged count."""
    out: dict[str, float] = {}
    rows = table.to_pylist()
    for row in rows:
        key = _metric_name(row["class_name"])
        out[f"spurious/{key}/severity"] = float(VERDICTS.index(row["verdict"]))
        for name in (
            "concentration",
            "stability",
            "reappearance",
            "consistency",
            "elsewhere_ratio",
            "flip_rate",
            "control_flip_rate",
            "probe_flip_rate",
            "probe_control_flip_rate",
            "probe_reappearance",
        ):
            if name not in row:  # a table written before the column existed
                continue
            value = _number(row[name])
            if not math.isnan(value):
                out[f"spurious/{key}/{name}"] = value
    out["spurious/flagged_classes"] = float(sum(r["verdict"] != CLEAN for r in rows))
    return out


def _metric_name(name: str) -> str:
    # MLflow metric names take letters, digits, '_', '-', '.', ' ', ':' and '/'.
    return "".join(ch if ch.isalnum() or ch in "_-. :" else "_" for ch in str(name))


def spurious_tag(table: pa.Table) -> str:
    """``clean``, ``suspicious: a, b`` or ``likely spurious: a; suspicious: b`` (worst first)."""
    rows = table.to_pylist()
    parts = []
    for verdict in (LIKELY, SUSPICIOUS):
        names = [r["class_name"] for r in rows if r["verdict"] == verdict]
        if names:
            parts.append(f"{verdict}: {', '.join(names)}")
    return "; ".join(parts) or CLEAN


def _cell(value: Any, fmt: str) -> str:
    value = _number(value)
    return "n/a" if math.isnan(value) else format(value, fmt)


def spurious_fragment(table: pa.Table) -> str:
    """The report section's HTML: a summary line, then per class its verdict, numbers and evidence."""
    from leapcore.figures import data_uri

    rows = table.to_pylist()
    flagged = [r for r in rows if r["verdict"] != CLEAN]
    summary = (
        f"{len(flagged)} of {len(rows)} classes flagged: "
        + ", ".join(f"<b>{html.escape(r['class_name'])}</b> ({r['verdict']})" for r in flagged)
        if flagged
        else f"No spurious feature found in {len(rows)} scanned classes."
    )
    parts = [f"<p class='spurious-summary'>{summary}</p>"]
    left_out = not_scanned(table)
    if left_out:
        parts.append(
            "<p class='spurious-not-scanned'>Not scanned (hybrid targets of several classes; the "
            "scan covers single-class targets): "
            + ", ".join(html.escape(n) for n in left_out)
            + ".</p>"
        )
    parts.append("<table class='spurious'>")
    parts.append(
        "<tr><th>class</th><th>verdict</th><th>concentration</th><th>blob reappears</th>"
        "<th>content consistency</th><th>flip rate (control)</th>"
        "<th>paint probe: flip rate (control), blob reappears</th><th>why</th>"
        "<th>evidence (blob outlined)</th><th>pastes</th></tr>"
    )
    order = sorted(rows, key=lambda r: -VERDICTS.index(r["verdict"]))
    for r in order:
        images = [
            f"<img alt='{alt}' src='{data_uri(r[col], 'image/png')}'>" if r[col] else ""
            for col, alt in (("evidence_png", "evidence"), ("paste_png", "pastes"))
        ]
        flips = (
            f"{_cell(r['flip_rate'], '.0%')} ({r['flips']}/{r['pastes']}; "
            f"control {_cell(r.get('control_flip_rate'), '.0%')})"
            if r["pastes"]
            else "not measured (no images of other classes)"
        )
        # The probe's control is run only where its flip rate reaches a threshold.
        control = _cell(r.get("probe_control_flip_rate"), ".0%")
        control = "not run: below every threshold" if control == "n/a" else control
        probe = (
            f"{_cell(r.get('probe_flip_rate'), '.0%')} ({r.get('probe_pastes')} pastes; control "
            f"{control}), "
            f"{_cell(r.get('probe_reappearance'), '.0%')}"
            if r.get("probe_pastes")
            else "not measured"
        )
        parts.append(
            f"<tr class='verdict-{r['verdict'].replace(' ', '-')}'>"
            f"<td>{html.escape(r['class_name'])}</td><td><b>{r['verdict']}</b></td>"
            f"<td>{_cell(r['concentration'], '.2f')}</td>"
            f"<td>{_cell(r.get('reappearance'), '.0%')}</td>"
            f"<td>{_cell(r.get('consistency'), '.2f')}</td>"
            f"<td>{flips}</td><td>{probe}</td><td>{_why(r)}</td>"
            f"<td>{images[0]}</td><td>{images[1]}</td></tr>"
        )
    parts.append("</table>")
    parts.append(
        "<p class='note'>Concentration: share of the class's occlusion evidence in its strongest "
        "small blob; blob reappears: share of the class's images whose blob overlaps the most "
        "common blob (a fixed marker reappears in every image); content consistency: how alike "
        "the images' pixels are inside that blob (1 = identical, as a pasted marker); flip rate: "
        "pastes of the blob onto confidently classified images of other classes that the model "
        "then decides for this class, and in brackets the control: the same shape pasted half an "
        "image away; paint probe: the class painted briefly (a few gradient steps) from up to 8 "
        "prototypes of other classes, its strongest painted blob pasted onto the confidently "
        "classified images of other classes (flip rate, control) and how often that blob lands "
        "in one place over those starts (a blob that flips most of them, and not when pasted "
        "elsewhere, is suspicious even when it moves). Pastes framed in red flipped.</p>"
    )
    return "\n".join(parts)


def _why(row: dict) -> str:
    """The reason behind a verdict, folded (open for a flagged class): the numbers are in the
    row's other cells, the sentence says how they were read."""
    decided = {
        "paint probe": "by the paint probe",
        "paint probe (moving blob)": "by the paint probe, its blob not always in one place",
        "images": "by the class's images",
    }.get(row.get("decided_by") or "", "")
    label = f"why (decided {decided})" if decided else "why"
    state = "" if row["verdict"] == "clean" else " open"
    return f"<details{state}><summary>{label}</summary>{html.escape(row['reason'])}</details>"


@report_section("spurious", title="Spurious-feature scan", order=-10)
def spurious_section(audit: Any, context: ReportContext) -> str | None:
    table = context.tables.get("spurious")
    if table is None:
        return None
    return spurious_fragment(table)
