"""Which stages an audit runs: their names, short names, what each needs, and ``skip``."""

from __future__ import annotations

from dataclasses import dataclass

from leapcore.config import EngineConfig
from leapcore.errors import InputError
from tasks.analysis import load_stages

# Stage names, in order, and the short names ``skip`` also accepts. The analysis stages
# (``tasks.analysis``: scan, transfer, attribution, diff) run between isolation and the report;
# :func:`stage_names` lists them all.
CORE_STAGES = (
    "fetch_model",
    "generate_baseline",
    "find_learning_rate",
    "optimise_prototypes",
    "score_entanglement",
    "isolate_features",
)
OUTPUT_STAGES = ("render_report", "export_results", "publish_mlflow", "publish_wandb")
ALIASES = {
    "baseline": "generate_baseline",
    "lr": "find_learning_rate",
    "lr_finding": "find_learning_rate",
    "prototypes": "optimise_prototypes",
    "entanglement": "score_entanglement",
    "isolation": "isolate_features",
    "report": "render_report",
    "export": "export_results",
    "mlflow": "publish_mlflow",
    "wandb": "publish_wandb",
}
# Switching a stage off switches off what needs its output.
NEEDS = {
    "find_learning_rate": ("generate_baseline",),
    "optimise_prototypes": ("generate_baseline",),
    "score_entanglement": ("optimise_prototypes",),
    "isolate_features": ("optimise_prototypes",),
}


def stage_names() -> tuple[str, ...]:
    """Every stage of an audit in run order, the registered analysis stages included."""
    return CORE_STAGES + tuple(s.name for s in load_stages()) + OUTPUT_STAGES


def stage_aliases() -> dict[str, str]:
    """Short name -> stage name, the analysis stages' aliases included."""
    return {**ALIASES, **{a: s.name for s in load_stages() for a in s.aliases}}


def stage_needs() -> dict[str, tuple[str, ...]]:
    """Stage -> the stages whose output it needs."""
    return {**NEEDS, **{s.name: s.needs for s in load_stages()}}


@dataclass(frozen=True)
class StagePlan:
    """Which stages run; see :func:`plan_stages`."""

    off: frozenset[str]

    def on(self, stage: str) -> bool:
        return stage not in self.off


def plan_stages(skip: list[str] | str | None, config: EngineConfig) -> StagePlan:
    """The stages that run, from ``skip`` (stage or short names) and the config.

    ``config.isolation = False`` switches isolation off; switching off a stage switches off the ones
    that need it (the baseline feeds the learning-rate finder and the prototypes; the prototypes feed
    entanglement and isolation). Without the learning-rate finder, prototypes use ``config.lr``.
    ``render_report`` off leaves out the HTML page only: tables and images are still built.

    Raises:
        InputError: an unknown stage name, or ``fetch_model`` (every audit needs the model).
    """
    names = [skip] if isinstance(skip, str) else list(skip or [])
    off: set[str] = set()
    stages, aliases = stage_names(), stage_aliases()
    for name in names:
        stage = aliases.get(str(name).strip().lower(), str(name).strip().lower())
        if stage not in stages:
            known = ", ".join(list(stages) + sorted(aliases))
            raise InputError(f"unknown stage {name!r} in skip; stages: {known}.")
        if stage == "fetch_model":
            raise InputError("fetch_model cannot be skipped: every stage needs the model.")
        off.add(stage)
    if not config.isolation:
        off.add("isolate_features")
    changed = True
    while changed:
        changed = False
        for stage, needed in stage_needs().items():
            if off.intersection(needed) and stage not in off:
                off.add(stage)
                changed = True
    return StagePlan(frozenset(off))
