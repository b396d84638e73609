"""The analysis-stage registry (tasks.analysis): skip names, what a stage needs, findings, W&B."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from leapcore.config import load_config
from leapcore.errors import InputError


@pytest.fixture
def probe_stage():
    from tasks.analysis import ANALYSIS_STAGES, analysis_stage

    @analysis_stage("probe_stage", aliases=("probe",), needs=("isolate_features",), order=99)
    def probe(ctx):
        """A stage that reads the isolations."""
        return None, "Skipped"

    yield ANALYSIS_STAGES["probe_stage"]
    ANALYSIS_STAGES.pop("probe_stage")


def test_a_registered_stage_runs_between_isolation_and_report_and_skips_with_its_needs(
    probe_stage,
) -> None:
    from flows.audit import plan_stages, stage_names
    from tasks.analysis import analysis_stage

    names = stage_names()
    assert names.index("isolate_features") < names.index("probe_stage")
    assert names.index("probe_stage") < names.index("render_report")
    assert probe_stage.description == "A stage that reads the isolations."
    config = load_config({})
    assert plan_stages([], config).on("probe_stage")
    assert not plan_stages(["probe"], config).on("probe_stage")
    # switched off with what it needs, however that was switched off
    assert not plan_stages(["isolation"], config).on("probe_stage")
    assert not plan_stages(["prototypes"], config).on("probe_stage")
    assert not plan_stages([], load_config({"isolation": False})).on("probe_stage")
    with pytest.raises(InputError, match="probe_stage"):  # the error lists it among the stages
        plan_stages(["probe_stagex"], config)
    with pytest.raises(ValueError, match="registered twice"):
        analysis_stage("probe_stage")(lambda ctx: (None, "Skipped"))


def test_findings_merge_keeps_both_stages() -> None:
    from tasks.analysis import Findings

    a = Findings({"a": 1.0, "x": 1.0}, {"t": "a"}, {"v": "a"}, "first", [("e.a", {"k": 1})])
    b = Findings({"b": 2.0, "x": 3.0}, {"u": "b"}, {"v": "b"}, "second", [("e.b", {})])
    m = a.merge(b)
    assert m.metrics == {"a": 1.0, "b": 2.0, "x": 3.0}
    assert m.run_tags == {"t": "a", "u": "b"} and m.version_tags == {"v": "b"}
    assert m.version_note == "first\n\nsecond"
    assert [e for e, _ in m.events] == ["e.a", "e.b"]
    assert a.merge(Findings()).version_note == "first"


def test_a_table_without_its_own_wandb_table_is_converted_column_by_column() -> None:
    import wandb

    from tasks.wandb_tables import generic_table

    pixels = np.zeros((4, 6, 3), np.uint8)
    pixels[1, 2] = (255, 0, 0)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    table = pa.table(
        {
            "class": ["cat", "dog"],
            "score": [0.5, 0.25],
            "evidence": [buf.getvalue(), None],
            "numbers": [[1, 2], [3]],
        }
    )
    out = generic_table(wandb, table)
    assert out.columns == ["class", "score", "evidence", "numbers"]
    assert [row[0] for row in out.data] == ["cat", "dog"]
    assert [row[1] for row in out.data] == [0.5, 0.25]
    image = out.data[0][2]
    assert isinstance(image, wandb.Image)
    assert np.array_equal(np.asarray(image.image), pixels)  # the PNG's own pixels
    assert out.data[1][2] is None and out.data[0][3] == "[1, 2]"
