"""The config reference (docs/config.md), generated from :class:`~leapcore.config.EngineConfig`.

python -m leapcore.config_docs > docs/config.md
"""

from __future__ import annotations

import json
import sys
from typing import Any

from pydantic import SecretStr

from leapcore.config import PUBLISHER_KEYS, EngineConfig


def render_markdown() -> str:
    """The config reference, generated from :class:`EngineConfig` (docs/config.md)."""
    out = [
        "# Config reference",
        "",
        "Generated from `leapcore/config.py` by `python -m leapcore.config_docs > docs/config.md`; a test",
        "checks that this file matches the code. Pass options to `engine.generate(config=...)` as a dict",
        "or a JSON file path. Unknown options are rejected with the closest valid name.",
        "",
        "| option | default | allowed | stage | meaning |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, field in EngineConfig.model_fields.items():
        extra = field.json_schema_extra or {}
        default = field.default
        if isinstance(default, SecretStr):
            default = "****"
        allowed = _allowed(field)
        meaning = field.description or ""
        if extra.get("note"):
            meaning += f" *Note: {extra['note']}*"
        out.append(
            f"| `{name}` | `{json.dumps(default)}` | {allowed} | {extra.get('stage')} | {meaning} |"
        )
    out += [
        "",
        "## Keys handed to the publishers",
        "",
        "leap-ie's `generate` takes these for its W&B logging. They are not engine options: the config",
        "accepts them and keeps them aside (`config.publisher_options`) for the publisher that",
        "`generate` runs (entry point group `leapcore.publishers`); the pipeline reads them as",
        "`tasks.settings.WandbSettings`. Secrets are never shown, logged or stored.",
        "",
        "| key | publisher | meaning |",
        "| --- | --- | --- |",
    ]
    for name, (publisher, meaning) in PUBLISHER_KEYS.items():
        out.append(f"| `{name}` | {publisher} | {meaning} |")
    return "\n".join(out) + "\n"


def _allowed(field: Any) -> str:
    bounds = []
    for meta in field.metadata:
        for attr, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(meta, attr, None) is not None:
                bounds.append(f"{sym} {getattr(meta, attr)}")
    ann = field.annotation
    text = getattr(ann, "__name__", None) or str(ann).replace("typing.", "")
    text = text.replace("pydantic.types.", "").replace("|", "or")
    return (text + (" " + ", ".join(bounds) if bounds else "")).replace("|", "or")


if __name__ == "__main__":
    sys.stdout.write(render_markdown())
