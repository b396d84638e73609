"""The audit pipeline's Prefect tasks: one per engine stage, plus report, export and publishers.

Tasks pass small references (:class:`ArtifactRef`, :class:`ModelRef`, :class:`StageOutput`), read and
write Arrow artifacts in an :class:`ArtifactStore`, cache by content and retry transient failures.
The engine (``leapcore``) never imports this package.
"""

from tasks.artifacts import ArtifactError, ArtifactRef, ArtifactStore
from tasks.export import export_results
from tasks.mlflow_registry import (
    close_audit_run,
    open_audit_run,
    publish_mlflow,
    run_tags,
    tracking_uri,
)
from tasks.model import ModelLocator, ModelRef, SourceIdentity, locate_model, resolve_targets
from tasks.report import ReportOutput, render_report
from tasks.runtime import (
    AuditResult,
    SecretSafeFlow,
    markdown_summary,
    run_stage,
    run_stages,
    secret_safe_flow,
    summarise,
)
from tasks.stages import (
    ClassChunk,
    SampleFile,
    StageOutput,
    class_chunks,
    fetch_model,
    find_learning_rate,
    generate_baseline,
    isolate_features,
    isolate_samples,
    load_samples,
    optimise_prototypes,
    score_entanglement,
)
from tasks.wandb_publish import WandbRun, publish_wandb

__all__ = [
    "ArtifactError",
    "ArtifactRef",
    "ArtifactStore",
    "AuditResult",
    "ClassChunk",
    "ModelLocator",
    "ModelRef",
    "ReportOutput",
    "SampleFile",
    "SecretSafeFlow",
    "SourceIdentity",
    "StageOutput",
    "WandbRun",
    "class_chunks",
    "close_audit_run",
    "export_results",
    "fetch_model",
    "find_learning_rate",
    "generate_baseline",
    "isolate_features",
    "isolate_samples",
    "load_samples",
    "locate_model",
    "markdown_summary",
    "open_audit_run",
    "optimise_prototypes",
    "publish_mlflow",
    "publish_wandb",
    "render_report",
    "resolve_targets",
    "run_stage",
    "run_stages",
    "run_tags",
    "score_entanglement",
    "secret_safe_flow",
    "summarise",
    "tracking_uri",
]
