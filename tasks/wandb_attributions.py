"""The W&B tables of an ``attributions`` table (``explain_samples`` / ``audit_model(methods=...)``).

One row per (image, class, method): the image, the method's signed map drawn as in the report
(matplotlib ``bwr``, centred on zero, scaled by its largest absolute value), RISE deletion and
insertion AUC and Gini sparseness, as the ``attributions`` Arrow table holds them. The ``relmax``
table of ``leap explain --relmax`` is logged column by column (its reference pictures as images).
"""

from __future__ import annotations

import io
from typing import Any

import pyarrow as pa
from PIL import Image

from leapcore.attribution.arrow import attributions_from_arrow
from leapcore.attribution.report import map_png
from leapcore.images import to_uint8
from tasks.wandb_tables import generic_table, wandb_table

COLUMNS = ["image", "class", "method", "picture", "map", "deletion_auc", "insertion_auc"]
COLUMNS += ["sparseness"]


def attribution_table(wandb: Any, table: pa.Table, images: Any = None) -> Any:
    """``wandb.Table`` of the maps in ``table``; the table's ``picture`` column, else ``images``
    (``[N, C, H, W]`` in [0, 1], the explained samples), fills the ``picture`` column."""
    result, scores = attributions_from_arrow(table)
    pictures = table.column("picture").to_pylist() if "picture" in table.column_names else None
    names = table.column("image_name").to_pylist()
    classes = table.column("target_name").to_pylist()
    out = wandb.Table(columns=COLUMNS)
    for p in range(len(result.targets)):
        index = int(result.image_index[p])
        picture = None
        if pictures is not None:  # the table's own image (audits: prototypes and samples)
            picture = wandb.Image(Image.open(io.BytesIO(pictures[p])), caption=names[p])
        elif images is not None and index < len(images):
            picture = wandb.Image(to_uint8(images[index]), caption=names[p])
        for method in result.methods:
            drawn = Image.open(io.BytesIO(map_png(result.maps[method][p])))
            out.add_data(
                names[p],
                classes[p],
                method,
                picture,
                wandb.Image(drawn, caption=f"{method} {classes[p]}"),
                *[float(scores[method][k][p]) for k in COLUMNS[5:]],
            )
    return out


wandb_table("relmax")(generic_table)
