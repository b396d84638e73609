"""The audit's spurious-feature scan (analysis stage ``scan_spurious``, ``skip=["scan"]``).

The stage runs :func:`leapcore.spurious.scan_audit` in one cached, retryable task on the audit's
prototypes (all chunks), its baseline and learning rate, and the user's samples; it writes the
``spurious`` Arrow table (:mod:`leapcore.spurious_report`). Its findings: MLflow metrics
``spurious/<class>/...``, the run and model-version tag ``leapcore.spurious``, a paragraph of the
version's description when a class is flagged, and a W&B table of verdicts with evidence images.
"""

from __future__ import annotations

import time
from typing import Any

import pyarrow as pa
import torch

from leapcore import engine
from leapcore.config import EngineConfig
from leapcore.device import pick_device
from leapcore.images import load_image
from leapcore.results import baseline_from_arrow, learning_rate_from_arrow, prototypes_from_arrow
from leapcore.spurious import CLEAN, ScanSettings, hybrid_targets, scan_audit
from leapcore.spurious_report import TAG, spurious_metrics, spurious_tag, spurious_to_arrow
from tasks.analysis import AuditContext, Findings, analysis_stage
from tasks.artifacts import ArtifactStore
from tasks.caching import SPURIOUS
from tasks.model import ModelLocator, ModelRef, engine_model, sample_transform
from tasks.sample_files import image_files
from tasks.stages import SampleFile, StageOutput, stage_task
from tasks.wandb_tables import wandb_table

SCAN_SETTINGS = ScanSettings()  # the defaults the overhead benchmark holds to 25 %


def _samples(files: list[SampleFile], model: ModelRef, config: EngineConfig) -> torch.Tensor | None:
    if not files:
        return None
    transform = sample_transform(model, config)
    c = model.input_shape[0]
    with torch.no_grad():
        return torch.stack([transform(load_image(f.path, None, c)[None])[0] for f in files])


@stage_task("scan_spurious", SPURIOUS, "Spurious-feature scan of every audited class.")
def scan_spurious_task(
    model: ModelRef,
    locator: ModelLocator,
    config: EngineConfig,
    prototypes: list[StageOutput],
    baseline: StageOutput,
    learning_rate: StageOutput | None,
    samples: list[SampleFile],
    settings: ScanSettings,
    store: ArtifactStore,
    device: str | None = None,
) -> StageOutput:
    from tasks.audit_io import merge_prototypes

    dev = pick_device(device)
    net, loaded = engine_model(model, locator, config, dev)
    merged = merge_prototypes(
        [
            prototypes_from_arrow(
                store.get_table(p.refs["prototypes"]), store.get_table(p.refs["trajectories"])
            )
            for p in sorted(prototypes, key=lambda p: p.first_row)
        ]
    )
    start = baseline_from_arrow(store.get_table(baseline.refs["baseline"])).image
    lr = (
        learning_rate_from_arrow(store.get_table(learning_rate.refs["learning_rate"])).lr
        if learning_rate is not None
        else config.lr
    )
    images = _samples(samples, model, config)
    torch.manual_seed(config.seed)
    began = time.perf_counter()
    with engine.stage_mode(loaded.model, config, dev):
        shown, _ = engine.isolation_inputs(merged, [], config, net.num_classes, dev)
        merged.images = shown  # alpha prototypes as the model sees them
        rows = len(merged.targets) * max(settings.extra_prototypes, 1)
        chunk = engine.prototype_chunk_size(net, rows, config, dev)
        scans = scan_audit(
            net,
            merged,
            start.to(dev),
            lr,
            images,
            config,
            chunk,
            settings,
            names=list(model.class_list),
        )
    seconds = time.perf_counter() - began
    summary = [
        {
            "class": s.class_name,
            "verdict": s.verdict,
            "concentration": round(s.concentration, 3),
            "blob reappears": round(s.reappearance, 3),
            "consistency": round(s.consistency, 3),
            "content elsewhere ratio": round(s.elsewhere_ratio, 3),
            "flip rate": round(s.flip_rate, 3),
            "control flip rate": round(s.control_flip_rate, 3),
            "probe flip rate": round(s.probe_flip_rate, 3),
            "probe control flip rate": round(s.probe_control_flip_rate, 3),
        }
        for s in scans
    ]
    left_out = hybrid_targets(merged.targets, list(model.class_list))
    if left_out:
        summary.append({"not scanned (hybrid targets)": ", ".join(left_out)})
    ref = store.put_table(spurious_to_arrow(scans, settings, left_out), "spurious")
    return StageOutput("scan_spurious", {"spurious": ref}, seconds, summary)


def scan_findings(tables: dict[str, pa.Table]) -> Findings:
    """Metrics, the ``leapcore.spurious`` run and version tag, and a note when a class is flagged."""
    table = tables["spurious"]
    tag = spurious_tag(table)
    note = ""
    if tag != CLEAN:
        rows = [r for r in table.to_pylist() if r["verdict"] != CLEAN]
        note = "Spurious-feature scan: " + "; ".join(
            f"{r['class_name']} is {r['verdict']} ({r['reason']})" for r in rows
        )
    return Findings(
        metrics=spurious_metrics(table),
        run_tags={TAG: tag},
        version_tags={TAG: tag},
        version_note=note,
    )


@analysis_stage(
    "scan_spurious",
    aliases=("scan",),
    needs=("generate_baseline", "optimise_prototypes"),
    tables=("spurious",),
    findings=scan_findings,
    order=40,
)
def scan_spurious(ctx: AuditContext) -> tuple[StageOutput | None, str]:
    """Spurious-feature scan: concentrated, fixed, class-flipping evidence per class."""
    from tasks.runtime import run_stage

    prototypes = ctx.outputs.get("optimise_prototypes") or []
    baseline = ctx.outputs.get("generate_baseline")
    if not prototypes or baseline is None:
        return None, "Skipped"
    # The flow passes the user's images as SampleFile (path + SHA-256); paths are read here.
    paths = [str(f) for f in ctx.samples if not isinstance(f, SampleFile)]
    files = [f for f in ctx.samples if isinstance(f, SampleFile)]
    files += image_files(paths) if paths else []
    return run_stage(
        scan_spurious_task,
        model=ctx.model,
        locator=ctx.locator,
        config=ctx.config,
        prototypes=prototypes,
        baseline=baseline,
        learning_rate=ctx.outputs.get("find_learning_rate"),
        samples=files,
        settings=SCAN_SETTINGS,
        store=ctx.store,
        device=ctx.device,
    )


@wandb_table("spurious")
def spurious_wandb_table(wandb: Any, table: pa.Table, audit: Any = None) -> Any:
    """One row per class: verdict, numbers, reason, evidence and paste images."""
    import io

    from PIL import Image

    columns = [
        "class",
        "verdict",
        "concentration",
        "blob reappears",
        "consistency",
        "content elsewhere ratio",
        "flip rate",
        "control flip rate",
        "probe flip rate",
        "probe control flip rate",
        "probe blob reappears",
        "reason",
        "evidence",
        "pastes",
    ]
    out = wandb.Table(columns=columns)
    for r in table.to_pylist():
        images = [
            wandb.Image(Image.open(io.BytesIO(r[c]))) if r[c] else None
            for c in ("evidence_png", "paste_png")
        ]
        out.add_data(
            r["class_name"],
            r["verdict"],
            r["concentration"],
            r["reappearance"],
            r["consistency"],
            r.get("elsewhere_ratio"),
            r["flip_rate"],
            r["control_flip_rate"],
            r.get("probe_flip_rate"),
            r.get("probe_control_flip_rate"),
            r.get("probe_reappearance"),
            r["reason"],
            *images,
        )
    return out
