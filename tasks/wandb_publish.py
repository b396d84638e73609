"""W&B registration: one run per audit with the secret-free config, tables of prototypes and
isolations (image columns, probabilities), the entanglement matrix and the Parquet tables as an
artifact.

Offline unless an account is configured: ``wandb_api_key`` or ``wandb_entity`` in the config, or
``WANDB_API_KEY`` / ``WANDB_ENTITY`` in the environment, switch to online; ``WANDB_MODE`` (or the
``mode`` argument) always wins. Offline runs land in ``$WANDB_DIR/wandb/offline-run-*`` and are
uploaded later with ``wandb sync <that folder>``.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import task

from leapcore.config import EngineConfig
from leapcore.images import to_uint8
from tasks.artifacts import ArtifactStore
from tasks.audit_io import load_audit
from tasks.model import ModelRef
from tasks.redaction import redacting
from tasks.report import ReportOutput
from tasks.stages import StageOutput

DEFAULT_PROJECT = "leapcore"


@dataclass(frozen=True)
class WandbRun:
    """Where the audit's W&B run went.

    Attributes:
        run_id: the W&B run id.
        mode: ``offline`` or ``online``.
        run_dir: the local run folder (``offline-run-*`` when offline).
        sync_command: ``wandb sync <run_dir>`` when offline, else empty.
        url: the run's page when online.
    """

    run_id: str
    mode: str
    run_dir: str
    sync_command: str = ""
    url: str = ""


def wandb_mode(config: EngineConfig, mode: str | None = None) -> str:
    """``online`` when an account is configured, else ``offline``; ``mode``/``WANDB_MODE`` win."""
    explicit = mode or os.environ.get("WANDB_MODE")
    if explicit:
        return "offline" if explicit == "dryrun" else explicit
    configured = (
        config.wandb_api_key is not None
        or bool(config.wandb_entity)
        or bool(os.environ.get("WANDB_API_KEY"))
        or bool(os.environ.get("WANDB_ENTITY"))
    )
    return "online" if configured else "offline"


def _image(wandb: Any, tensor: Any, alpha: Any = None, caption: str = "") -> Any:
    return wandb.Image(to_uint8(tensor, alpha), caption=caption)


@task(name="publish_wandb", retries=1, retry_delay_seconds=2, persist_result=False)
@redacting
def publish_wandb(
    model: ModelRef,
    config: EngineConfig,
    params: dict[str, Any],
    report: ReportOutput,
    store: ArtifactStore,
    baseline: StageOutput | None = None,
    prototypes: list[StageOutput] | None = None,
    entanglement: StageOutput | None = None,
    isolations: list[StageOutput] | None = None,
    samples: StageOutput | None = None,
    project: str | None = None,
    run_name: str | None = None,
    mode: str | None = None,
    tags: list[str] | None = None,
    directory: str | None = None,
) -> WandbRun:
    """Log the audit as one W&B run; offline when no account is configured."""
    import wandb

    chosen = wandb_mode(config, mode)
    settings: dict[str, Any] = {
        "console": "off",
        "silent": True,
        "x_disable_stats": True,
        "x_disable_meta": True,
        "x_disable_machine_info": True,
        "disable_git": True,
        "save_code": False,
        "x_save_requirements": False,
        "disable_job_creation": True,
    }
    if chosen == "online" and config.wandb_api_key is not None:
        settings["api_key"] = config.wandb_api_key.get_secret_value()
    audit = load_audit(
        store, model, config, baseline, None, prototypes, entanglement, isolations, samples
    )
    run = wandb.init(
        project=project or config.project_name or DEFAULT_PROJECT,
        entity=config.wandb_entity or None,
        name=run_name,
        config=params,
        mode=chosen,
        dir=directory or os.environ.get("WANDB_DIR") or None,
        job_type="audit",
        tags=tags,
        reinit="create_new",
        settings=wandb.Settings(**settings),
    )
    try:
        names = audit.class_list
        logged: dict[str, Any] = {}
        p = audit.prototypes
        if p is not None:
            probs = p.probs
            table = wandb.Table(
                columns=["target", "prototype", "image", "target_prob", "top_class", "top_prob"]
            )
            for r in range(len(p.images)):
                t = p.targets[p.row_target(r)]
                target = "+".join(names[c] for c in t)
                top = int(probs[r].argmax())
                alpha = None if p.alphas is None else p.alphas[r]
                table.add_data(
                    target,
                    p.row_index(r),
                    _image(wandb, p.images[r], alpha, target),
                    float(probs[r, t].mean()),
                    names[top],
                    float(probs[r, top]),
                )
            logged["prototypes"] = table
        if p is not None and audit.entanglement is not None:
            columns = sorted({c for t in p.targets for c in t})
            strongest = audit.entanglement.max(dim=0).values.argsort(descending=True).tolist()
            columns += [c for c in strongest if c not in columns][: max(0, 30 - len(columns))]
            matrix = wandb.Table(columns=["prototype"] + [names[c] for c in columns])
            for r in range(len(audit.entanglement)):
                label = (
                    "+".join(names[c] for c in p.targets[p.row_target(r)]) + f" #{p.row_index(r)}"
                )
                matrix.add_data(label, *[float(audit.entanglement[r, c]) for c in columns])
            logged["entanglement"] = matrix
            heatmap = report.files.get("entanglement_heatmap.png")
            if heatmap is not None:
                with tempfile.TemporaryDirectory() as tmp:
                    path = Path(tmp) / "entanglement_heatmap.png"
                    path.write_bytes(store.get_bytes(heatmap))
                    logged["entanglement_heatmap"] = wandb.Image(str(path))
                    run.log(dict(logged))
                    logged = {}
        iso = audit.isolation
        if iso is not None:
            source = [f"prototype {i}" for i in range(len(p.images))] if p is not None else None
            sample_names = (
                store.get_table(samples.refs["samples"]).column("name").to_pylist()
                if samples is not None
                else []
            )
            table = wandb.Table(
                columns=[
                    "image",
                    "class",
                    "mask",
                    "isolated",
                    "logit_full",
                    "logit_isolated",
                    "coverage",
                ]
            )
            for k, (i, c) in enumerate(iso.pairs):
                label = (
                    source[i] if source else (sample_names[i] if i < len(sample_names) else str(i))
                )
                table.add_data(
                    label,
                    names[c],
                    _image(wandb, iso.masks[k], caption=f"mask {names[c]}"),
                    _image(wandb, iso.isolated[k], caption=names[c]),
                    float(iso.logits_full[k]),
                    float(iso.logits_isolated[k]),
                    float(iso.coverage[k]),
                )
            logged["isolations"] = table
        if logged:
            run.log(logged)
        run.summary.update(report.metrics)
        artifact = wandb.Artifact(
            name=f"audit-{model.name}".replace("/", "-")[:120], type="leapcore-audit"
        )
        with tempfile.TemporaryDirectory() as tmp:
            for rel, ref in report.tables().items():
                path = Path(tmp) / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(store.get_bytes(ref))
                artifact.add_file(str(path), name=rel)
            run.log_artifact(artifact)
        run_dir = str(Path(run.dir).parent)
        info = WandbRun(
            run_id=run.id,
            mode=chosen,
            run_dir=run_dir,
            sync_command=f"wandb sync {run_dir}" if chosen == "offline" else "",
            url=(run.url or "") if chosen == "online" else "",
        )
    except BaseException:
        run.finish(exit_code=1)
        raise
    run.finish()
    return info
