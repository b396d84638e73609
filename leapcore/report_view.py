"""What the report's template shows: rows of prototypes, isolations, samples and options, with one
number format per kind of quantity. Pure functions of an audit and its (optional) Arrow tables."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from leapcore.config import (
    ALL,
    BASELINE,
    ENTANGLEMENT,
    ISOLATION,
    LR,
    PROTOTYPES,
    EngineConfig,
    option_stage,
)

# Below these a result is flagged in the summary.
LOW_PROB = 0.5
LOW_KEPT = 0.5
LOW_FULL_PROB = 0.05  # below this a probability ratio (kept_prob) is flagged as meaningless
HIGH_ENTANGLEMENT = 0.5


def target_label(audit: Any, row: int) -> str:
    """``goldfish #0``: the prototype's target classes and its index."""
    p = audit.prototypes
    return (
        "+".join(audit.class_list[c] for c in p.targets[p.row_target(row)])
        + f" #{p.row_index(row)}"
    )


# ---------------------------------------------------------------------------------------------- #
# What the template shows
# ---------------------------------------------------------------------------------------------- #
# Options that route or label a run; the report leaves them out (they say nothing about results).
ENVIRONMENT = frozenset(
    {"leap_api_key", "wandb_api_key", "wandb_entity", "project_name", "output_dir", "samples"}
)


def _column(tables: Mapping[str, Any], table: str, name: str) -> list[Any] | None:
    """A column of one of the context's tables as a list, or None when the table or column is absent."""
    found = tables.get(table)
    if found is None:
        return None
    names = getattr(found, "column_names", None)
    if names is not None:
        return found.column(name).to_pylist() if name in names else None
    values = found.get(name) if isinstance(found, Mapping) else None
    return None if values is None else list(values)


def _by_row(tables: Mapping[str, Any], table: str, name: str, count: int) -> list[Any]:
    """An optional column aligned to rows ``0..count-1`` (by its ``row`` column when it has one)."""
    values = _column(tables, table, name)
    if values is None:
        return [None] * count
    rows = _column(tables, table, "row") or list(range(len(values)))
    out: list[Any] = [None] * count
    for r, v in zip(rows, values):
        if r is not None and 0 <= int(r) < count:
            out[int(r)] = v
    return out


def stages_that_ran(audit: Any) -> list[str]:
    """The engine stages whose results the audit holds (config stage names)."""
    ran = [
        (BASELINE, audit.baseline),
        (LR, audit.lr),
        (PROTOTYPES, audit.prototypes),
        (ENTANGLEMENT, audit.entanglement),
        (ISOLATION, audit.isolation),
    ]
    return [stage for stage, result in ran if result is not None]


def config_view(config: Mapping[str, Any], ran: list[str]) -> dict[str, list[dict[str, Any]]]:
    """``changed``: options set to something other than the default; ``defaults``: the other options
    the stages that ran read (environment options, secrets and other stages' options left out)."""
    defaults = EngineConfig().model_dump(mode="json")
    changed, unchanged = [], []
    for name in EngineConfig.model_fields:
        if name in ENVIRONMENT or name not in config:
            continue
        value, default = config[name], defaults.get(name)
        row = {"option": name, "value": fmt_value(value), "default": fmt_value(default)}
        row["stage"] = option_stage(name)
        if value != default:
            changed.append(row)
        elif row["stage"] in ran or row["stage"] == ALL:
            unchanged.append(row)
    return {"changed": changed, "defaults": unchanged}


def prototype_rows(audit: Any, tables: Mapping[str, Any]) -> list[dict[str, Any]]:
    from leapcore.figures import photo

    p = audit.prototypes
    names = audit.class_list
    probs = p.probs
    n = len(p.images)
    off_col = _by_row(tables, "prototypes", "off_target", n)
    robust_col = _by_row(tables, "prototypes", "target_prob_robust", n)
    prob_col = _by_row(tables, "prototypes", "target_prob", n)
    top_col = _by_row(tables, "prototypes", "top_class", n)
    rows = []
    for r in range(n):
        t = p.targets[p.row_target(r)]
        top = int(top_col[r]) if top_col[r] is not None else int(probs[r].argmax())
        prob = float(prob_col[r]) if prob_col[r] is not None else float(probs[r, t].mean())
        off = bool(off_col[r]) if off_col[r] is not None else top not in t
        row: dict[str, Any] = {
            "label": target_label(audit, r),
            "target": "+".join(names[c] for c in t),
            "index": p.row_index(r),
            "image": photo(p.images[r], None if p.alphas is None else p.alphas[r]),
            "target_prob": prob,
            "robust_prob": robust_col[r],
            "top_class": names[top],
            "top_prob": float(probs[r, top]),
            "off_target": off,
            "flags": [],
        }
        if off:
            row["flags"].append(f"the model's top class for it is {names[top]}, not the target")
        if prob < LOW_PROB:
            row["flags"].append(f"target probability only {fmt_prob(prob)}")
        if robust_col[r] is not None and float(robust_col[r]) < LOW_PROB:
            row["flags"].append(
                f"fragile: target probability {fmt_prob(robust_col[r])} under crops and flips"
            )
        if audit.entanglement is not None:
            scores = audit.entanglement[r].clone()
            scores[t] = -math.inf
            other = int(scores.argmax())
            row["entangled"] = [
                (names[c], float(audit.entanglement[r, c]))
                for c in scores.argsort(descending=True).tolist()[:5]
                if c not in t
            ]
            if float(scores[other]) >= HIGH_ENTANGLEMENT:
                row["flags"].append(
                    f"entangled with {names[other]} ({fmt_score(scores[other])}): "
                    "the model may confuse the two"
                )
        rows.append(row)
    return rows


def isolation_rows(audit: Any, tables: Mapping[str, Any], sources: list[str]) -> list[dict]:
    from leapcore.figures import isolation_figure

    iso = audit.isolation
    names = audit.class_list
    images = audit.prototypes.images if audit.prototypes is not None else audit.samples
    kept_col = _column(tables, "isolations", "kept_logit") or [None] * len(iso.pairs)
    kept_prob = _column(tables, "isolations", "kept_prob") or [None] * len(iso.pairs)
    prob_full = _column(tables, "isolations", "prob_full") or _pair_values(iso, "prob_full")
    prob_alone = _column(tables, "isolations", "prob_isolated") or _pair_values(
        iso, "prob_isolated"
    )
    deletion = _column(tables, "isolations", "deletion_auc") or [None] * len(iso.pairs)
    insertion = _column(tables, "isolations", "insertion_auc") or [None] * len(iso.pairs)
    rows = []
    for k, (i, c) in enumerate(iso.pairs):
        kept = float(kept_col[k]) if kept_col[k] is not None else float(iso.kept[k])
        full, alone = float(iso.logits_full[k]), float(iso.logits_isolated[k])
        source = sources[i] if i < len(sources) else f"image {i}"
        kept_pixels = (
            "the highlighted pixels (the mask's weight covers"
            if iso.saliency is None
            else "the pixels inside the outline (they cover"
        )
        sentence = (
            f"Shown only {kept_pixels} "
            f"{fmt_pct(iso.coverage[k])} of the image, the rest replaced by background), the model "
            f"keeps {fmt_pct(kept)} of its logit for {names[c]} ({fmt_score(full)} → "
            f"{fmt_score(alone)})."
        )
        lost = full > 0 and alone <= 0
        if full <= 0:
            sentence += f" The class's logit on the whole image is not positive: {names[c]} is not "
            sentence += "what the model sees here, so the share says little."
        elif lost:
            sentence += " The isolated pixels lost the logit: they are not the evidence."
        elif kept < LOW_KEPT:
            sentence += " The mask misses much of the evidence."
        elif kept > 1.05:
            sentence += " The rest of the image was working against this class."
        rows.append(
            {
                "class_name": names[c],
                "source": source,
                "figure": isolation_figure(
                    images[i],
                    iso.masks[k],
                    saliency=None if iso.saliency is None else iso.saliency[k],
                ),
                "coverage": float(iso.coverage[k]),
                "kept": kept,
                "kept_prob": kept_prob[k],
                "prob_full": prob_full[k],
                "prob_isolated": prob_alone[k],
                "prob_note": _prob_note(prob_full[k], names[c]),
                "lost": lost,
                "deletion_auc": deletion[k],
                "insertion_auc": insertion[k],
                "sentence": sentence,
                "low": full > 0 and (kept < LOW_KEPT or lost),
            }
        )
    return rows


def _pair_values(iso: Any, name: str) -> list[float | None]:
    """An isolation's optional per-pair measure as floats (Nones when it was not measured)."""
    values = getattr(iso, name, None)
    return [None] * len(iso.pairs) if values is None else [float(v) for v in values]


def _prob_note(prob_full: float | None, name: str) -> str:
    """A warning when the class is unlikely on the whole image: any probability ratio is then large."""
    if prob_full is None or prob_full >= LOW_FULL_PROB:
        return ""
    return (
        f"{name} is unlikely on the whole image (p = {prob_full:.3g}), so the ratio of "
        "probabilities says little; read the logits."
    )


def sample_rows(audit: Any, sample_names: list[str]) -> list[dict[str, Any]]:
    from leapcore.figures import photo

    names = audit.class_list
    probs = audit.sample_logits.softmax(1)
    rows = []
    for i in range(len(audit.samples)):
        top = probs[i].topk(min(3, probs.shape[1]))
        rows.append(
            {
                "label": sample_names[i] if i < len(sample_names) else f"sample {i}",
                "image": photo(audit.samples[i]),
                "top": [(names[int(c)], float(v)) for v, c in zip(top.values, top.indices)],
            }
        )
    return rows


def look_first(
    prototypes: list[dict], isolations: list[dict], highlights: list[str] = ()
) -> list[str]:
    """The summary's "look at these first": the sections' highlights (a spurious feature, a drift
    since the previous version), flagged prototypes, then weak isolations."""
    items = list(highlights)
    items += [f"{row['label']}: {flag}." for row in prototypes for flag in row["flags"]]
    items += [
        f"Isolation of {row['class_name']} in {row['source']} "
        + ("lost the logit" if row.get("lost") else "keeps only")
        + f" ({fmt_pct(row['kept'])} of it kept)."
        for row in isolations
        if row["low"]
    ]
    return items[:8]


# ---------------------------------------------------------------------------------------------- #
# Numbers, one format per kind
# ---------------------------------------------------------------------------------------------- #
def fmt_prob(value: Any) -> str:
    """Probabilities and ratios in [0, 1]: three decimals (``0.873``)."""
    return "n/a" if not _finite(value) else f"{float(value):.3f}"


def fmt_score(value: Any) -> str:
    """Entanglement scores and logits: two decimals (``0.42``, ``-1.05``)."""
    return "n/a" if not _finite(value) else f"{float(value):.2f}".replace("-0.00", "0.00")


def fmt_pct(value: Any) -> str:
    """Shares: whole percent (``62 %``)."""
    return "n/a" if not _finite(value) else f"{100 * float(value):.0f} %"


def fmt_num(value: Any) -> str:
    """Any other number: three significant digits, powers of ten written out (``8.08×10⁻⁵``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}".replace(",", " ")
    if not math.isfinite(float(value)):
        return str(value)
    text = f"{float(value):.3g}"
    if "e" in text:
        mantissa, exponent = text.split("e")
        sup = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")
        text = f"{mantissa}×10{str(int(exponent)).translate(sup)}"
    return text


def fmt_seconds(value: Any) -> str:
    """Durations: ``0.42 s``, ``12.3 s``, ``2 min 05 s``."""
    if not _finite(value):
        return "n/a"
    s = float(value)
    if s < 10:
        return f"{s:.2f} s"
    if s < 120:
        return f"{s:.1f} s"
    return f"{int(s // 60)} min {int(s % 60):02d} s"


def fmt_value(value: Any) -> str:
    """A config value: numbers as :func:`fmt_num`, lists item by item, None as ``-``."""
    if value is None:
        return "-"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(fmt_value(v) for v in value) + "]"
    return fmt_num(value) if isinstance(value, (int, float)) else str(value)


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
