"""What the pipeline's stages hand each other: :class:`StageOutput` (artifact references, never
tensors) and the :class:`ClassChunk` a stage works on.

Its own module so that readers of finished stages (:mod:`tasks.audit_io`, the report, the
publishers) and the stage tasks (:mod:`tasks.stages`) share it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tasks.artifacts import ArtifactRef


@dataclass(frozen=True)
class StageOutput:
    """What a stage hands on: artifact references and how it went (never tensors).

    Attributes:
        stage: the stage's name.
        refs: its artifacts by role (``prototypes``, ``trajectories``, ...).
        seconds: compute time when the stage ran (a cached result keeps the original time).
        summary: a few rows for the stage's table in the Prefect UI.
        first_row: for a chunk of classes, the batch row its first prototype has in the whole audit.
    """

    stage: str
    refs: dict[str, ArtifactRef]
    seconds: float
    summary: list[dict[str, Any]] = field(default_factory=list)
    first_row: int = 0

    def key_parts(self) -> dict[str, Any]:
        return {"refs": self.refs, "first_row": self.first_row}


@dataclass(frozen=True)
class ClassChunk:
    """A consecutive slice of the audit's targets, optimised (and isolated) as one batch.

    Attributes:
        index: the chunk's position.
        first_target: index of its first target among all targets.
        targets: its targets (lists of class indices; several for a hybrid).
        total_targets: how many targets the whole audit has.
    """

    index: int
    first_target: int
    targets: list[list[int]]
    total_targets: int


def class_chunks(targets: list[list[int]], size: int | None) -> list[ClassChunk]:
    """``targets`` in consecutive chunks of ``size`` (all in one when None)."""
    size = len(targets) if not size else max(1, int(size))
    return [
        ClassChunk(i, start, [list(t) for t in targets[start : start + size]], len(targets))
        for i, start in enumerate(range(0, len(targets), size))
    ]
