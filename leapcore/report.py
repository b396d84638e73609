"""One self-contained HTML report per audit, an entanglement heatmap, and the audit's headline metrics.

Everything here is pure: an :class:`~leapcore.engine.Audit` (and a few labels) in, a string, PNG bytes
or a dict of numbers out. Images are embedded as base64 PNGs and the styles are inline, so the report
opens in any browser straight from disk, with no server and no network.
"""

from __future__ import annotations

import base64
import html
import importlib
import io
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from leapcore.config import sanitise
from leapcore.images import to_uint8

_METRIC_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. /]")
# Pipeline stage names -> the engine's timing keys.
_TIMING_KEYS = {
    "generate_baseline": "baseline",
    "find_learning_rate": "lr_finding",
    "optimise_prototypes": "prototypes",
    "score_entanglement": "entanglement",
    "isolate_features": "isolation",
    "isolate_samples": "isolation",
}


# ---------------------------------------------------------------------------------------------- #
# Sections added from outside the template
# ---------------------------------------------------------------------------------------------- #
@dataclass(frozen=True)
class ReportContext:
    """What a report section may read besides the audit.

    Attributes:
        title: the report's title.
        class_list: the model's class names.
        tables: the audit's Arrow tables by name (``prototypes``, ``isolations``, ...) when the
            caller has them; columns differ between versions, so read them only when present.
        model: facts about the model (URI, digest, ...).
        config: the options used (secret-free).
        sample_names: names of the user's images (sample mode).
        extra: anything else a caller passes on.
    """

    title: str = ""
    class_list: list[str] = field(default_factory=list)
    tables: Mapping[str, Any] = field(default_factory=dict)
    model: Mapping[str, Any] = field(default_factory=dict)
    config: Mapping[str, Any] = field(default_factory=dict)
    sample_names: list[str] = field(default_factory=list)
    extra: Mapping[str, Any] = field(default_factory=dict)


SectionFunction = Callable[[Any, ReportContext], "str | None"]


@dataclass(frozen=True)
class ReportSection:
    """A registered section: ``render(audit, context)`` returns an HTML fragment or None (no section).

    The fragment is inserted as it is, so the function escapes every text it puts in
    (:func:`html.escape` or ``markupsafe.escape``). The report adds the heading ``title``.
    """

    name: str
    render: SectionFunction
    title: str
    order: int = 100

    def __call__(self, audit: Any, context: ReportContext) -> str | None:
        return self.render(audit, context)


#: Modules whose import registers sections (``leapcore.x`` registering ``@report_section`` at import);
#: :func:`render_sections` imports them, so a section needs no edit of the template or of callers.
SECTION_MODULES: tuple[str, ...] = ()

#: name -> section; filled by :func:`report_section`. Sections render in ``order``, then by name,
#: after the built-in ones.
report_sections: dict[str, ReportSection] = {}


def report_section(
    name: str, *, title: str | None = None, order: int = 100
) -> Callable[[SectionFunction], SectionFunction]:
    """Decorator: register ``function(audit, context) -> html fragment | None`` as a report section.

    Example::

        @report_section("quality", title="Prototype quality", order=10)
        def quality(audit, context):
            if "prototypes" not in context.tables:
                return None
            return "<p>...</p>"
    """
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"a report section name is letters, digits, '-' and '_', not {name!r}.")

    def wrap(function: SectionFunction) -> SectionFunction:
        report_sections[name] = ReportSection(
            name, function, title or name.replace("_", " ").capitalize(), order
        )
        return function

    return wrap


def render_sections(audit: Any, context: ReportContext) -> list[tuple[ReportSection, str]]:
    """Each registered section's fragment, in order; sections that return None are left out."""
    for module in SECTION_MODULES:
        importlib.import_module(module)
    out = []
    for section in sorted(report_sections.values(), key=lambda s: (s.order, s.name)):
        fragment = section(audit, context)
        if fragment:
            out.append((section, fragment))
    return out


# ---------------------------------------------------------------------------------------------- #
# Images
# ---------------------------------------------------------------------------------------------- #
def png_bytes(
    image: torch.Tensor | np.ndarray, alpha: torch.Tensor | np.ndarray | None = None
) -> bytes:
    """``[C, H, W]`` in [0, 1] (optionally with ``[1, H, W]`` alpha) as PNG bytes."""
    out = io.BytesIO()
    Image.fromarray(to_uint8(image, alpha)).save(out, format="PNG")
    return out.getvalue()


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def _colour(value: float) -> tuple[int, int, int]:
    """Blue (-1) through white (0) to red (+1)."""
    v = max(-1.0, min(1.0, value)) if math.isfinite(value) else 0.0
    if v >= 0:
        return (255, int(255 * (1 - v)), int(255 * (1 - v)))
    return (int(255 * (1 + v)), int(255 * (1 + v)), 255)


def heatmap_columns(audit: Any, top: int = 20) -> list[int]:
    """The classes a heatmap shows: every target, then the most entangled others (at most ``top``)."""
    scores = audit.entanglement
    targets = sorted({c for t in audit.prototypes.targets for c in t})
    strength = scores.clone()
    strength[:, targets] = -math.inf
    order = strength.max(dim=0).values.argsort(descending=True).tolist()
    others = [c for c in order if c not in targets][: max(0, top - len(targets))]
    return targets + others


def entanglement_heatmap(audit: Any, top: int = 20) -> bytes:
    """A PNG heatmap: a row per prototype, a column per class shown, cells coloured by entanglement."""
    if audit.entanglement is None or audit.prototypes is None:
        raise ValueError("the audit has no entanglement scores to draw.")
    names = audit.class_list
    p = audit.prototypes
    columns = heatmap_columns(audit, top)
    rows = [
        f"{'+'.join(names[c] for c in p.targets[p.row_target(r)])} #{p.row_index(r)}"
        for r in range(len(p.images))
    ]
    cell, font, small = 34, _font(12), _font(10)
    left = 12 + max(int(font.getlength(r)) for r in rows)
    label_h = 12 + max(int(font.getlength(names[c][:28])) for c in columns)
    width, height = left + cell * len(columns) + 10, label_h + cell * len(rows) + 10
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    for j, c in enumerate(columns):
        text = names[c][:28]
        tw = int(font.getlength(text)) + 4
        label = Image.new("RGB", (tw, 16), "white")
        ImageDraw.Draw(label).text((2, 1), text, fill="black", font=font)
        label = label.rotate(90, expand=True)
        image.paste(label, (left + j * cell + (cell - 16) // 2, label_h - tw - 4))
    for i, row in enumerate(rows):
        y = label_h + i * cell
        draw.text((4, y + cell // 2 - 7), row, fill="black", font=font)
        for j, c in enumerate(columns):
            value = float(audit.entanglement[i, c])
            x = left + j * cell
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=_colour(value), outline="#ddd")
            draw.text((x + 3, y + cell // 2 - 6), f"{value:.2f}", fill="black", font=small)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


# ---------------------------------------------------------------------------------------------- #
# Metrics
# ---------------------------------------------------------------------------------------------- #
def metric_name(*parts: str) -> str:
    """A metric key MLflow and W&B both accept (letters, digits, ``_-. /``)."""
    return ".".join(_METRIC_UNSAFE.sub("_", str(p)).strip() or "_" for p in parts)


def audit_metrics(audit: Any) -> dict[str, float]:
    """Headline numbers: per-target probability, entanglement summary, isolation summary, lr."""
    names = audit.class_list
    metrics: dict[str, float] = {}
    if audit.lr is not None:
        metrics["lr"] = float(audit.lr.lr)
    p = audit.prototypes
    if p is not None:
        probs = p.probs
        per_target: dict[str, list[float]] = {}
        for r in range(len(p.images)):
            t = p.targets[p.row_target(r)]
            per_target.setdefault("+".join(names[c] for c in t), []).append(
                float(probs[r, t].mean())
            )
        for name, values in per_target.items():
            metrics[metric_name("target_prob", name)] = float(np.mean(values))
        metrics["target_prob.mean"] = float(np.mean([v for vs in per_target.values() for v in vs]))
    if p is not None and audit.entanglement is not None:
        scores = audit.entanglement
        worst: list[float] = []
        for r in range(len(scores)):
            t = p.targets[p.row_target(r)]
            others = torch.ones(scores.shape[1], dtype=torch.bool)
            others[t] = False
            if bool(others.any()):
                top = float(scores[r, others].max())
                worst.append(top)
                name = "+".join(names[c] for c in t)
                key = metric_name("entanglement", name, "max_other")
                metrics[key] = max(top, metrics.get(key, -math.inf))
        if worst:
            metrics["entanglement.max_other"] = float(np.max(worst))
            metrics["entanglement.mean_max_other"] = float(np.mean(worst))
    if audit.isolation is not None:
        iso = audit.isolation
        metrics["isolation.mean_coverage"] = float(iso.coverage.mean())
        metrics["isolation.mean_kept"] = float(iso.kept.mean())
        metrics["isolation.pairs"] = float(len(iso.pairs))
    if audit.sample_logits is not None:
        metrics["samples.count"] = float(len(audit.sample_logits))
        metrics["samples.mean_top_prob"] = float(
            audit.sample_logits.softmax(1).max(1).values.mean()
        )
    return metrics


# ---------------------------------------------------------------------------------------------- #
# HTML
# ---------------------------------------------------------------------------------------------- #
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1b1f24;background:#fafbfc}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
.meta{color:#57606a;font-size:13px} .grid{display:flex;flex-wrap:wrap;gap:12px}
.card{background:#fff;border:1px solid #d0d7de;border-radius:6px;padding:8px;width:196px;font-size:12px}
.card img{width:180px;height:180px;image-rendering:pixelated;display:block;margin:auto;background:#eee}
.pair img{width:88px;height:88px} .pair{display:flex;gap:4px;justify-content:center}
.big{font-size:15px;font-weight:600} table{border-collapse:collapse;font-size:12px;background:#fff}
td,th{border:1px solid #d0d7de;padding:3px 6px;text-align:left;vertical-align:top}
.heat{max-width:100%;border:1px solid #d0d7de;background:#fff} .bad{color:#cf222e} .ok{color:#1a7f37}
svg{display:block;margin:4px auto 0}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _img(png: bytes, alt: str) -> str:
    return f'<img src="{_data_uri(png)}" alt="{_e(alt)}">'


def _sparkline(steps: list[int], values: list[float], width: int = 180, height: int = 36) -> str:
    if len(values) < 2:
        return ""
    top = max(steps) or 1
    points = " ".join(
        f"{width * s / top:.1f},{height - 2 - (height - 4) * max(0.0, min(1.0, v)):.1f}"
        for s, v in zip(steps, values)
    )
    return (
        f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}">'
        f'<rect width="{width}" height="{height}" fill="#f6f8fa"/>'
        f'<polyline fill="none" stroke="#0969da" stroke-width="1.5" points="{points}"/></svg>'
    )


def _table(rows: list[Mapping[str, Any]]) -> str:
    if not rows:
        return "<p class='meta'>nothing to show</p>"
    head = "".join(f"<th>{_e(k)}</th>" for k in rows[0])
    body = "".join(
        "<tr>" + "".join(f"<td>{_e(_fmt(v))}</td>" for v in row.values()) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _prototype_section(audit: Any) -> str:
    p = audit.prototypes
    names = audit.class_list
    probs = p.probs
    cards = []
    for r in range(len(p.images)):
        t = p.targets[p.row_target(r)]
        target = "+".join(names[c] for c in t)
        alpha = None if p.alphas is None else p.alphas[r]
        prob = float(probs[r, t].mean())
        top = int(probs[r].argmax())
        trajectory = p.trajectory[:, r, :][:, t].mean(dim=1).tolist()
        cls = "ok" if top in t else "bad"
        cards.append(
            f"<div class='card'>{_img(png_bytes(p.images[r], alpha), target)}"
            f"<div class='big'>{_e(target)} <span class='meta'>#{p.row_index(r)}</span></div>"
            f"<div>target probability <b>{prob:.3f}</b></div>"
            f"<div class='{cls}'>top class: {_e(names[top])} ({float(probs[r, top]):.3f})</div>"
            f"{_sparkline(list(p.trajectory_steps), trajectory)}</div>"
        )
    lr = f" Learning rate {p.lr:.4g}, {p.steps} steps." if p is not None else ""
    return (
        "<h2>Prototypes</h2>"
        f"<p class='meta'>What the model considers the clearest example of each target.{_e(lr)} "
        "The line shows the target probability over the optimisation.</p>"
        f"<div class='grid'>{''.join(cards)}</div>"
    )


def _entanglement_section(audit: Any, top: int) -> str:
    p = audit.prototypes
    names = audit.class_list
    scores = audit.entanglement
    rows = []
    for r in range(len(scores)):
        t = p.targets[p.row_target(r)]
        order = [c for c in scores[r].argsort(descending=True).tolist() if c not in t][:5]
        rows.append(
            {
                "target": "+".join(names[c] for c in t) + f" #{p.row_index(r)}",
                "most entangled classes": ", ".join(
                    f"{names[c]} ({float(scores[r, c]):.2f})" for c in order
                ),
            }
        )
    return (
        "<h2>Entanglement</h2>"
        "<p class='meta'>How far each class's logit rose with the target's, from the baseline to "
        "the prototype (1: as much as the target). Entangled classes are the ones the model is "
        "likely to confuse with the target.</p>"
        f"<img class='heat' src='{_data_uri(entanglement_heatmap(audit, top))}' alt='entanglement heatmap'>"
        f"{_table(rows)}"
    )


def _isolation_section(audit: Any, sources: list[str]) -> str:
    iso = audit.isolation
    names = audit.class_list
    cards = []
    for k, (i, c) in enumerate(iso.pairs):
        cards.append(
            "<div class='card'><div class='pair'>"
            f"{_img(png_bytes(iso.isolated[k]), 'isolated')}{_img(png_bytes(iso.masks[k]), 'mask')}</div>"
            f"<div class='big'>{_e(names[c])}</div>"
            f"<div class='meta'>in {_e(sources[i] if i < len(sources) else i)}</div>"
            f"<div>mask covers {float(iso.coverage[k]):.0%}</div>"
            f"<div>logit {float(iso.logits_full[k]):.2f} &rarr; {float(iso.logits_isolated[k]):.2f} isolated</div></div>"
        )
    method = "hierarchical perturbation" if iso.method == "hipe" else "mask optimisation"
    return (
        "<h2>Feature isolation</h2>"
        f"<p class='meta'>Which pixels carry the evidence for each class ({method}): the isolated "
        "image (evidence kept, the rest noise) and its mask.</p>"
        f"<div class='grid'>{''.join(cards)}</div>"
    )


def _samples_section(audit: Any, sample_names: list[str]) -> str:
    names = audit.class_list
    probs = audit.sample_logits.softmax(1)
    cards = []
    for i in range(len(audit.samples)):
        top = probs[i].topk(min(3, probs.shape[1]))
        lines = "".join(
            f"<div>{_e(names[int(c)])}: {float(v):.3f}</div>"
            for v, c in zip(top.values, top.indices)
        )
        label = sample_names[i] if i < len(sample_names) else f"sample {i}"
        cards.append(
            f"<div class='card'>{_img(png_bytes(audit.samples[i]), label)}"
            f"<div class='big'>{_e(label)}</div>{lines}</div>"
        )
    return f"<h2>Images</h2><div class='grid'>{''.join(cards)}</div>"


def render_report(
    audit: Any,
    *,
    title: str,
    model: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    stages: Mapping[str, str] | None = None,
    sample_names: list[str] | None = None,
    heatmap_top: int = 20,
    tables: Mapping[str, Any] | None = None,
) -> str:
    """The audit as one self-contained HTML page.

    Args:
        audit: an :class:`~leapcore.engine.Audit` (prototype or sample mode).
        title: the page title.
        model: facts about the model to show (URI, digest, registry version, ...).
        config: the options used; secret-looking ones are dropped again here.
        stages: each stage's outcome (``Completed``, ``Cached``, ``Skipped``).
        sample_names: names of the user's images (sample mode).
        heatmap_top: most classes in the entanglement heatmap.
        tables: the audit's Arrow tables, for the sections of :data:`report_sections`.
    """
    parts = [f"<h1>{_e(title)}</h1>"]
    facts = {k: v for k, v in sanitise(dict(model or {})).items() if v not in (None, "", {})}
    if facts:
        parts.append(
            "<div class='meta'>"
            + " &middot; ".join(f"{_e(k)}: <b>{_e(v)}</b>" for k, v in facts.items())
            + "</div>"
        )
    metrics = audit_metrics(audit)
    if "target_prob.mean" in metrics:
        parts.append(
            f"<p>Mean target probability <b>{metrics['target_prob.mean']:.3f}</b>"
            + (
                f"; strongest entanglement with another class <b>{metrics['entanglement.max_other']:.2f}</b>"
                if "entanglement.max_other" in metrics
                else ""
            )
            + ".</p>"
        )
    sources: list[str]
    if audit.prototypes is not None:
        parts.append(_prototype_section(audit))
        p = audit.prototypes
        sources = [
            f"{'+'.join(audit.class_list[c] for c in p.targets[p.row_target(r)])} #{p.row_index(r)}"
            for r in range(len(p.images))
        ]
        if audit.entanglement is not None:
            parts.append(_entanglement_section(audit, heatmap_top))
    else:
        sources = list(sample_names or [])
        if audit.samples is not None and audit.sample_logits is not None:
            parts.append(_samples_section(audit, sources))
    if audit.isolation is not None:
        parts.append(_isolation_section(audit, sources))
    context = ReportContext(
        title=title,
        class_list=list(audit.class_list),
        tables=dict(tables or {}),
        model=dict(model or {}),
        config=sanitise(dict(config or {})),
        sample_names=list(sample_names or []),
    )
    for section, fragment in render_sections(audit, context):
        parts.append(
            f"<section id='{_e(section.name)}'><h2>{_e(section.title)}</h2>{fragment}</section>"
        )
    if stages:
        rows = [
            {
                "stage": s,
                "outcome": state,
                "compute seconds": audit.timings.get(_TIMING_KEYS.get(s, s), ""),
            }
            for s, state in stages.items()
        ]
        parts.append("<h2>Stages</h2>" + _table(rows))
    elif audit.timings:
        rows = [{"stage": s, "compute seconds": t} for s, t in audit.timings.items()]
        parts.append("<h2>Compute time</h2>" + _table(rows))
    if config:
        clean = sanitise(dict(config))
        parts.append(
            "<h2>Configuration</h2>" + _table([{"option": k, "value": v} for k, v in clean.items()])
        )
    body = "\n".join(parts)
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>{body}"
        "<p class='meta'>Generated by leapcore.</p></body></html>"
    )
