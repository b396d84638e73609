"""The config reference cannot drift from the code, and the engine stays free of pipeline imports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from leapcore.config import EngineConfig, load_config
from leapcore.config_docs import render_markdown

ROOT = Path(__file__).resolve().parents[2]


def test_docs_config_md_is_generated_from_the_code():
    committed = (ROOT / "docs" / "config.md").read_text()
    assert committed == render_markdown(), (
        "docs/config.md is out of date: run `python -m leapcore.config_docs > docs/config.md`"
    )


def test_every_option_is_documented_with_the_default_a_config_really_has():
    """Each row's default is what ``load_config({})`` holds (secrets masked), and every row names a
    stage and a meaning: the table is read back, not compared with the code that wrote it."""
    rows = {}
    for line in (ROOT / "docs" / "config.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0].startswith("`") and cells[0] != "`option`":
            rows[cells[0].strip("`")] = cells
    defaults = load_config({})
    assert set(rows) == set(EngineConfig.model_fields)
    for name, (_, default, allowed, stage, meaning) in rows.items():
        value = getattr(defaults, name)
        expected = "****" if hasattr(value, "get_secret_value") else value
        assert json.loads(default.strip("`")) == expected, name
        assert allowed and stage not in ("", "None") and meaning, name


def test_leap_ie_spellings_are_accepted():
    # leap-ie's page writes one option as "blur\\max"; its key is accepted for compatibility.
    assert load_config({"blur\\max": 0.5}).blur_max == 0.5
    assert load_config({"leap_api_key": "k"}).leap_api_key.get_secret_value() == "k"


def test_import_leapcore_pulls_in_no_pipeline_or_tracking_packages():
    code = (
        "import sys, leapcore, leapcore.engine, leapcore.results, leapcore.isolation, "
        "leapcore.hipe, leapcore.models\n"
        "banned = ('prefect', 'mlflow', 'wandb', 'tensorflow', 'keras')\n"
        "print(sorted({m.split('.')[0] for m in sys.modules if m.split('.')[0] in banned}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "[]", out.stdout
