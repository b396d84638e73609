"""The engine's stages by name: one name per stage everywhere.

The option tables (``docs/config.md``), the pipeline's tasks and cache keys, the audit's ``timings``
and the progress events all use the name of the pipeline task that runs the stage; the earlier
names (``lr_finding``, ``prototypes``, ...) are aliases (:data:`STAGE_ALIASES`).
"""

from __future__ import annotations

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
