"""What changed between two audits of a model: entanglement, prototypes, quality, scan verdicts.

Pure functions over two audits' Arrow tables (``prototypes``, ``entanglement``, ``isolations`` and,
when both audits ran the scan, ``spurious``) and, for the prototype similarity, the two models.
:func:`diff_audits` returns an :class:`AuditDiff` whose ``table`` (schema ``diff``) holds a row per

- ``entanglement``: an unordered pair of classes {target, other} and how much the target's images
  also look like the other class (``pair_prob``, :mod:`leapcore.diff_pairs`; on the user's samples,
  else on both versions' prototypes cross-checked) before and after, for the direction whose change
  is judged largest (both directions in ``detail``); ``flag`` ``entangled`` / ``disentangled`` when
  that change passes the threshold. Sorted by the judged change, largest first.
- ``prototype``: a target whose prototypes both audits have, with the cosine between the previous
  and the current prototype in each model's own penultimate-layer features (each prototype fed to
  both models); ``flag`` ``dissimilar`` below the similarity threshold.
- ``quality``: a target and a measure (``target_prob``, ``target_prob_robust``, ``off_target``,
  ``kept_logit``, ``kept_prob``, ``coverage``) before and after; ``flag`` ``worse`` / ``better``.
- ``verdict``: a class whose spurious-feature verdict changed (or not) between the scans.

Classes are matched by name. Audits of different class sets are compared on the classes both have
(the table's metadata and :attr:`AuditDiff.left_out` say which were left out); models whose class
lists share no name are refused (:class:`~leapcore.errors.InputError` naming both).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from leapcore.diff_pairs import PAIR_MEASURES, judged_on, pair_probabilities, pair_rows
from leapcore.errors import InputError
from leapcore.features import penultimate_features

SCHEMA = "diff"
#: Spurious-scan verdicts, from best to worst.
VERDICTS = ("clean", "suspicious", "likely spurious")
#: Quality measures (per target): the column of ``prototypes`` / ``isolations`` and whether higher
#: is better.
QUALITY = {
    "target_prob": ("prototypes", True),
    "target_prob_robust": ("prototypes", True),
    "off_target": ("prototypes", False),
    "kept_logit": ("isolations", True),
    "kept_prob": ("isolations", True),
    "coverage": ("isolations", False),
}
_COLUMNS = pa.schema(
    [
        ("kind", pa.string()),
        ("target", pa.string()),
        ("other", pa.string()),
        ("measure", pa.string()),
        ("before", pa.float64()),
        ("after", pa.float64()),
        ("change", pa.float64()),
        ("before_text", pa.string()),
        ("after_text", pa.string()),
        ("cosine_previous_model", pa.float64()),
        ("cosine_current_model", pa.float64()),
        ("flag", pa.string()),
        ("detail", pa.string()),
    ]
)


@dataclass(frozen=True)
class AuditSide:
    """One of the two audits.

    Attributes:
        label: how users know it (``digits-cnn v3``, a run id, a file name).
        class_list: the model's class names, one per output.
        tables: its Arrow tables by schema name (``prototypes``, ``entanglement``, ``isolations``,
            ``spurious``); missing ones are left out of the comparison.
        model: the model (a torch module) for the prototype similarity; None leaves it out.
        preprocessing: what the model expects applied to [0, 1] pixels (a callable or a list of
            callables, as :class:`~leapcore.sources.LoadedModel` has it).
        facts: anything to carry into the table's metadata (``name``, ``version``, ``run_id``).
    """

    label: str
    class_list: Sequence[str]
    tables: Mapping[str, pa.Table]
    model: Any = None
    preprocessing: Any = None
    facts: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DiffThresholds:
    """When a change is worth a flag.

    Attributes:
        entanglement: a change of a pair's probability (see :func:`pair_probabilities`) that
            counts as (dis)entangled; between two seeds of one digits CNN, unrelated pairs moved by
            up to 0.15.
        quality: a change of a probability-like quality measure that counts as worse / better.
        similarity: a feature cosine below which the prototypes count as dissimilar.
        prototype_noise: the noise bound on prototypes: a pair measured on prototypes
            (cross-checked, :func:`~leapcore.diff_pairs.crossed_pair_probabilities`) is flagged
            from ``max(entanglement, prototype_noise)`` (config ``diff_prototype_noise``). Measured: seed-only retrains of the
            digits CNN moved a cross-checked pair by up to 0.43 (``benchmarks/diff_testbed.py``
            with 3 prototypes per class; 0.18 with 1), planted merges by 0.35-0.98.
    """

    entanglement: float = 0.2
    quality: float = 0.1
    similarity: float = 0.5
    prototype_noise: float = 0.45

    def __post_init__(self) -> None:
        for name in ("entanglement", "quality", "similarity", "prototype_noise"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise InputError(
                    f"the diff's {name} threshold must be a number >= 0, not {value!r}."
                )


@dataclass(frozen=True)
class AuditDiff:
    """The comparison of two audits: the ``diff`` table and what it left out.

    Attributes:
        table: the ``diff`` Arrow table (see the module docstring).
        previous: the earlier audit's label.
        current: the later audit's label.
        left_out: ``classes_only_previous`` / ``classes_only_current`` (model classes) and
            ``targets_only_previous`` / ``targets_only_current`` (audited targets).
        notes: what could not be compared and why.
    """

    table: pa.Table
    previous: str
    current: str
    left_out: dict[str, list[str]]
    notes: list[str]

    def rows(self, kind: str, flag: str | None = None) -> list[dict[str, Any]]:
        """The rows of one kind (optionally with one flag), in table order."""
        return [
            r
            for r in self.table.to_pylist()
            if r["kind"] == kind and (flag is None or r["flag"] == flag)
        ]

    @property
    def top_pair(self) -> dict[str, Any] | None:
        """The pair whose entanglement changed most (None without pairs)."""
        pairs = self.rows("entanglement")
        return pairs[0] if pairs else None

    @property
    def worse_verdicts(self) -> list[dict[str, Any]]:
        return self.rows("verdict", "worse")

    def metrics(self) -> dict[str, float]:
        """Headline numbers (``diff/...``) for MLflow and W&B."""
        out: dict[str, float] = {
            "diff/entangled_pairs": float(len(self.rows("entanglement", "entangled"))),
            "diff/disentangled_pairs": float(len(self.rows("entanglement", "disentangled"))),
            "diff/worse_verdicts": float(len(self.worse_verdicts)),
            "diff/worse_quality": float(len(self.rows("quality", "worse"))),
        }
        top = self.top_pair
        if top is not None:
            out["diff/max_entanglement_change"] = float(top["change"])
        cosines = [
            (r["cosine_previous_model"] + r["cosine_current_model"]) / 2
            for r in self.rows("prototype")
        ]
        if cosines:
            out["diff/prototype_cosine/mean"] = float(np.mean(cosines))
            out["diff/prototype_cosine/min"] = float(np.min(cosines))
        for measure in ("target_prob", "target_prob_robust"):
            changes = [r["change"] for r in self.rows("quality") if r["measure"] == measure]
            if changes:
                out[f"diff/{measure}_change/mean"] = float(np.mean(changes))
        return out


# ---------------------------------------------------------------------------------------------- #
# The diff
# ---------------------------------------------------------------------------------------------- #
def _check_classes(previous: AuditSide, current: AuditSide) -> tuple[list[str], dict[str, list]]:
    a, b = list(previous.class_list), list(current.class_list)
    shared = [c for c in b if c in set(a)]
    if not shared:
        raise InputError(
            f"{previous.label} and {current.label} are different models: their class lists share "
            f"no class ({previous.label}: {_some(a)}; {current.label}: {_some(b)}). A diff "
            "compares audits of versions of one model."
        )
    left = {
        "classes_only_previous": [c for c in a if c not in set(b)],
        "classes_only_current": [c for c in b if c not in set(a)],
    }
    return shared, left


def _some(names: list[str], n: int = 4) -> str:
    head = ", ".join(map(repr, names[:n]))
    return f"{len(names)} classes: {head}{', ...' if len(names) > n else ''}"


def _targets(side: AuditSide) -> dict[str, list[int]]:
    """Target name -> rows of its prototypes (single-class targets only; hybrids are named a+b)."""
    table = side.tables.get("prototypes")
    if table is None:
        return {}
    out: dict[str, list[int]] = {}
    for row, name in zip(table.column("row").to_pylist(), table.column("target_name").to_pylist()):
        out.setdefault(name, []).append(int(row))
    return out


def _off_target(side: AuditSide) -> set[str]:
    """Targets with an off-target prototype (its top class is not the target) in ``side``."""
    table = side.tables.get("prototypes")
    if table is None or "off_target" not in table.column_names:
        return set()
    return {
        name
        for name, off in zip(
            table.column("target_name").to_pylist(), table.column("off_target").to_pylist()
        )
        if off
    }


def _row(
    kind: str,
    target: str,
    other: str | None,
    measure: str,
    before: float | None,
    after: float | None,
    **extra: Any,
) -> dict[str, Any]:
    change = after - before if before is not None and after is not None else None
    row = {name: None for name in _COLUMNS.names}
    row.update(
        kind=kind,
        target=target,
        other=other,
        measure=measure,
        before=before,
        after=after,
        change=change,
        flag="",
        detail="",
    )
    row.update(extra)
    return row


def _quality(side: AuditSide, rows_of: dict[str, list[int]]) -> dict[tuple[str, str], float]:
    """(target, measure) -> mean over the target's prototypes (isolations: on its own class)."""
    out: dict[tuple[str, str], float] = {}
    protos = side.tables.get("prototypes")
    if protos is not None:
        by_row = {r: i for i, r in enumerate(protos.column("row").to_pylist())}
        for measure, (table, _) in QUALITY.items():
            if table != "prototypes" or measure not in protos.column_names:
                continue
            values = protos.column(measure).to_pylist()
            for name, rows in rows_of.items():
                found = [float(values[by_row[r]]) for r in rows if values[by_row[r]] is not None]
                if found:
                    out[(name, measure)] = float(np.mean(found))
    iso = side.tables.get("isolations")
    if iso is not None and "class_name" in iso.column_names:
        cols = iso.to_pydict()
        owner = {r: name for name, rows in rows_of.items() for r in rows}
        for measure, (table, _) in QUALITY.items():
            if table != "isolations" or measure not in cols:
                continue
            sums: dict[str, list[float]] = {}
            for i, c, v in zip(cols["image_index"], cols["class_name"], cols[measure]):
                name = owner.get(int(i))
                if name == c and v is not None and math.isfinite(v):  # the target's own class
                    sums.setdefault(name, []).append(float(v))
            for name, values in sums.items():
                out[(name, measure)] = float(np.mean(values))
    return out


def _quality_rows(
    previous: AuditSide,
    current: AuditSide,
    targets: list[str],
    rows_a: dict[str, list[int]],
    rows_b: dict[str, list[int]],
    threshold: float,
) -> list[dict[str, Any]]:
    qa, qb = _quality(previous, rows_a), _quality(current, rows_b)
    rows = []
    for t in targets:
        for measure, (_, higher_better) in QUALITY.items():
            if (t, measure) not in qa or (t, measure) not in qb:
                continue
            before, after = qa[(t, measure)], qb[(t, measure)]
            change = after - before
            gain = change if higher_better else -change
            # Probabilities and shares: one threshold; kept_logit is a ratio, judged the same way.
            flag = "worse" if gain <= -threshold else "better" if gain >= threshold else ""
            rows.append(_row("quality", t, None, measure, before, after, flag=flag))
    return rows


def _verdicts(side: AuditSide) -> dict[str, str]:
    table = side.tables.get("spurious")
    if table is None or "verdict" not in table.column_names:
        return {}
    for column in ("class_name", "target_name", "class", "target"):
        if column in table.column_names:
            names = table.column(column).to_pylist()
            return dict(zip(names, table.column("verdict").to_pylist()))
    return {}


def _verdict_rows(previous: AuditSide, current: AuditSide, classes: list[str]) -> list[dict]:
    va, vb = _verdicts(previous), _verdicts(current)
    rows = []
    for c in classes:
        if c not in va or c not in vb:
            continue
        before, after = va[c], vb[c]
        ia = VERDICTS.index(before) if before in VERDICTS else None
        ib = VERDICTS.index(after) if after in VERDICTS else None
        flag = ""
        if ia is not None and ib is not None and ib != ia:
            flag = "worse" if ib > ia else "better"
        rows.append(
            _row(
                "verdict",
                c,
                None,
                "verdict",
                None if ia is None else float(ia),
                None if ib is None else float(ib),
                before_text=before,
                after_text=after,
                flag=flag,
            )
        )
    rows.sort(key=lambda r: ({"worse": 0, "better": 1}.get(r["flag"], 2), r["target"]))
    return rows


def _images(side: AuditSide, rows: list[int]) -> torch.Tensor:
    from leapcore.results import column_tensor

    table = side.tables["prototypes"]
    images = column_tensor(table.column("image"))
    by_row = {r: i for i, r in enumerate(table.column("row").to_pylist())}
    return images[[by_row[r] for r in rows]]


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12)


def _prototype_rows(
    previous: AuditSide,
    current: AuditSide,
    targets: list[str],
    rows_a: dict[str, list[int]],
    rows_b: dict[str, list[int]],
    threshold: float,
    layer: str | None,
) -> list[dict[str, Any]]:
    """Per target: cosine between the previous and current prototype (the first of each) in each
    model's own penultimate features; ``detail`` names the current target whose prototype is
    nearest to the previous one in the current model's features."""
    a = _images(previous, [rows_a[t][0] for t in targets])
    b = _images(current, [rows_b[t][0] for t in targets])
    spaces = []
    for side in (previous, current):
        fa = penultimate_features(side.model, a, side.preprocessing, layer)
        fb = penultimate_features(side.model, b, side.preprocessing, layer)
        spaces.append((fa, fb))
    (pa_, pb_), (ca, cb) = spaces
    cos_prev, cos_cur = _cosine(pa_, pb_), _cosine(ca, cb)
    # Nearest current prototype of each previous one, in the current model's features.
    norm_a = torch.nn.functional.normalize(ca, dim=1)
    norm_b = torch.nn.functional.normalize(cb, dim=1)
    nearest = (norm_a @ norm_b.T).argmax(1).tolist()
    rows = []
    for i, t in enumerate(targets):
        mean = (float(cos_prev[i]) + float(cos_cur[i])) / 2
        rows.append(
            _row(
                "prototype",
                t,
                None,
                "feature_cosine",
                None,
                None,
                cosine_previous_model=float(cos_prev[i]),
                cosine_current_model=float(cos_cur[i]),
                flag="dissimilar" if mean < threshold else "",
                detail=f"nearest current prototype: {targets[nearest[i]]}",
            )
        )
    return rows


def diff_audits(
    previous: AuditSide,
    current: AuditSide,
    thresholds: DiffThresholds | None = None,
    layer: str | None = None,
    pair_measure: str = "samples",
    samples: torch.Tensor | None = None,
) -> AuditDiff:
    """Compare two audits of one model (``previous`` earlier, ``current`` later).

    Args:
        previous: the earlier audit.
        current: the later audit.
        thresholds: when a change is flagged (default :class:`DiffThresholds`).
        layer: the module whose input is the feature vector (default the last ``Linear``).
        pair_measure: which images and models the pair probabilities come from
            (:data:`~leapcore.diff_pairs.PAIR_MEASURES`; default ``samples``: on ``samples``
            when given, else ``crossed``: both versions' prototypes fed to both models, each
            pair judged on the smaller of its two sides' changes).
        samples: the user's images (``[N, C, H, W]`` in [0, 1]) for the ``samples`` measure.

    Returns:
        An :class:`AuditDiff`; its table's metadata carries both labels, the thresholds and what
        was left out.

    Raises:
        InputError: the class lists share no class (different models), the audits share no
            audited target, or the pair measure is unknown.
    """
    thresholds = thresholds or DiffThresholds()
    if pair_measure not in PAIR_MEASURES:
        raise InputError(
            f"unknown pair measure {pair_measure!r}; use one of {list(PAIR_MEASURES)}."
        )
    classes, left_out = _check_classes(previous, current)
    rows_a, rows_b = _targets(previous), _targets(current)
    targets = [t for t in rows_b if t in rows_a]
    left_out["targets_only_previous"] = [t for t in rows_a if t not in rows_b]
    left_out["targets_only_current"] = [t for t in rows_b if t not in rows_a]
    if (rows_a or rows_b) and not targets:
        raise InputError(
            f"{previous.label} and {current.label} audited no class in common "
            f"({previous.label}: {sorted(rows_a)}; {current.label}: {sorted(rows_b)}); audit a "
            "shared class in both to compare them."
        )
    notes = [f"{s.label}: {s.facts['note']}" for s in (previous, current) if s.facts.get("note")]
    for key, names in left_out.items():
        if names:
            notes.append(f"left out ({key.replace('_', ' ')}): {', '.join(names)}")
    before, after, basis, pair_notes = pair_probabilities(
        previous, current, targets, classes, pair_measure, samples
    )
    notes += pair_notes
    off = {side.label: _off_target(side) for side in (previous, current)}
    rows = pair_rows(
        before,
        after,
        basis,
        targets,
        classes,
        thresholds.entanglement,
        off,
        _row,
        thresholds.prototype_noise,
    )
    if previous.model is not None and current.model is not None and targets:
        rows += _prototype_rows(
            previous, current, targets, rows_a, rows_b, thresholds.similarity, layer
        )
    elif targets:
        notes.append("prototype similarity left out: the models were not given")
    rows += _quality_rows(previous, current, targets, rows_a, rows_b, thresholds.quality)
    verdicts = _verdict_rows(previous, current, classes)
    if not verdicts and ("spurious" in previous.tables) != ("spurious" in current.tables):
        notes.append("scan verdicts left out: only one audit ran the spurious-feature scan")
    rows += verdicts
    table = pa.Table.from_pylist(rows, schema=_COLUMNS)
    meta = {
        b"leapcore.schema": SCHEMA.encode(),
        b"leapcore.previous": previous.label.encode(),
        b"leapcore.current": current.label.encode(),
        b"leapcore.left_out": json.dumps(left_out).encode(),
        b"leapcore.notes": json.dumps(notes).encode(),
        b"leapcore.thresholds": json.dumps(vars(thresholds)).encode(),
        b"leapcore.pair_measure": pair_measure.encode(),
        b"leapcore.pair_basis": pair_basis(basis).encode(),
        b"leapcore.pair_judged_on": judged_on(
            basis, thresholds.entanglement, thresholds.prototype_noise
        ).encode(),
        b"leapcore.previous_facts": json.dumps(dict(previous.facts)).encode(),
        b"leapcore.current_facts": json.dumps(dict(current.facts)).encode(),
    }
    table = table.replace_schema_metadata(meta)
    return AuditDiff(table, previous.label, current.label, left_out, notes)


def pair_basis(basis: Mapping[tuple[str, str], str]) -> str:
    """``samples``, ``prototypes`` or ``samples and prototypes``: what the pairs were measured on."""
    kinds = {"samples" if b.endswith(" samples") else "prototypes" for b in basis.values()}
    return " and ".join(sorted(kinds, reverse=True)) or "none"


def diff_from_arrow(table: pa.Table) -> AuditDiff:
    """An :class:`AuditDiff` read back from its ``diff`` table."""
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    if meta.get("leapcore.schema") != SCHEMA:
        raise InputError(f"not a diff table (schema {meta.get('leapcore.schema')!r}).")
    return AuditDiff(
        table,
        meta.get("leapcore.previous", ""),
        meta.get("leapcore.current", ""),
        json.loads(meta.get("leapcore.left_out", "{}")),
        json.loads(meta.get("leapcore.notes", "[]")),
    )


def judged_text(table: pa.Table) -> str:
    """What a ``diff`` table's pair threshold was judged against ("" for older tables)."""
    return (table.schema.metadata or {}).get(b"leapcore.pair_judged_on", b"").decode()


def diff_facts(table: pa.Table) -> tuple[dict[str, str], dict[str, str], dict[str, float]]:
    """The previous and current audits' facts and the thresholds, from a ``diff`` table."""
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    return (
        json.loads(meta.get("leapcore.previous_facts", "{}")),
        json.loads(meta.get("leapcore.current_facts", "{}")),
        json.loads(meta.get("leapcore.thresholds", "{}")),
    )


def describe_pair(row: Mapping[str, Any]) -> str:
    """``3 <-> 8 0.12 -> 0.74 (+0.62)``."""
    return (
        f"{row['target']} <-> {row['other']} {row['before']:.2f} -> {row['after']:.2f} "
        f"({row['change']:+.2f})"
    )
