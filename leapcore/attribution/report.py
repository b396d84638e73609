"""The report's attribution section: one row per (image, target), the methods side by side.

``attribution_section(audit, context)`` follows the report's section contract (name -> function of
the audit and a context dict -> an HTML fragment or None). It reads ``context["attributions"]`` (the
``attributions`` Arrow table) and ``context["images"]`` (``[N, C, H, W]`` in [0, 1], optional; the
table's own ``picture`` column wins when it has one, as an audit's table of prototypes and samples
does) and ``context["relmax"]`` (optional: the ``relmax`` table of ``leap explain --relmax``, drawn
as one row of reference images per concept) and returns None when there are no attributions. Maps are drawn with a diverging colour map centred on
zero (red positive, blue negative), each scaled by its own largest absolute value; under each map:
deletion AUC (lower is better), insertion AUC (higher is better) and sparseness.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from leapcore.attribution.arrow import attributions_from_arrow


def map_png(values: torch.Tensor) -> bytes:
    """A ``[H, W]`` signed map as an RGB PNG (matplotlib's ``bwr``, symmetric around zero)."""
    from matplotlib import colormaps

    peak = float(values.abs().max()) or 1.0
    rgba = colormaps["bwr"]((values.numpy() / peak + 1) / 2)
    out = io.BytesIO()
    Image.fromarray((rgba[..., :3] * 255).astype(np.uint8)).save(out, format="PNG")
    return out.getvalue()


def _uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _image_png(image: torch.Tensor) -> bytes:
    array = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(out, format="PNG")
    return out.getvalue()


def attribution_section(audit: Any, context: dict[str, Any]) -> str | None:
    """The section's HTML (see the module docstring), or None without an ``attributions`` table."""
    table = context.get("attributions")
    if not isinstance(table, pa.Table) or table.num_rows == 0:
        return None
    images = context.get("images")
    pictures = table.column("picture").to_pylist() if "picture" in table.column_names else None
    concepts = (
        table.column("concept_ids").to_pylist() if "concept_ids" in table.column_names else None
    )
    result, scores = attributions_from_arrow(table)
    names = table.column("image_name").to_pylist()
    target_names = table.column("target_name").to_pylist()
    methods = result.methods
    head = "".join(f"<th>{html.escape(m)}</th>" for m in methods)
    rows = []
    for p in range(len(result.targets)):
        image = int(result.image_index[p])
        cells = [f"<td>{html.escape(names[p])}<br>{html.escape(target_names[p])}</td>"]
        if pictures is not None:  # the table carries the image itself (audits)
            cells.append(f'<td><img src="{_uri(pictures[p])}" width="112" alt="image"></td>')
        elif isinstance(images, torch.Tensor):
            cells.append(
                f'<td><img src="{_uri(_image_png(images[image]))}" width="112" alt="image"></td>'
            )
        for m, method in enumerate(methods):
            s = {k: float(v[p]) for k, v in scores[method].items()}
            ids = concepts[m * len(result.targets) + p] if concepts is not None else None
            shown_ids = f"<br><small>concepts {', '.join(map(str, ids))}</small>" if ids else ""
            cells.append(
                f'<td><img src="{_uri(map_png(result.maps[method][p]))}" width="112" '
                f'alt="{html.escape(method)}"><br><small>del {s["deletion_auc"]:.3f} · '
                f"ins {s['insertion_auc']:.3f} · sparse {s['sparseness']:.3f}</small>"
                f"{shown_ids}</td>"
            )
        rows.append("<tr>" + "".join(cells) + "</tr>")
    shown = pictures is not None or isinstance(images, torch.Tensor)
    image_head = "<th>image</th>" if shown else ""
    seconds = ", ".join(f"{m} {result.seconds[m]:.2f} s" for m in methods)
    relmax = context.get("relmax")
    references = relmax_html(relmax) if isinstance(relmax, pa.Table) else ""
    return (
        '<section id="attributions"><h2>Attributions</h2>'
        "<p>Signed maps (red raises the class logit, blue lowers it). Under each: deletion AUC "
        "(lower = more faithful), insertion AUC (higher = more faithful), sparseness (Gini). "
        f"Time per method: {html.escape(seconds)}.</p>"
        f"<table><tr><th>image / class</th>{image_head}{head}</tr>{''.join(rows)}</table>"
        f"{references}</section>"
    )


def relmax_html(table: pa.Table) -> str:
    """The ``relmax`` table as one row per concept: its reference images, most relevant first."""
    if table.num_rows == 0:
        return ""
    rows: dict[int, list[str]] = {}
    for row in table.to_pylist():
        rows.setdefault(row["concept"], []).append(
            f'<td><img src="{_uri(row["picture"])}" width="80" alt="reference"><br>'
            f"<small>{html.escape(row['image_name'])} · {row['score']:.3f}</small></td>"
        )
    layer = html.escape(table.column("layer")[0].as_py())
    body = "".join(
        f"<tr><td>concept {concept}</td>{''.join(cells)}</tr>" for concept, cells in rows.items()
    )
    return (
        f"<h3>Reference images per concept (RelMax, layer {layer})</h3>"
        "<p>For each CRP concept above, the user's images in which it takes the largest share of "
        "the relevance at its layer (zennit-crp's RelMax, relevance normalised per image).</p>"
        f"<table>{body}</table>"
    )


def attribution_metrics(table: pa.Table) -> dict[str, float]:
    """Per method: mean deletion / insertion AUC, mean sparseness and seconds, for MLflow."""
    result, scores = attributions_from_arrow(table)
    metrics = {}
    for method in result.methods:
        for key, values in scores[method].items():
            finite = values[torch.isfinite(values)]
            if len(finite):
                metrics[f"attribution.{method}.{key}"] = float(finite.mean())
        metrics[f"attribution.{method}.seconds"] = result.seconds[method]
    return metrics
