"""The ``attributions`` Arrow table: one row per (image, target, method) with its map and scores.

Schema ``attributions`` (named in the metadata under ``leapcore.schema``, beside the tables of
``leapcore.results``):

- ``image_index`` int32, ``image_name`` string: the explained image;
- ``target`` int32, ``target_name`` string: the class explained;
- ``method`` string: the registry name (``leapcore.attribution.list_methods``);
- ``map`` fixed-shape tensor float32 ``[H, W]``: the signed map at the input's resolution;
- ``seconds`` float32: the method's wall-clock time for all pairs divided by the number of pairs;
- ``deletion_auc``, ``insertion_auc``, ``sparseness`` float32: ``leapcore.faithfulness`` scores of the
  map (RISE deletion / insertion AUC with the blur substrate, Gini sparseness); NaN when not scored;
- ``picture`` binary, optional: the explained image as the model saw it, as an 8-bit PNG, so that a
  report or a W&B table shows it beside the maps without other artifacts (written when
  ``attributions_to_arrow`` gets ``images``; an audit explains prototypes and samples in one table);
- ``concept_ids`` list<int32>, only when ``crp`` ran: its top-k channel concepts of the pair (null in
  the other methods' rows); the metadata ``leapcore.crp_layer`` names their layer when known.

Metadata ``leapcore.faithfulness_steps`` and ``leapcore.substrate`` record the protocol.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence

import pyarrow as pa
import torch
from PIL import Image

from leapcore.attribution.core import AttributionResult
from leapcore.faithfulness import deletion_insertion_auc, sparseness
from leapcore.images import to_uint8
from leapcore.results import _with_schema, column_tensor, tensor_column

SCHEMA = "attributions"


def faithfulness_scores(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    result: AttributionResult,
    *,
    steps: int = 16,
    substrate: str = "blur",
) -> dict[str, dict[str, torch.Tensor]]:
    """Method -> ``{"deletion_auc", "insertion_auc", "sparseness"}`` of every pair's map."""
    device = images.device
    pair_images = images[result.image_index.to(device)]
    targets = result.targets.tolist()
    scores = {}
    for method, maps in result.maps.items():
        deletion, insertion = deletion_insertion_auc(
            logits_fn, pair_images, maps.to(device), targets, steps=steps, substrate=substrate
        )
        scores[method] = {
            "deletion_auc": deletion.cpu(),
            "insertion_auc": insertion.cpu(),
            "sparseness": sparseness(maps).cpu(),
        }
    return scores


def attributions_to_arrow(
    result: AttributionResult,
    class_list: Sequence[str],
    image_names: Sequence[str] | None = None,
    scores: dict[str, dict[str, torch.Tensor]] | None = None,
    steps: int = 16,
    substrate: str = "blur",
    images: torch.Tensor | None = None,
    crp_layer: str | None = None,
) -> pa.Table:
    """The ``attributions`` table of ``result`` (see the module docstring); ``images``
    (``[N, C, H, W]`` in [0, 1], the explained images) fills the ``picture`` column."""
    pairs = len(result.targets)
    names = list(image_names) if image_names is not None else None
    columns: dict[str, list] = {
        k: [] for k in ("image_index", "image_name", "target", "target_name", "method")
    }
    maps, seconds = [], []
    numbers: dict[str, list[float]] = {"deletion_auc": [], "insertion_auc": [], "sparseness": []}
    nan = torch.full((pairs,), float("nan"))
    for method, method_maps in result.maps.items():
        for p in range(pairs):
            image, target = int(result.image_index[p]), int(result.targets[p])
            columns["image_index"].append(image)
            columns["image_name"].append(names[image] if names else str(image))
            columns["target"].append(target)
            columns["target_name"].append(
                class_list[target] if target < len(class_list) else str(target)
            )
            columns["method"].append(method)
        maps.append(method_maps)
        seconds += [result.seconds[method] / pairs] * pairs
        for key in numbers:
            numbers[key] += (scores or {}).get(method, {}).get(key, nan).tolist()
    table = pa.table(
        {
            "image_index": pa.array(columns["image_index"], pa.int32()),
            "image_name": pa.array(columns["image_name"], pa.string()),
            "target": pa.array(columns["target"], pa.int32()),
            "target_name": pa.array(columns["target_name"], pa.string()),
            "method": pa.array(columns["method"], pa.string()),
            "map": tensor_column(torch.cat(maps)),
            "seconds": pa.array(seconds, pa.float32()),
            **{key: pa.array(values, pa.float32()) for key, values in numbers.items()},
        }
    )
    if images is not None:
        pngs = [picture_png(images[i]) for i in range(len(images))]
        rows = [pngs[i] for i in table.column("image_index").to_pylist()]
        table = table.append_column("picture", pa.array(rows, pa.binary()))
    concepts = result.extras.get("crp", {}).get("concept_ids")
    if concepts is not None:
        ids = [
            concepts[p].tolist() if method == "crp" else None
            for method in result.maps
            for p in range(pairs)
        ]
        table = table.append_column("concept_ids", pa.array(ids, pa.list_(pa.int32())))
    meta = {"faithfulness_steps": str(steps), "substrate": substrate}
    if crp_layer is not None and concepts is not None:
        meta["crp_layer"] = crp_layer
    return _with_schema(table, SCHEMA, meta)


def picture_png(image: torch.Tensor) -> bytes:
    """``[C, H, W]`` in [0, 1] as an 8-bit PNG (grey for one channel)."""
    out = io.BytesIO()
    Image.fromarray(to_uint8(image)).save(out, format="PNG")
    return out.getvalue()


def attributions_from_arrow(
    table: pa.Table,
) -> tuple[AttributionResult, dict[str, dict[str, torch.Tensor]]]:
    """Read an ``attributions`` table back: the result (timing per method) and the scores."""
    methods = list(dict.fromkeys(table.column("method").to_pylist()))
    all_maps = column_tensor(table.column("map"))
    method_col = table.column("method").to_pylist()
    maps, seconds, scores = {}, {}, {}
    first = None
    for method in methods:
        rows = [i for i, m in enumerate(method_col) if m == method]
        first = first or rows
        maps[method] = all_maps[rows]
        seconds[method] = float(sum(table.column("seconds").to_numpy()[rows]))
        scores[method] = {
            key: torch.from_numpy(table.column(key).to_numpy()[rows].copy())
            for key in ("deletion_auc", "insertion_auc", "sparseness")
        }
    image_index = torch.tensor(
        [table.column("image_index")[i].as_py() for i in first or []], dtype=torch.long
    )
    targets = torch.tensor(
        [table.column("target")[i].as_py() for i in first or []], dtype=torch.long
    )
    return AttributionResult(image_index, targets, maps, seconds), scores
