"""One name per stage: the config's option stages, the pipeline's tasks, the audit's timings and the
progress events use the same names; the earlier ones still read as aliases."""

from __future__ import annotations

import torch
from torch import nn

from flows.stage_plan import CORE_STAGES, stage_aliases
from leapcore import engine
from leapcore.config import (
    ALL,
    BASELINE,
    DIFF_STAGE,
    ENTANGLEMENT,
    ISOLATION,
    LR,
    PROTOTYPES,
    STAGE_ALIASES,
    EngineConfig,
    option_stage,
    options_for_stage,
)
from leapcore.results import audit_arrays
from tasks import stages
from tasks.caching import stage_options

ENGINE_STAGES = {BASELINE, LR, PROTOTYPES, ENTANGLEMENT, ISOLATION}


def test_config_stages_are_the_pipelines_task_names():
    assert {option_stage(n) for n in EngineConfig.model_fields} <= ENGINE_STAGES | {ALL, DIFF_STAGE}
    # the analysis stage that reads the diff_* options (its own task is named after it)
    from tasks.diff import diff_with_previous

    assert diff_with_previous.name == DIFF_STAGE
    assert set(CORE_STAGES) >= ENGINE_STAGES
    for name in ENGINE_STAGES:  # the Prefect task of that name exists
        assert getattr(stages, name).name == name
    # every earlier name still selects the same stage, as the CLI's short names do
    for old, new in STAGE_ALIASES.items():
        assert options_for_stage(old) == options_for_stage(new)
        assert stage_options(old, EngineConfig()) == stage_options(new, EngineConfig())
        assert stage_aliases().get(old, new) == new


def test_timings_use_the_stage_names_and_answer_to_the_old_ones():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3)).eval()
    config = {"input_dim": [3, 8, 8], "find_lr_steps": 8, "num_lr_windows": 2, "max_steps": 4}
    audit = engine.run(net, ["a", "b", "c"], {**config, "isolation_steps": 2}, device="cpu")
    assert set(audit.timings) == ENGINE_STAGES
    assert audit.timings["prototypes"] == audit.timings[PROTOTYPES]
    assert audit.timings.get("lr_finding") == audit.timings[LR] and "isolation" in audit.timings
    # generate's results dict keeps the old names readable too
    timings = audit_arrays(audit)["timings"]
    assert set(timings) == ENGINE_STAGES and timings["entanglement"] == timings[ENTANGLEMENT]
