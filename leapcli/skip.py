"""The stage names ``--skip`` takes, for ``leap``'s help without importing any flow."""

from __future__ import annotations

__all__ = ["EXPLAIN_SKIP", "SKIP_STAGES", "skip_help"]

# Stage names ``--skip`` takes (flows.audit.STAGES / ALIASES and flows.explain; a test keeps them
# equal). Written out so that ``leap --help`` imports no flow (Prefect takes seconds to import).
SKIP_STAGES = {
    "baseline": "generate_baseline (and what needs it: lr, prototypes, entanglement, isolation)",
    "lr": "find_learning_rate (prototypes then use the config's lr)",
    "prototypes": "optimise_prototypes (and entanglement, isolation)",
    "entanglement": "score_entanglement",
    "isolation": "isolate_features",
    "attribution": "attribute_prototypes (the maps of --methods; runs only with them)",
    "scan": "scan_spurious (the spurious-feature scan of every class; also --no-scan)",
    "transfer": "transfer (prototypes on the config's reference_models; runs only with them)",
    "report": "render_report (the HTML page; tables and images are still written)",
    "export": "export_results (the copy in --output-dir)",
    "mlflow": "publish_mlflow",
    "wandb": "publish_wandb",
    "diff": "diff_audits (the comparison with the last audited version of the model)",
}
EXPLAIN_SKIP = ("report", "export", "mlflow", "wandb")


def skip_help(names: tuple[str, ...] | None = None) -> str:
    """``--skip``'s help: the stage names, one a line."""
    shown = {k: v for k, v in SKIP_STAGES.items() if names is None or k in names}
    return "stages to switch off, by short or full name:\n" + "\n".join(
        f"  {short:<13}{full}" for short, full in shown.items()
    )
