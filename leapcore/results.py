"""Results as files, a DataFrame, numpy arrays and Arrow tables (images as fixed-shape tensors).

Arrow tables (one schema each, named in the table's metadata under ``leapcore.schema``):
- ``prototypes``: a row per prototype with its image (and alpha) as fixed-shape tensors and logits;
- ``trajectories``: a row per (prototype, logged step, class) with the probability;
- ``entanglement``: a row per (prototype, class) with logits, probabilities and entanglement;
- ``isolations``: a row per (image, class) with the mask and isolated image as fixed-shape tensors.
``*_from_arrow`` read them back; the round trip is exact.
- ``attributions`` (schema in ``leapcore.attribution.arrow``): a row per (image, target, method) with
  the signed map as a fixed-shape tensor and its faithfulness scores.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from leapcore.images import save_png
from leapcore.isolation import PAIR_MEASURES
from leapcore.outputs import probabilities, probability_name
from leapcore.stage_names import StageTimes

SCHEMA_KEY = b"leapcore.schema"


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name).strip("_")[:40] or "class"


def _target_name(classes: list[int], class_list: list[str]) -> str:
    return "+".join(class_list[c] for c in classes)


# ---------------------------------------------------------------------------------------------- #
# PNG files
# ---------------------------------------------------------------------------------------------- #
def write_images(audit, out_dir: Path) -> dict[str, list[str]]:
    """Write prototypes, masks and isolated images as PNG; return their paths by kind and row."""
    paths: dict[str, list[str]] = {"prototypes": [], "masks": [], "isolated": []}
    names = audit.class_list
    if audit.prototypes is not None:
        p = audit.prototypes
        for row in range(len(p.images)):
            t = p.row_target(row)
            name = _safe(_target_name(p.targets[t], names))
            alpha = None if p.alphas is None else p.alphas[row]
            path = out_dir / "prototypes" / f"{t:03d}_{name}_{p.row_index(row)}.png"
            paths["prototypes"].append(str(save_png(path, p.images[row], alpha)))
    if audit.isolation is not None:
        iso = audit.isolation
        source = "prototype" if audit.prototypes is not None else "sample"
        for k, (i, c) in enumerate(iso.pairs):
            stem = f"{source}{i:03d}_{c}_{_safe(names[c])}"
            paths["masks"].append(str(save_png(out_dir / "masks" / f"{stem}.png", iso.masks[k])))
            paths["isolated"].append(
                str(save_png(out_dir / "isolated" / f"{stem}.png", iso.isolated[k]))
            )
    return paths


# ---------------------------------------------------------------------------------------------- #
# DataFrame (leap-ie's columns) and numpy dict
# ---------------------------------------------------------------------------------------------- #
def audit_frame(audit, paths: dict[str, list[str]]) -> pd.DataFrame:
    """Prototype mode: a row per (target, prototype, output class), sorted by entanglement within each
    prototype; ``input`` holds the prototype PNG on the target's own row and the isolated PNG on
    isolated classes' rows. Sample mode: a row per (sample, isolated class)."""
    names = audit.class_list
    iso = audit.isolation
    iso_lookup = {}
    if iso is not None:
        for k, (i, c) in enumerate(iso.pairs):
            iso_lookup[(i, c)] = k
    if audit.prototypes is None:
        rows = []
        probs = probabilities(audit.sample_logits, getattr(audit, "output", "logits"))
        for k, (i, c) in enumerate(iso.pairs):
            rows.append(
                {
                    "sample_index": i,
                    "output_class": names[c],
                    "logits": float(audit.sample_logits[i, c]),
                    "probs": float(probs[i, c]),
                    "input": paths["isolated"][k],
                    "mask": paths["masks"][k],
                    "mask_coverage": float(iso.coverage[k]),
                    "isolated_logit": float(iso.logits_isolated[k]),
                    "kept_logit": float(iso.kept[k]),
                    **_optional_pair_values(iso, k),
                    "region": getattr(audit, "region", None),
                }
            )
        return _described(pd.DataFrame(rows), audit)
    p = audit.prototypes
    probs = p.probs
    top, off, target_prob = p.flags()
    flags = getattr(audit, "entanglement_probed", None)
    probed = [None] * len(p.images) if flags is None else [bool(f) for f in flags]
    frames = []
    for row in range(len(p.images)):
        t = p.row_target(row)
        frame = pd.DataFrame(
            {
                "target_class": _target_name(p.targets[t], names),
                "prototype_index": p.row_index(row),
                "output_class": names,
                "logits": p.logits[row].numpy(),
                "probs": probs[row].numpy(),
                "entanglement": audit.entanglement[row].numpy(),
                "entanglement_probed": probed[row],
                "input": None,
                "mask": None,
                # The prototype's own quality, repeated on each of its rows.
                "top_class": int(top[row]),
                "off_target": bool(off[row]),
                "target_prob": float(target_prob[row]),
                "region": p.region,
            }
        )
        if p.robust_probs is not None:
            frame["target_prob_robust"] = float(p.robust_probs[row])
        if p.transfer_probs is not None:
            frame["transfer_probs"] = [p.transfer_probs[row].tolist()] * len(names)
        for c in p.targets[t]:
            frame.loc[c, "input"] = paths["prototypes"][row]
        for c in range(len(names)):
            k = iso_lookup.get((row, c))
            if k is not None:
                frame.loc[c, "mask"] = paths["masks"][k]
                if c not in p.targets[t]:
                    frame.loc[c, "input"] = paths["isolated"][k]
        frame["input"] = frame["input"].astype(object)
        frames.append(frame.sort_values("entanglement", ascending=False, kind="stable"))
    return _described(pd.concat(frames, ignore_index=True), audit)


def _described(df: pd.DataFrame, audit) -> pd.DataFrame:
    """Say in ``df.attrs`` what the numbers are: output kind, probability function, region."""
    output = getattr(audit, "output", "logits")
    df.attrs.update(
        output=output,
        probability=probability_name(output),
        model_kind=getattr(audit, "model_kind", "classifier"),
        region=getattr(audit, "region", None),
    )
    return df


def _optional_pair_values(iso, k: int) -> dict[str, float]:
    return {
        name: float(getattr(iso, name)[k])
        for name in PAIR_MEASURES
        if getattr(iso, name) is not None
    }


def audit_arrays(audit) -> dict[str, Any]:
    """The numpy arrays of an audit (leap-ie's second return value)."""
    out: dict[str, Any] = {
        "class_list": list(audit.class_list),
        "timings": StageTimes(audit.timings),
        "peak_memory_mb": audit.peak_memory_mb,
    }
    if audit.prototypes is not None:
        p = audit.prototypes
        flags = getattr(audit, "entanglement_probed", None)
        out.update(
            prototypes=p.images.numpy(),
            prototype_logits=p.logits.numpy(),
            prototype_probs=p.probs.numpy(),
            trajectory=p.trajectory.numpy(),
            trajectory_steps=np.asarray(p.trajectory_steps),
            entanglement=audit.entanglement.numpy(),
            entanglement_probed=None if flags is None else flags.numpy(),
            baseline=audit.baseline.image.cpu().numpy(),
            lr=p.lr,
        )
        if p.alphas is not None:
            out["alphas"] = p.alphas.numpy()
    if audit.isolation is not None:
        iso = audit.isolation
        out.update(
            isolation_pairs=np.asarray(iso.pairs),
            masks=iso.masks.numpy(),
            isolated=iso.isolated.numpy(),
            isolation_logits_full=iso.logits_full.numpy(),
            isolation_logits_isolated=iso.logits_isolated.numpy(),
        )
    if audit.sample_logits is not None:
        out["sample_logits"] = audit.sample_logits.numpy()
    return out


# ---------------------------------------------------------------------------------------------- #
# Arrow tables
# ---------------------------------------------------------------------------------------------- #
def tensor_column(batch: torch.Tensor | np.ndarray) -> pa.ExtensionArray:
    """``[N, ...]`` float32 -> an Arrow fixed-shape tensor column of ``N`` tensors."""
    array = batch.detach().cpu().numpy() if isinstance(batch, torch.Tensor) else np.asarray(batch)
    return pa.FixedShapeTensorArray.from_numpy_ndarray(
        np.ascontiguousarray(array, dtype=np.float32)
    )


def column_tensor(column: pa.ChunkedArray | pa.Array) -> torch.Tensor:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return torch.from_numpy(column.to_numpy_ndarray().copy())


def _with_schema(table: pa.Table, name: str, extra: dict[str, str] | None = None) -> pa.Table:
    meta = {SCHEMA_KEY: name.encode()}
    for k, v in (extra or {}).items():
        meta[f"leapcore.{k}".encode()] = v.encode()
    return table.replace_schema_metadata(meta)


def schema_name(table: pa.Table) -> str:
    return (table.schema.metadata or {}).get(SCHEMA_KEY, b"").decode()


def prototypes_to_arrow(result, class_list: list[str]) -> pa.Table:
    rows = range(len(result.images))
    columns = {
        "row": pa.array(list(rows), pa.int32()),
        "target_index": pa.array([result.row_target(r) for r in rows], pa.int32()),
        "target_classes": pa.array(
            [result.targets[result.row_target(r)] for r in rows], pa.list_(pa.int32())
        ),
        "target_name": pa.array(
            [_target_name(result.targets[result.row_target(r)], class_list) for r in rows]
        ),
        "prototype_index": pa.array([result.row_index(r) for r in rows], pa.int32()),
        "image": tensor_column(result.images),
        "logits": pa.array(list(result.logits.numpy()), pa.list_(pa.float32())),
        "region": pa.array([result.region] * len(result.images), pa.string()),
    }
    if result.alphas is not None:
        columns["alpha"] = tensor_column(result.alphas)
    top, off, prob = result.flags()
    columns["top_class"] = pa.array(top.numpy().astype(np.int32), pa.int32())
    columns["off_target"] = pa.array(off.numpy().astype(bool), pa.bool_())
    columns["target_prob"] = pa.array(prob.numpy().astype(np.float32), pa.float32())
    if result.robust_probs is not None:
        columns["target_prob_robust"] = pa.array(
            result.robust_probs.numpy().astype(np.float32), pa.float32()
        )
    if result.transfer_probs is not None:
        columns["transfer_probs"] = pa.array(
            list(result.transfer_probs.numpy().astype(np.float32)), pa.list_(pa.float32())
        )
    meta = {
        "lr": repr(result.lr),
        "steps": str(result.steps),
        "per_target": str(result.per_target),
        "seconds": repr(result.seconds),
        "objective_weight": repr(result.objective_weight),
        "reference_models": json.dumps(list(result.reference_models)),
        "output": result.output,
        "probability": probability_name(result.output),
    }
    return _with_schema(pa.table(columns), "prototypes", meta)


def trajectories_to_arrow(result) -> pa.Table:
    traj = result.trajectory.numpy()  # [S, B, K]
    s, b, k = traj.shape
    steps = np.repeat(np.asarray(result.trajectory_steps, dtype=np.int32), b * k)
    rows = np.tile(np.repeat(np.arange(b, dtype=np.int32), k), s)
    classes = np.tile(np.arange(k, dtype=np.int32), s * b)
    table = pa.table(
        {
            "step": steps,
            "row": rows,
            "class_index": classes,
            "prob": traj.reshape(-1).astype(np.float32),
        }
    )
    return _with_schema(table, "trajectories")


def prototypes_from_arrow(prototypes: pa.Table, trajectories: pa.Table):
    """Rebuild a :class:`~leapcore.prototypes.PrototypeResult` from its two tables."""
    from leapcore.prototypes import PrototypeResult

    meta = {k.decode(): v.decode() for k, v in (prototypes.schema.metadata or {}).items()}
    per_target = int(meta["leapcore.per_target"])
    target_lists = prototypes.column("target_classes").to_pylist()
    targets = [target_lists[i] for i in range(0, len(target_lists), per_target)]
    steps = sorted(set(trajectories.column("step").to_pylist()))
    probs = trajectories.column("prob").to_numpy()
    b = prototypes.num_rows
    traj = torch.from_numpy(probs.reshape(len(steps), b, -1).copy())
    logits = torch.from_numpy(
        np.stack(prototypes.column("logits").to_numpy(zero_copy_only=False)).astype(np.float32)
    )
    alphas = (
        column_tensor(prototypes.column("alpha")) if "alpha" in prototypes.column_names else None
    )
    names = prototypes.column_names
    robust = (
        torch.from_numpy(prototypes.column("target_prob_robust").to_numpy().copy())
        if "target_prob_robust" in names
        else None
    )
    transfer = None
    if "transfer_probs" in names:
        values = prototypes.column("transfer_probs").to_pylist()
        transfer = torch.tensor(values, dtype=torch.float32).reshape(len(values), -1)
    return PrototypeResult(
        targets=targets,
        per_target=per_target,
        images=column_tensor(prototypes.column("image")),
        alphas=alphas,
        logits=logits,
        trajectory_steps=steps,
        trajectory=traj,
        lr=float(meta["leapcore.lr"]),
        steps=int(meta["leapcore.steps"]),
        seconds=float(meta.get("leapcore.seconds", 0.0)),
        robust_probs=robust,
        transfer_probs=transfer,
        reference_models=json.loads(meta.get("leapcore.reference_models", "[]")),
        objective_weight=float(meta.get("leapcore.objective_weight", "1.0")),
        output=meta.get("leapcore.output", "logits"),
        region=prototypes.column("region")[0].as_py()
        if "region" in prototypes.column_names
        else None,
    )


def entanglement_to_arrow(
    result,
    baseline_logits: torch.Tensor,
    scores: torch.Tensor,
    class_list: list[str],
    probed: torch.Tensor | None = None,
) -> pa.Table:
    """A row per (prototype, class); ``probed`` (``[B]`` bool, or None where no probe ran) says
    whether the ``relaxed`` measure's probe entered each prototype's scores (column ``probed``,
    null without a probe)."""
    b, k = scores.shape
    rows = np.repeat(np.arange(b, dtype=np.int32), k)
    baseline_logits = baseline_logits.cpu()  # make_baseline's own result lives on its device
    base = baseline_logits.expand(b, k) if baseline_logits.shape[0] == 1 else baseline_logits
    table = pa.table(
        {
            "row": rows,
            "target_index": np.asarray(
                [result.row_target(int(r)) for r in range(b)], dtype=np.int32
            ).repeat(k),
            "target_name": np.asarray(
                [_target_name(result.targets[result.row_target(r)], class_list) for r in range(b)],
                dtype=object,
            ).repeat(k),
            "class_index": np.tile(np.arange(k, dtype=np.int32), b),
            "class_name": np.tile(np.asarray(class_list, dtype=object), b),
            "logit": result.logits.numpy().reshape(-1),
            "prob": result.probs.numpy().reshape(-1),
            "baseline_logit": base.numpy().reshape(-1).astype(np.float32),
            "entanglement": scores.numpy().reshape(-1).astype(np.float32),
            "probed": pa.array(
                [None] * (b * k) if probed is None else np.repeat(probed.numpy(), k).tolist(),
                pa.bool_(),
            ),
            "region": pa.array([result.region] * (b * k), pa.string()),
        }
    )
    meta = {"output": result.output, "probability": probability_name(result.output)}
    return _with_schema(table, "entanglement", meta)


def entanglement_from_arrow(table: pa.Table) -> torch.Tensor:
    b = len(set(table.column("row").to_pylist()))
    return torch.from_numpy(table.column("entanglement").to_numpy().reshape(b, -1).copy())


def entanglement_probed_from_arrow(table: pa.Table) -> torch.Tensor | None:
    """``[B]`` bool: the rows the probe entered, or None (no probe ran, or an older table)."""
    if "probed" not in table.column_names or table.column("probed").null_count == len(table):
        return None
    b = len(set(table.column("row").to_pylist()))
    flags = table.column("probed").to_numpy(zero_copy_only=False).reshape(b, -1)[:, 0]
    return torch.from_numpy(flags.astype(bool))


def isolations_to_arrow(
    result, class_list: list[str], source: str, region: str | None = None
) -> pa.Table:
    table = pa.table(
        {
            "source": pa.array([source] * len(result.pairs)),
            "image_index": pa.array([p[0] for p in result.pairs], pa.int32()),
            "class_index": pa.array([p[1] for p in result.pairs], pa.int32()),
            "class_name": pa.array([class_list[p[1]] for p in result.pairs]),
            "mask": tensor_column(result.masks),
            "isolated": tensor_column(result.isolated),
            "logit_full": pa.array(result.logits_full.numpy(), pa.float32()),
            "logit_isolated": pa.array(result.logits_isolated.numpy(), pa.float32()),
            "coverage": pa.array(result.coverage.numpy(), pa.float32()),
            "kept_logit": pa.array(result.kept.numpy().astype(np.float32), pa.float32()),
            "region": pa.array([region] * len(result.pairs), pa.string()),
        }
    )
    for name in PAIR_MEASURES:
        value = getattr(result, name)
        if value is not None:
            table = table.append_column(name, pa.array(value.numpy().astype(np.float32)))
    if getattr(result, "saliency", None) is not None:
        table = table.append_column("saliency", tensor_column(result.saliency))
    return _with_schema(
        table, "isolations", {"method": result.method, "seconds": repr(result.seconds)}
    )


def isolations_from_arrow(table: pa.Table):
    from leapcore.isolation import IsolationResult

    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    pairs = list(
        zip(table.column("image_index").to_pylist(), table.column("class_index").to_pylist())
    )
    return IsolationResult(
        pairs=[(int(i), int(c)) for i, c in pairs],
        masks=column_tensor(table.column("mask")),
        isolated=column_tensor(table.column("isolated")),
        logits_full=torch.from_numpy(table.column("logit_full").to_numpy().copy()),
        logits_isolated=torch.from_numpy(table.column("logit_isolated").to_numpy().copy()),
        method=meta["leapcore.method"],
        seconds=float(meta.get("leapcore.seconds", 0.0)),
        saliency=column_tensor(table.column("saliency"))
        if "saliency" in table.column_names
        else None,
        **{
            name: torch.from_numpy(table.column(name).to_numpy().copy())
            for name in PAIR_MEASURES
            if name in table.column_names
        },
    )


def baseline_to_arrow(result) -> pa.Table:
    """A :class:`~leapcore.baseline.BaselineResult`: a row per start image with its logits."""
    table = pa.table(
        {
            "row": pa.array(list(range(len(result.image))), pa.int32()),
            "image": tensor_column(result.image),
            "logits": pa.array(list(result.logits.cpu().numpy()), pa.list_(pa.float32())),
        }
    )
    meta = {"spread": repr(result.spread), "steps": str(result.steps)}
    return _with_schema(table, "baseline", meta)


def baseline_from_arrow(table: pa.Table):
    from leapcore.baseline import BaselineResult

    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    logits = np.stack(table.column("logits").to_numpy(zero_copy_only=False)).astype(np.float32)
    return BaselineResult(
        image=column_tensor(table.column("image")),
        logits=torch.from_numpy(logits),
        spread=float(meta["leapcore.spread"]),
        steps=int(meta["leapcore.steps"]),
    )


def learning_rate_to_arrow(result) -> pa.Table:
    """A :class:`~leapcore.lr_finder.LearningRateResult`: a row per range-test window."""
    table = pa.table(
        {
            "rate": pa.array(result.rates, pa.float64()),
            "loss": pa.array(result.losses, pa.float64()),
        }
    )
    meta = {"lr": repr(result.lr), "fell_back": str(result.fell_back), "reason": result.reason}
    return _with_schema(table, "learning_rate", meta)


def learning_rate_from_arrow(table: pa.Table):
    from leapcore.lr_finder import LearningRateResult

    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    return LearningRateResult(
        lr=float(meta["leapcore.lr"]),
        rates=table.column("rate").to_pylist(),
        losses=table.column("loss").to_pylist(),
        fell_back=meta["leapcore.fell_back"] == "True",
        reason=meta.get("leapcore.reason", ""),
    )


def samples_to_arrow(
    samples: torch.Tensor,
    logits: torch.Tensor | None = None,
    names: list[str] | None = None,
    transform: dict[str, Any] | None = None,
) -> pa.Table:
    """User images ``[N, C, H, W]`` in [0, 1] (sample mode), with their logits once known; the
    eval transform that loaded them (``EvalTransform.spec()``) in metadata ``leapcore.eval_transform``."""
    columns: dict[str, Any] = {
        "sample_index": pa.array(list(range(len(samples))), pa.int32()),
        "name": pa.array(names or [str(i) for i in range(len(samples))]),
        "image": tensor_column(samples),
    }
    if logits is not None:
        columns["logits"] = pa.array(list(logits.cpu().numpy()), pa.list_(pa.float32()))
    extra = {"eval_transform": json.dumps(transform)} if transform else None
    return _with_schema(pa.table(columns), "samples", extra)


def sample_transform_spec(table: pa.Table) -> dict[str, Any] | None:
    """The eval transform a ``samples`` table was loaded with, or None."""
    raw = (table.schema.metadata or {}).get(b"leapcore.eval_transform")
    return json.loads(raw) if raw else None


def samples_from_arrow(table: pa.Table) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
    """``(samples, logits or None, names)`` from a ``samples`` table."""
    logits = None
    if "logits" in table.column_names:
        stacked = np.stack(table.column("logits").to_numpy(zero_copy_only=False))
        logits = torch.from_numpy(stacked.astype(np.float32))
    return column_tensor(table.column("image")), logits, table.column("name").to_pylist()


def audit_tables(audit) -> dict[str, pa.Table]:
    """Every result of an audit as Arrow tables, keyed by schema name."""
    tables: dict[str, pa.Table] = {}
    if audit.prototypes is not None:
        tables["prototypes"] = prototypes_to_arrow(audit.prototypes, audit.class_list)
        tables["trajectories"] = trajectories_to_arrow(audit.prototypes)
        tables["entanglement"] = entanglement_to_arrow(
            audit.prototypes,
            audit.baseline.logits.cpu(),
            audit.entanglement,
            audit.class_list,
            getattr(audit, "entanglement_probed", None),
        )
    if audit.isolation is not None:
        source = "prototype" if audit.prototypes is not None else "sample"
        tables["isolations"] = isolations_to_arrow(
            audit.isolation, audit.class_list, source, getattr(audit, "region", None)
        )
    return tables


def write_ipc(table: pa.Table, path: str | os.PathLike) -> Path:
    """Write an Arrow IPC file atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_ipc(path: str | os.PathLike) -> pa.Table:
    with pa.memory_map(str(path), "r") as source:
        return pa.ipc.open_file(source).read_all()


def frame_html(df: pd.DataFrame, rows: int = 20) -> str:
    """An HTML table of the first rows, with image paths shown as images."""
    cells = []
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    for _, record in df.head(rows).iterrows():
        tds = []
        for col, value in record.items():
            if col in ("input", "mask") and isinstance(value, str) and value:
                tds.append(f'<td><img src="{html.escape(value)}" width="96"></td>')
            elif isinstance(value, float):
                tds.append(f"<td>{value:.4g}</td>")
            else:
                tds.append(f"<td>{html.escape(str(value))}</td>")
        cells.append("<tr>" + "".join(tds) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(cells)}</table>"
