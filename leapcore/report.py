"""One self-contained HTML report per audit, its figures and the audit's headline metrics.

Everything here is pure: an :class:`~leapcore.engine.Audit` (and a few labels) in, a string, bytes
or a dict of numbers out. The page is the Jinja2 template ``leapcore/templates/report.html``
(autoescaped); figures are drawn by :mod:`leapcore.figures` and embedded as data URIs, styles are
inline, so the report opens in any browser straight from disk, with no server and no network.

Other modules add sections without touching the template: :func:`report_section` registers
``function(audit, context) -> html fragment | None`` in :data:`report_sections`; a section with a
negative ``order`` is a verdict the reader needs first and renders right under the summary, the
others after the built-in sections. :func:`report_highlights` registers
``function(audit, context) -> [sentence, ...]`` whose sentences head the summary's "look at these
first" list.
"""

from __future__ import annotations

import importlib
import io
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch
from PIL import Image

from leapcore import __version__
from leapcore.config import (
    BASELINE,
    ENTANGLEMENT,
    ISOLATION,
    LR,
    PROTOTYPES,
    sanitise,
)
from leapcore.images import to_uint8
from leapcore.isolation import ISOLATION_TITLES
from leapcore.naming import slug, target_key
from leapcore.quality import quality_metrics
from leapcore.report_view import (
    config_view,
    fmt_num,
    fmt_pct,
    fmt_prob,
    fmt_score,
    fmt_seconds,
    fmt_value,
    isolation_rows,
    look_first,
    prototype_rows,
    sample_rows,
    stages_that_ran,
    target_label,
)

HEATMAP_COLUMNS = 30  # as many classes as the W&B entanglement table shows
PROVENANCE_MARK = "<!--leapcore:provenance-->"


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
SECTION_MODULES: tuple[str, ...] = (
    "leapcore.sections",
    "leapcore.spurious_report",
    "leapcore.transfer",
    "leapcore.diff_report",
    "leapcore.highlights",
)

#: name -> section; filled by :func:`report_section`. Sections render in ``order``, then by name:
#: a negative ``order`` right under the summary, the others after the built-in sections.
report_sections: dict[str, ReportSection] = {}

HighlightFunction = Callable[[Any, ReportContext], list[str]]

#: name -> function giving the sentences that head the summary's "look at these first" (a spurious
#: feature, a pair that drifted since the previous version); filled by :func:`report_highlights`.
report_highlight_functions: dict[str, HighlightFunction] = {}


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


def report_highlights(name: str) -> Callable[[HighlightFunction], HighlightFunction]:
    """Decorator: register ``function(audit, context) -> [sentence, ...]``; its sentences head the
    summary's "look at these first" list, in the order of registration (an empty list adds none).

    Example::

        @report_highlights("spurious")
        def spurious_highlights(audit, context):
            return ["Spurious-feature scan: cat is likely spurious (a 5 px blob flips 80 %)."]
    """

    def wrap(function: HighlightFunction) -> HighlightFunction:
        report_highlight_functions[name] = function
        return function

    return wrap


def render_highlights(audit: Any, context: ReportContext) -> list[str]:
    """Every registered highlight sentence (sections' modules imported first)."""
    _import_section_modules()
    return [item for f in report_highlight_functions.values() for item in f(audit, context)]


def _import_section_modules() -> None:
    for module in SECTION_MODULES:
        importlib.import_module(module)


def render_sections(audit: Any, context: ReportContext) -> list[tuple[ReportSection, str]]:
    """Each registered section's fragment, in order; sections that return None are left out."""
    _import_section_modules()
    out = []
    for section in sorted(report_sections.values(), key=lambda s: (s.order, s.name)):
        fragment = section(audit, context)
        if fragment:
            out.append((section, fragment))
    return out


# ---------------------------------------------------------------------------------------------- #
# Labels and images
# ---------------------------------------------------------------------------------------------- #
def png_bytes(
    image: torch.Tensor | np.ndarray, alpha: torch.Tensor | np.ndarray | None = None
) -> bytes:
    """``[C, H, W]`` in [0, 1] (optionally with ``[1, H, W]`` alpha) as PNG bytes."""
    out = io.BytesIO()
    Image.fromarray(to_uint8(image, alpha)).save(out, format="PNG")
    return out.getvalue()


def heatmap_columns(audit: Any, top: int = HEATMAP_COLUMNS) -> list[int]:
    """The classes a heatmap shows: every target, then the most entangled others (at most ``top``)."""
    scores = audit.entanglement
    targets = sorted({c for t in audit.prototypes.targets for c in t})
    strength = scores.clone()
    strength[:, targets] = -math.inf
    order = strength.max(dim=0).values.argsort(descending=True).tolist()
    others = [c for c in order if c not in targets][: max(0, top - len(targets))]
    return targets + others


def probe_rows(audit: Any) -> dict[str, list[str]] | None:
    """The prototypes whose scores the entanglement probe entered (``used``) and those whose probe
    fell short (``short``), by their heatmap labels; None when no probe ran."""
    flags = getattr(audit, "entanglement_probed", None)
    if flags is None or audit.prototypes is None:
        return None
    rows: dict[str, list[str]] = {"used": [], "short": []}
    for r, used in enumerate(flags.tolist()):
        rows["used" if used else "short"].append(target_label(audit, r))
    return rows


def entanglement_heatmap(audit: Any, top: int = HEATMAP_COLUMNS, fmt: str = "png") -> bytes:
    """The entanglement heatmap of :func:`leapcore.figures.entanglement_figure` as PNG (or SVG) bytes."""
    if audit.entanglement is None or audit.prototypes is None:
        raise ValueError("the audit has no entanglement scores to draw.")
    from leapcore.figures import entanglement_figure

    columns = heatmap_columns(audit, top)
    rows = [target_label(audit, r) for r in range(len(audit.prototypes.images))]
    scores = audit.entanglement[:, columns].numpy()
    names = [audit.class_list[c] for c in columns]
    measure = getattr(audit.config, "entanglement_measure", "leap")
    label = {
        "share": "entanglement (share of the non-target probability)",
        "relaxed": "entanglement (share of the non-target probability, relaxed)",
    }.get(measure, "entanglement (1 = rose as much as the target)")
    if measure == "relaxed" and getattr(audit.config, "entanglement_probe_steps", 0):
        label = "entanglement (share of the non-target probability, relaxed; probed where reached)"
    return entanglement_figure(scores, rows, names, fmt=fmt, label=label)


# ---------------------------------------------------------------------------------------------- #
# Metrics
# ---------------------------------------------------------------------------------------------- #
def metric_name(*parts: str) -> str:
    """A metric key MLflow and W&B both accept: ``/``-separated slugs, no spaces."""
    return "/".join(p if re.fullmatch(r"[A-Za-z0-9_\-.]+", p) else slug(p) for p in map(str, parts))


def audit_metrics(audit: Any) -> dict[str, float]:
    """Headline numbers: per-target probability, entanglement summary, isolation summary, lr.

    Keys: ``target_prob/<classes>_<slug>`` (e.g. ``target_prob/1_goldfish``), ``target_prob/mean``,
    ``entanglement_max_other/<classes>_<slug>``, ``entanglement_max_other/max`` and ``/mean``,
    ``isolation/mean_coverage``, ``isolation/mean_kept``, ``isolation/pairs``, ``samples/count``,
    ``samples/mean_top_prob``, ``lr``.
    """
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
            per_target.setdefault(target_key(t, names), []).append(float(probs[r, t].mean()))
        for key, values in per_target.items():
            metrics[f"target_prob/{key}"] = float(np.mean(values))
        metrics["target_prob/mean"] = float(np.mean([v for vs in per_target.values() for v in vs]))
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
                key = f"entanglement_max_other/{target_key(t, names)}"
                metrics[key] = max(top, metrics.get(key, -math.inf))
        if worst:
            metrics["entanglement_max_other/max"] = float(np.max(worst))
            metrics["entanglement_max_other/mean"] = float(np.mean(worst))
    if audit.isolation is not None:
        iso = audit.isolation
        metrics["isolation/mean_coverage"] = float(iso.coverage.mean())
        metrics["isolation/mean_kept"] = float(iso.kept.mean())
        metrics["isolation/pairs"] = float(len(iso.pairs))
    if audit.sample_logits is not None:
        metrics["samples/count"] = float(len(audit.sample_logits))
        metrics["samples/mean_top_prob"] = float(
            audit.probabilities(audit.sample_logits).max(1).values.mean()
        )
    # Issue 19 (h19): off-target flags, robust / transfer probabilities, isolation faithfulness.
    metrics.update(quality_metrics(audit))
    return metrics


def trajectory_metrics(audit: Any) -> dict[str, list[tuple[int, float]]]:
    """Each prototype's target probability per logged step, under
    ``target_prob_trajectory/<classes>_<slug>/<prototype index>``: MLflow and W&B step metrics."""
    p = audit.prototypes
    if p is None:
        return {}
    out: dict[str, list[tuple[int, float]]] = {}
    for r in range(len(p.images)):
        t = p.targets[p.row_target(r)]
        values = p.trajectory[:, r, :][:, t].mean(dim=1).tolist()
        key = f"target_prob_trajectory/{target_key(t, audit.class_list)}/{p.row_index(r)}"
        out[key] = [(int(s), float(v)) for s, v in zip(p.trajectory_steps, values)]
    return out


# ---------------------------------------------------------------------------------------------- #
# The page
# ---------------------------------------------------------------------------------------------- #
_ENVIRONMENT: Any = None
_TIMING_LABELS = {
    BASELINE: "baseline",
    LR: "learning-rate range test",
    PROTOTYPES: "prototype optimisation",
    ENTANGLEMENT: "entanglement",
    ISOLATION: "feature isolation",
    "scan_spurious": "spurious-feature scan",
    "transfer": "transfer to reference models",
    "attribute_prototypes": "attributions of the prototypes",
    "diff_audits": "diff with the previous version",
}


def _templates() -> Any:
    """The Jinja2 environment of ``leapcore/templates`` (autoescaped), built once."""
    global _ENVIRONMENT
    if _ENVIRONMENT is None:
        import jinja2

        env = jinja2.Environment(
            loader=jinja2.PackageLoader("leapcore", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        env.filters.update(
            prob=fmt_prob,
            score=fmt_score,
            pct=fmt_pct,
            num=fmt_num,
            seconds=fmt_seconds,
            value=fmt_value,
            svg_uri=lambda data: data_uri(data, "image/svg+xml"),
            webp_uri=lambda data: data_uri(data, "image/webp"),
            slug=slug,
        )
        _ENVIRONMENT = env
    return _ENVIRONMENT


def data_uri(data: bytes, mime: str) -> str:
    from leapcore.figures import data_uri as encode

    return encode(data, mime)


def provenance_facts(
    provenance: Mapping[str, Any] | None, model: Mapping[str, Any]
) -> list[tuple[str, str]]:
    """The provenance block's rows: time, leapcore version, model, runs (only those given)."""
    given = dict(provenance or {})
    when = given.pop("time", None) or datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    rows = [("generated", str(when)), ("leapcore", __version__)]
    for key, value in model.items():
        if value not in (None, "") and key not in given:
            rows.append(("model digest" if key == "digest" else str(key), str(value)))
    labels = {
        "mlflow_run": "MLflow run",
        "mlflow_experiment": "MLflow experiment",
        "wandb_run": "W&B run",
        "prefect_flow_run": "Prefect flow run",
    }
    for key, label in labels.items():
        if given.get(key):
            rows.append((label, str(given.pop(key))))
    rows += [(str(k).replace("_", " "), str(v)) for k, v in given.items() if v not in (None, "")]
    return [(k, v) for k, v in sanitise(dict(rows)).items()]


def render_provenance(provenance: Mapping[str, Any] | None, model: Mapping[str, Any]) -> str:
    """The provenance block alone (HTML)."""
    return (
        _templates()
        .get_template("provenance.html")
        .render(facts=provenance_facts(provenance, model))
    )


def stamp_provenance(page: str, provenance: Mapping[str, Any], model: Mapping[str, Any]) -> str:
    """Fill the provenance block of a page rendered with ``provenance=None`` (a cached page gets this
    run's time and run ids)."""
    if PROVENANCE_MARK not in page:
        raise ValueError("the page has no provenance placeholder (it was rendered with one).")
    return page.replace(PROVENANCE_MARK, render_provenance(provenance, model), 1)


def render_report(
    audit: Any,
    *,
    title: str,
    model: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    stages: list[Mapping[str, Any]] | None = None,
    sample_names: list[str] | None = None,
    heatmap_top: int = HEATMAP_COLUMNS,
    tables: Mapping[str, Any] | None = None,
    provenance: Mapping[str, Any] | None = None,
    stamp_later: bool = False,
    stage_seconds: Mapping[str, float] | None = None,
) -> str:
    """The audit as one self-contained HTML page.

    Args:
        audit: an :class:`~leapcore.engine.Audit` (prototype or sample mode).
        title: the page title.
        model: facts about the model (``model`` URI, ``digest``, registry version, ...).
        config: the options used (default: the audit's); secret-looking ones are dropped again.
        stages: rows for the stages table (``stage``, ``outcome``, ``seconds``), labelled by the
            caller; default: the audit's compute times, then ``stage_seconds``.
        sample_names: names of the user's images (sample mode).
        heatmap_top: most classes in the entanglement heatmap.
        tables: the audit's Arrow tables; optional columns (``off_target``, ``target_prob_robust``,
            ``kept_logit``, ...) are shown when present, and sections of :data:`report_sections`
            read them.
        provenance: ``time``, ``mlflow_run``, ``wandb_run``, ``prefect_flow_run``, ... (shown with
            the leapcore version and the model's URI and digest).
        stamp_later: leave a placeholder for :func:`stamp_provenance` instead of the block.
        stage_seconds: compute seconds of the stages the engine does not time (a pipeline's
            analysis stages: ``scan_spurious``, ``diff_audits``, ...) by stage name.
    """
    model = sanitise(dict(model or {}))
    clean_config = sanitise(dict(config if config is not None else audit.config.secret_free()))
    tables = dict(tables or {})
    names = list(sample_names or [])
    context = ReportContext(
        title=title,
        class_list=list(audit.class_list),
        tables=tables,
        model=model,
        config=clean_config,
        sample_names=names,
    )
    prototypes = prototype_rows(audit, tables) if audit.prototypes is not None else []
    if audit.prototypes is not None:
        sources = [row["label"] for row in prototypes]
    else:
        count = 0 if audit.samples is None else len(audit.samples)
        sources = names + [f"sample {i}" for i in range(len(names), count)]
    isolations = isolation_rows(audit, tables, sources) if audit.isolation is not None else []
    samples = (
        sample_rows(audit, names)
        if audit.samples is not None and audit.sample_logits is not None
        else []
    )
    heatmap = trajectory = None
    heatmap_columns_shown = 0
    if audit.prototypes is not None and audit.entanglement is not None:
        heatmap = entanglement_heatmap(audit, heatmap_top, fmt="svg")
        heatmap_columns_shown = len(heatmap_columns(audit, heatmap_top))
    p = audit.prototypes
    if p is not None and len(p.trajectory_steps) > 1:
        from leapcore.figures import trajectory_figure

        curves = {
            target_label(audit, r): p.trajectory[:, r, :][:, p.targets[p.row_target(r)]]
            .mean(dim=1)
            .tolist()
            for r in range(len(p.images))
        }
        trajectory = trajectory_figure(list(p.trajectory_steps), curves)
    if stages is None:
        stages = [
            {"stage": _TIMING_LABELS.get(k, k), "outcome": "", "seconds": v}
            for k, v in audit.timings.items()
            if k in _TIMING_LABELS
        ]
        stages += [
            {"stage": _TIMING_LABELS.get(k, k.replace("_", " ")), "outcome": "", "seconds": v}
            for k, v in (stage_seconds or {}).items()
        ]

    from leapcore.figures import ANNOTATE_FROM, colour_bar_css

    metrics = audit_metrics(audit)
    extra = [
        {"name": s.name, "title": s.title, "html": fragment, "top": s.order < 0}
        for s, fragment in render_sections(audit, context)
    ]
    return (
        _templates()
        .get_template("report.html")
        .render(
            title=title,
            model=model,
            provenance=None if stamp_later else render_provenance(provenance, model),
            provenance_mark=PROVENANCE_MARK,
            metrics=metrics,
            prototypes=prototypes,
            look_first=look_first(prototypes, isolations, render_highlights(audit, context)),
            heatmap=heatmap,
            heatmap_columns=heatmap_columns_shown,
            entanglement_measure=getattr(audit.config, "entanglement_measure", "leap"),
            relax_steps=getattr(audit.config, "entanglement_relax_steps", 0),
            relax_step=getattr(audit.config, "entanglement_relax_step", 0),
            probe_steps=getattr(audit.config, "entanglement_probe_steps", 0),
            probe_step=getattr(audit.config, "entanglement_probe_step", 0),
            probe_rows=probe_rows(audit),
            num_classes=len(audit.class_list),
            trajectory=trajectory,
            lr=None if p is None else p.lr,
            steps=None if p is None else p.steps,
            isolations=isolations,
            isolation_graded=audit.isolation is not None
            and getattr(audit.isolation, "saliency", None) is not None,
            isolation_method=None
            if audit.isolation is None
            else ISOLATION_TITLES.get(audit.isolation.method, audit.isolation.method),
            samples=samples,
            stages=stages,
            config=config_view(clean_config, stages_that_ran(audit)),
            sections=extra,
            version=__version__,
            colour_bar=colour_bar_css(),
            annotate_from=ANNOTATE_FROM,
        )
    )
