"""The engine's stages by name: one name per stage everywhere.

The option tables (``docs/config.md``), the pipeline's tasks and cache keys, the audit's ``timings``
and the progress events all use the name of the pipeline task that runs the stage; the earlier
names (``lr_finding``, ``prototypes``, ...) are aliases (:data:`STAGE_ALIASES`).
"""

from __future__ import annotations

from typing import Any

BASELINE = "generate_baseline"
LR = "find_learning_rate"
PROTOTYPES = "optimise_prototypes"
ENTANGLEMENT = "score_entanglement"
ISOLATION = "isolate_features"
ALL = "all"
#: Earlier names (and the CLI's short ones) -> the stage name.
STAGE_ALIASES = {
    "baseline": BASELINE,
    "lr_finding": LR,
    "lr": LR,
    "prototypes": PROTOTYPES,
    "entanglement": ENTANGLEMENT,
    "isolation": ISOLATION,
}


def stage_name(name: str) -> str:
    """The stage called ``name`` or by an alias of :data:`STAGE_ALIASES` (others pass unchanged)."""
    return STAGE_ALIASES.get(name, name)


class StageTimes(dict):
    """Seconds per stage, keyed by stage name; the earlier names still read (``["prototypes"]``)."""

    def __getitem__(self, key: str) -> float:
        return super().__getitem__(stage_name(key))

    def get(self, key: str, default: Any = None) -> Any:
        return super().get(stage_name(key), default)

    def __contains__(self, key: object) -> bool:
        return super().__contains__(stage_name(key) if isinstance(key, str) else key)
