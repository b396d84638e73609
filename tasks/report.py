"""The ``render_report`` task: everything a user downloads, built from the stage artifacts.

It rebuilds the engine's :class:`~leapcore.engine.Audit` from the artifacts and writes, as artifacts:
the HTML report (``leapcore.report``), zstd Parquet tables (the engine's Arrow tables plus leap-ie's
results DataFrame), the PNG images (``leapcore.results.write_images``) and the entanglement heatmap.
The publishers and ``export_results`` take these files as they are.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pyarrow as pa

from leapcore.config import EngineConfig
from leapcore.preprocess import from_spec
from leapcore.report import audit_metrics, entanglement_heatmap, stamp_provenance
from leapcore.report import render_report as render_html
from leapcore.results import (
    audit_frame,
    baseline_to_arrow,
    entanglement_to_arrow,
    isolations_to_arrow,
    learning_rate_to_arrow,
    prototypes_to_arrow,
    sample_transform_spec,
    samples_to_arrow,
    trajectories_to_arrow,
    write_images,
)
from tasks.artifacts import ArtifactRef, ArtifactStore
from tasks.audit_io import load_audit
from tasks.caching import REPORT
from tasks.model import ModelRef, sample_transform
from tasks.stages import StageOutput, stage_task


@dataclass(frozen=True)
class ReportOutput:
    """The files of an audit's download bundle, by path inside the bundle, and its headline metrics.

    Attributes:
        files: ``report.html``, ``tables/*.parquet``, ``images/**.png``, ``entanglement_heatmap.png``.
        metrics: :func:`leapcore.report.audit_metrics`.
        title: the report's title.
        seconds: time to build the bundle.
    """

    files: dict[str, ArtifactRef]
    metrics: dict[str, float]
    title: str
    seconds: float = 0.0
    summary: list[dict[str, Any]] = field(default_factory=list)

    def key_parts(self) -> dict[str, Any]:
        return {"files": self.files}

    @property
    def report(self) -> ArtifactRef | None:
        return self.files.get("report.html")

    def tables(self) -> dict[str, ArtifactRef]:
        return {k: v for k, v in self.files.items() if k.endswith(".parquet")}


def model_facts(model: ModelRef) -> dict[str, Any]:
    """What the report and the publishers say about the model."""
    facts: dict[str, Any] = {
        "model": model.uri,
        "digest": model.digest,
        "classes": model.num_classes,
    }
    for key in ("name", "version", "alias", "run_id"):
        if model.registry.get(key):
            facts[f"registry {key}"] = model.registry[key]
    facts["input"] = "x".join(map(str, model.input_shape))
    facts["eval transform"] = sample_transform(model, None).describe()  # the model's own
    return facts


@stage_task("render_report", REPORT, "Build the HTML report, Parquet tables and PNGs of the audit.")
def render_report(
    model: ModelRef,
    config: EngineConfig,
    store: ArtifactStore,
    baseline: StageOutput | None = None,
    learning_rate: StageOutput | None = None,
    prototypes: list[StageOutput] | None = None,
    entanglement: StageOutput | None = None,
    isolations: list[StageOutput] | None = None,
    samples: StageOutput | None = None,
    title: str | None = None,
    html: bool = True,
    attributions: StageOutput | None = None,
    extras: dict[str, ArtifactRef] | None = None,
    stage_seconds: dict[str, float] | None = None,
) -> ReportOutput:
    """The report of an audit or explain run; ``extras`` are the analysis stages' Arrow tables by
    role (``tasks.analysis``), written as ``tables/<role>.parquet`` and read by report sections;
    ``stage_seconds`` their compute times, for the report's stages table."""
    began = time.perf_counter()
    audit = load_audit(
        store, model, config, baseline, learning_rate, prototypes, entanglement, isolations, samples
    )
    sample_names: list[str] = []
    spec = None
    facts = model_facts(model)
    if samples is not None:
        sample_table = store.get_table(samples.refs["samples"])
        sample_names = sample_table.column("name").to_pylist()
        spec = sample_transform_spec(sample_table)
        facts.update(_loaded_with(spec))
    title = title or f"leapcore audit of {model.name}"
    files: dict[str, ArtifactRef] = {}

    tables = _tables(audit, sample_names, spec)
    if model.card is not None:
        tables["model"] = store.get_table(model.card)
    if attributions is not None:  # attribute_samples: the report's section, a Parquet table
        tables["attributions"] = store.get_table(attributions.refs["attributions"])
    for role, ref in sorted((extras or {}).items()):
        tables[role] = store.get_table(ref)
    with tempfile.TemporaryDirectory(prefix="leapcore-report-") as tmp:
        root = Path(tmp)
        paths = write_images(audit, root / "images")
        for png in sorted(root.rglob("*.png")):
            rel = png.relative_to(root).as_posix()
            files[rel] = store.put_bytes(png.read_bytes(), "images", "png", "png")
        with_frame = (
            audit.entanglement is not None
            if audit.prototypes is not None
            else audit.isolation is not None and audit.sample_logits is not None
        )
        if with_frame:
            relative = {
                kind: [Path(p).relative_to(root).as_posix() for p in items]
                for kind, items in paths.items()
            }
            frame = audit_frame(audit, relative)
            table = pa.Table.from_pandas(frame, preserve_index=False)
            tables["results"] = table.replace_schema_metadata({b"leapcore.schema": b"results"})
    for name, table in tables.items():
        files[f"tables/{name}.parquet"] = store.put_parquet(table, "tables")
    if audit.entanglement is not None and audit.prototypes is not None:
        files["entanglement_heatmap.png"] = store.put_bytes(
            entanglement_heatmap(audit), "images", "png", "png"
        )
    if html:
        # The provenance block (time, run ids) is filled per run by stamp_report: this page is cached.
        page = render_html(
            audit,
            title=title,
            model=facts,
            config=config.secret_free(),
            sample_names=sample_names,
            tables=tables,
            stamp_later=True,
            stage_seconds=stage_seconds,
        )
        files["report.html"] = store.put_bytes(page.encode("utf-8"), "reports", "html", "html")
    metrics = audit_metrics(audit)
    summary = [
        {"file": k, "bytes": v.size}
        for k, v in sorted(files.items())
        if "/" not in k or k.startswith("tables/")
    ]
    return ReportOutput(files, metrics, title, time.perf_counter() - began, summary)


def _loaded_with(spec: dict[str, Any] | None) -> dict[str, str]:
    """What the user's images were actually loaded with (the samples table's transform)."""
    return {} if spec is None else {"images loaded with": from_spec(spec).describe()}


def stamp_report(
    report: ReportOutput,
    store: ArtifactStore,
    model: ModelRef,
    provenance: Mapping[str, Any],
    samples: StageOutput | None = None,
) -> ReportOutput:
    """``report`` with its page's provenance block filled for this run (time, MLflow run, Prefect
    flow run, ...): the page of a cached ``render_report`` would otherwise carry no run at all."""
    ref = report.report
    if ref is None:
        return report
    facts = model_facts(model)
    if samples is not None:
        facts.update(_loaded_with(sample_transform_spec(store.get_table(samples.refs["samples"]))))
    page = stamp_provenance(store.get_bytes(ref).decode("utf-8"), provenance, facts)
    stamped = store.put_bytes(page.encode("utf-8"), "reports", "html", "html")
    return replace(report, files={**report.files, "report.html": stamped})


def _tables(
    audit: Any, sample_names: list[str], transform: dict[str, Any] | None = None
) -> dict[str, pa.Table]:
    """The engine's Arrow tables of whatever stages ran."""
    tables: dict[str, pa.Table] = {}
    if audit.baseline is not None:
        tables["baseline"] = baseline_to_arrow(audit.baseline)
    if audit.lr is not None:
        tables["learning_rate"] = learning_rate_to_arrow(audit.lr)
    if audit.prototypes is not None:
        tables["prototypes"] = prototypes_to_arrow(audit.prototypes, audit.class_list)
        tables["trajectories"] = trajectories_to_arrow(audit.prototypes)
        if audit.entanglement is not None and audit.baseline is not None:
            tables["entanglement"] = entanglement_to_arrow(
                audit.prototypes,
                audit.baseline.logits.cpu(),
                audit.entanglement,
                audit.class_list,
                audit.entanglement_probed,
            )
    if audit.isolation is not None:
        source = "prototype" if audit.prototypes is not None else "sample"
        tables["isolations"] = isolations_to_arrow(
            audit.isolation, audit.class_list, source, audit.region
        )
    if audit.samples is not None:
        tables["samples"] = samples_to_arrow(
            audit.samples, audit.sample_logits, sample_names, transform
        )
    return tables
