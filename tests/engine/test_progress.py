"""The engine's loops report progress as events (``leapcore.progress``), not only as log text."""

from __future__ import annotations

import torch
from torch import nn

from leapcore import engine
from leapcore.config import load_config
from leapcore.isolation import isolate_features
from leapcore.progress import ProgressEvent, _listeners, listen


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(64, 3),
    ).eval()


SMALL = {
    "input_dim": [1, 16, 16],
    "find_lr_steps": 0,
    "max_steps": 6,
    "isolation_steps": 4,
    "log_freq": 2,
    "max_isolate_classes": 1,
    "transform": None,
}


def test_listeners_get_every_loops_steps_and_a_failing_one_breaks_nothing():
    seen: list[ProgressEvent] = []

    def broken(event: ProgressEvent) -> None:
        raise RuntimeError("a display that fails")

    with listen(broken), listen(seen.append):
        engine.run(_net(), ["a", "b", "c"], SMALL, device="cpu")
    assert [(e.stage, e.step, e.total) for e in seen] == [
        ("optimise_prototypes", 2, 6),
        ("optimise_prototypes", 4, 6),
        ("optimise_prototypes", 6, 6),
        ("isolate_features", 2, 4),
        ("isolate_features", 4, 4),
    ]
    assert broken not in _listeners and seen.append not in _listeners


def test_a_call_s_own_callback_gets_that_call_s_events_only():
    images = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    mine: list[ProgressEvent] = []
    config = load_config({**SMALL, "isolation_steps": 6})
    isolate_features(_net(), images, [[0], [1]], config, 8, progress=mine.append)
    assert [(e.stage, e.step) for e in mine] == [
        ("isolate_features", 2),
        ("isolate_features", 4),
        ("isolate_features", 6),
    ]
    isolate_features(_net(), images, [[0], [1]], config, 8)  # no callback: nothing more arrives
    assert len(mine) == 3
