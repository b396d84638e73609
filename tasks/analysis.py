"""Analysis stages: what an audit computes after its prototypes, entanglement and isolations.

A new question an audit answers (a spurious-feature scan, transfer to reference models, attribution
maps, a diff against the last audited version) is a function registered here with
:func:`analysis_stage`; ``flows.audit`` runs every registered stage after ``isolate_features``, in
``order``, and handles the rest the same way for all of them:

- ``skip`` takes the stage's name and aliases; a stage whose ``needs`` are switched off is off too;
- the Arrow tables it names in ``tables`` (roles of its :class:`~tasks.stages.StageOutput`'s refs)
  go into the report (``tables/<role>.parquet``, a report section reads ``context.tables[role]``),
  the MLflow run's artifacts, the output folder and a W&B table (``tasks.wandb_tables``);
- its ``findings`` (computed from those tables) become MLflow metrics, run and model-version tags,
  a paragraph of the version's description and Prefect events.

The stage's own work is a cached, retryable task (``tasks.stages.stage_task``) that passes artifact
references, never tensors; the algorithm lives in ``leapcore``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from leapcore.config import EngineConfig
from tasks.artifacts import ArtifactStore
from tasks.model import ModelRef
from tasks.stages import ClassChunk, StageOutput

# Modules that register analysis stages, imported by :func:`load_stages` when they are there.
ANALYSIS_MODULES = ("tasks.scan", "tasks.transfer", "tasks.attribution", "tasks.diff")


@dataclass
class AuditContext:
    """What every analysis stage gets: the audit so far.

    Attributes:
        model: the fetched model (``tasks.model.loaded_model(model, locator)`` inside a task).
        locator: how to load it again.
        config: the engine options.
        store: the artifact store.
        device: ``cpu``, ``cuda``, ... or None for the best available.
        targets: the audited targets (class indices; several for a hybrid); ``names`` their names.
        chunks: the targets in the chunks the prototype and isolation tasks ran.
        outputs: stage name -> output so far (``generate_baseline``, ``optimise_prototypes`` (a
            list, one per chunk), ``score_entanglement``, ``isolate_features`` (a list), and each
            earlier analysis stage's output by its name).
        samples: image files the user passed (``audit_model(samples=...)``, ``--samples``).
        methods: attribution methods asked for (``audit_model(methods=...)``, ``--methods``).
        method_options: options of ``leapcore.attribution.attribute`` per method.
        mlflow: ``{"uri", "run_id"}`` of the audit's MLflow run; None when MLflow is off.
        flow_name: the flow's short name (for Prefect artifacts' keys).
    """

    model: ModelRef
    locator: Any
    config: EngineConfig
    store: ArtifactStore
    device: str | None
    targets: list[list[int]]
    names: list[str]
    chunks: list[ClassChunk]
    outputs: dict[str, Any] = field(default_factory=dict)
    samples: list[str] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)
    method_options: dict[str, Any] = field(default_factory=dict)
    mlflow: dict[str, str] | None = None
    flow_name: str = "audit"


@dataclass
class Findings:
    """What a stage publishes beyond its tables.

    Attributes:
        metrics: MLflow metrics of the audit run (also in ``AuditResult.metrics`` and W&B's summary).
        run_tags: MLflow tags of the audit run.
        version_tags: tags of the audited MLflow model version, when the model came from the registry.
        version_note: a paragraph added to the model version's description.
        events: Prefect events the flow emits, as ``(event name, payload)``.
    """

    metrics: dict[str, float] = field(default_factory=dict)
    run_tags: dict[str, str] = field(default_factory=dict)
    version_tags: dict[str, str] = field(default_factory=dict)
    version_note: str = ""
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def merge(self, other: Findings) -> Findings:
        """Both stages' findings (the later stage's keys win; notes are kept in order)."""
        notes = [n for n in (self.version_note, other.version_note) if n]
        return Findings(
            {**self.metrics, **other.metrics},
            {**self.run_tags, **other.run_tags},
            {**self.version_tags, **other.version_tags},
            "\n\n".join(notes),
            [*self.events, *other.events],
        )


StageRun = Callable[[AuditContext], "tuple[StageOutput | None, str]"]
FindingsFn = Callable[[dict[str, pa.Table]], Findings]


@dataclass(frozen=True)
class AnalysisStage:
    """A registered analysis stage; see :func:`analysis_stage`."""

    name: str
    run: StageRun
    aliases: tuple[str, ...] = ()
    needs: tuple[str, ...] = ("optimise_prototypes",)
    tables: tuple[str, ...] = ()
    findings: FindingsFn | None = None
    order: int = 50
    description: str = ""


ANALYSIS_STAGES: dict[str, AnalysisStage] = {}


def analysis_stage(
    name: str,
    *,
    aliases: tuple[str, ...] = (),
    needs: tuple[str, ...] = ("optimise_prototypes",),
    tables: tuple[str, ...] = (),
    findings: FindingsFn | None = None,
    order: int = 50,
) -> Callable[[StageRun], StageRun]:
    """Register ``run(ctx) -> (StageOutput or None, state name)`` as the analysis stage ``name``.

    ``run`` returns ``(None, "Skipped")`` when it has nothing to do (no methods asked, no earlier
    audit to compare with); its docstring's first line is the stage's description in ``--help``.

    Args:
        name: the stage's name (``skip`` takes it, and the result's ``stages`` reports it).
        aliases: short names ``skip`` also takes.
        needs: stages whose output it reads; switching one off switches this one off.
        tables: roles of the output's refs that are Arrow tables to report and publish.
        findings: metrics, tags, notes and events from those tables (role -> table).
        order: run order among analysis stages (lower first).
    """

    def register(run: StageRun) -> StageRun:
        if name in ANALYSIS_STAGES:
            raise ValueError(f"analysis stage {name!r} is registered twice")
        doc = (run.__doc__ or "").strip().splitlines()
        ANALYSIS_STAGES[name] = AnalysisStage(
            name, run, tuple(aliases), tuple(needs), tuple(tables), findings, order,
            doc[0] if doc else "",
        )  # fmt: skip
        return run

    return register


def load_stages() -> list[AnalysisStage]:
    """The registered analysis stages in run order, after importing :data:`ANALYSIS_MODULES`.

    A module that is not there is left out; an error inside one that is there is raised.
    """
    for module in ANALYSIS_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise
    return sorted(ANALYSIS_STAGES.values(), key=lambda s: (s.order, s.name))


def stage_findings(stage: AnalysisStage, tables: dict[str, pa.Table]) -> Findings:
    """The stage's findings from its tables (none without a ``findings`` function)."""
    return stage.findings(tables) if stage.findings is not None else Findings()
