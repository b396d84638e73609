"""Transfer: each prototype's target probability on other models of the same classes (issue 19).

A prototype that only its own model believes is a weak explanation of the class. With
``reference_models`` in the config, every prototype is shown to each reference model (as the
audited model sees it: pixels in [0, 1], each model's own preprocessing) and its target
probability there is recorded next to the one on the audited model. The Arrow ``transfer`` table
has a row per (prototype, reference model); :func:`transfer_metrics` summarises it per class.
"""

from __future__ import annotations

import html
import json
import re
from typing import Any

import pyarrow as pa
import torch

from leapcore.quality import check_reference_width, mean_target_prob, target_mask
from leapcore.report import ReportContext, report_section, slug

SCHEMA = "transfer"
LOW_TRANSFER = 0.5  # a prototype whose target probability on a reference is below this is flagged


def reference_labels(uris: list[str]) -> list[str]:
    """Short, unique, metric-safe names of reference model URIs (``models:/digits@v2`` ->
    ``digits_v2``, ``/tmp/a/twin.pt`` -> ``twin_pt``)."""
    labels: list[str] = []
    for uri in uris:
        tail = re.split(r"[/\\]|:/", uri.rstrip("/\\"))[-1] or uri
        label = re.sub(r"[^a-z0-9]+", "_", tail.lower()).strip("_") or "reference"
        base, n = label, 2
        while label in labels:
            label, n = f"{base}_{n}", n + 1
        labels.append(label)
    return labels


@torch.no_grad()
def reference_probabilities(
    net: Any, images: torch.Tensor, num_classes: int, chunk_size: int, name: str
) -> torch.Tensor:
    """``[B, K]`` class probabilities of ``images`` on a reference model (``engine.build_model``'s
    wrapper), checking its output width against the audited model's ``num_classes``."""
    from leapcore.outputs import model_probabilities

    chunk_size = max(1, chunk_size)
    logits = torch.cat(
        [net(images[i : i + chunk_size]).float() for i in range(0, len(images), chunk_size)]
    ).cpu()
    check_reference_width(name, logits.shape[1], num_classes)
    return model_probabilities(net, logits)


def transfer_to_arrow(
    prototypes: Any,
    reference_probs: dict[str, torch.Tensor],
    class_list: list[str],
) -> pa.Table:
    """The ``transfer`` table: a row per (prototype row, reference model).

    Args:
        prototypes: the audit's :class:`~leapcore.prototypes.PrototypeResult` (all chunks merged).
        reference_probs: reference URI -> ``[B, K]`` probabilities of the prototypes on it.
        class_list: the audited model's class names.

    Columns: ``row``, ``target`` (class names joined by ``+``), ``target_classes``, ``prototype``
    (index within its target), ``reference``, ``reference_label``, ``own_prob`` (target probability
    on the audited model), ``target_prob`` (on the reference), ``top_class`` / ``top_prob`` on the
    reference, ``low`` (target probability below :data:`LOW_TRANSFER`).
    """
    mask = target_mask(prototypes.targets, prototypes.per_target, len(class_list))
    own = mean_target_prob(prototypes.probs, mask)
    uris = list(reference_probs)
    labels = reference_labels(uris)
    rows: dict[str, list] = {
        k: []
        for k in (
            "row",
            "target",
            "target_classes",
            "prototype",
            "reference",
            "reference_label",
            "own_prob",
            "target_prob",
            "top_class",
            "top_prob",
            "low",
        )
    }
    for uri, label in zip(uris, labels, strict=True):
        probs = reference_probs[uri]
        on_ref = mean_target_prob(probs, mask)
        top = probs.max(1)
        for r in range(len(mask)):
            classes = list(prototypes.targets[prototypes.row_target(r)])
            rows["row"].append(r)
            rows["target"].append("+".join(class_list[c] for c in classes))
            rows["target_classes"].append(classes)
            rows["prototype"].append(prototypes.row_index(r))
            rows["reference"].append(uri)
            rows["reference_label"].append(label)
            rows["own_prob"].append(float(own[r]))
            rows["target_prob"].append(float(on_ref[r]))
            rows["top_class"].append(class_list[int(top.indices[r])])
            rows["top_prob"].append(float(top.values[r]))
            rows["low"].append(bool(on_ref[r] < LOW_TRANSFER))
    types = {
        "row": pa.int32(),
        "target_classes": pa.list_(pa.int32()),
        "prototype": pa.int32(),
        "own_prob": pa.float32(),
        "target_prob": pa.float32(),
        "top_prob": pa.float32(),
    }
    table = pa.table({k: pa.array(v, type=types.get(k)) for k, v in rows.items()})
    meta = {
        b"leapcore.schema": SCHEMA.encode(),
        b"leapcore.reference_models": json.dumps(uris).encode(),
    }
    return table.replace_schema_metadata(meta)


def transfer_metrics(table: pa.Table) -> dict[str, float]:
    """``transfer/<reference>/<target>`` (mean target probability of the target's prototypes on
    that reference), ``transfer/<reference>/mean`` and ``transfer/<reference>/low`` (how many
    prototypes fall below :data:`LOW_TRANSFER` there)."""
    out: dict[str, float] = {}
    sums: dict[tuple[str, str], list[float]] = {}
    for row in table.to_pylist():
        key = "-".join(map(str, row["target_classes"])) + "_" + slug(row["target"])
        sums.setdefault((row["reference_label"], key), []).append(row["target_prob"])
    for (ref, key), values in sums.items():
        out[f"transfer/{ref}/{key}"] = sum(values) / len(values)
    for ref in dict.fromkeys(table.column("reference_label").to_pylist()):
        probs = [r["target_prob"] for r in table.to_pylist() if r["reference_label"] == ref]
        out[f"transfer/{ref}/mean"] = sum(probs) / len(probs)
        out[f"transfer/{ref}/low"] = float(sum(p < LOW_TRANSFER for p in probs))
    return out


def transfer_section(table: pa.Table) -> str:
    """The report's HTML fragment: one row per prototype, its probability on the audited model and
    on each reference (low ones marked)."""
    refs = list(dict.fromkeys(table.column("reference").to_pylist()))
    by_row: dict[int, dict[str, Any]] = {}
    for row in table.to_pylist():
        entry = by_row.setdefault(
            row["row"], {"target": row["target"], "prototype": row["prototype"], "cells": {}}
        )
        entry["own"] = row["own_prob"]
        entry["cells"][row["reference"]] = row
    head = "<tr><th>target</th><th>#</th><th>on the audited model</th>"
    head += "".join(f"<th>on {html.escape(r)}</th>" for r in refs) + "</tr>"
    body = []
    low = 0
    for r in sorted(by_row):
        entry = by_row[r]
        cells = [html.escape(entry["target"]), str(entry["prototype"]), f"{entry['own']:.3f}"]
        for ref in refs:
            row = entry["cells"][ref]
            text = f"{row['target_prob']:.3f}"
            if row["low"]:
                low += 1
                text += f" &#9888; read as {html.escape(row['top_class'])} ({row['top_prob']:.2f})"
            cells.append(text)
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    lead = (
        f"<p><strong>{low} prototype-reference pair(s) below {LOW_TRANSFER:.1f}</strong>: "
        "those prototypes are evidence only their own model believes.</p>"
        if low
        else f"<p>Every prototype keeps a target probability of at least {LOW_TRANSFER:.1f} on "
        "every reference model.</p>"
    )
    return f"{lead}<table class='transfer'>{head}{''.join(body)}</table>"


@report_section("transfer", title="Transfer to reference models", order=15)
def transfer_report_section(audit: Any, context: ReportContext) -> str | None:
    """The report section of a ``transfer`` table (None when the audit has none)."""
    table = context.tables.get("transfer")
    return None if table is None else transfer_section(table)
