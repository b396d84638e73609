"""W&B tables of the analysis stages' Arrow tables (``tasks.analysis``), one per table role.

A stage registers how its table is drawn with ``@wandb_table("<role>")``: ``fn(wandb, table, audit)
-> wandb.Table``, where ``audit`` is the report's :class:`leapcore.report.Audit` (its prototypes,
samples, ...). A role without one is converted as it is: one W&B column per Arrow column, PNG bytes
as ``wandb.Image``, lists and structs as JSON text.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Mapping
from typing import Any

import pyarrow as pa
from PIL import Image

TableFn = Callable[[Any, pa.Table, Any], Any]
WANDB_TABLES: dict[str, TableFn] = {}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def wandb_table(role: str) -> Callable[[TableFn], TableFn]:
    """Register ``fn(wandb, table, audit) -> wandb.Table`` for the Arrow tables of ``role``."""

    def register(fn: TableFn) -> TableFn:
        WANDB_TABLES[role] = fn
        return fn

    return register


def _cell(wandb: Any, value: Any) -> Any:
    if isinstance(value, bytes) and value.startswith(PNG_MAGIC):
        return wandb.Image(Image.open(io.BytesIO(value)))
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if isinstance(value, (list, dict)):
        return json.dumps(value, default=str)
    return value


def generic_table(wandb: Any, table: pa.Table, audit: Any = None) -> Any:
    """``table`` as a ``wandb.Table``: PNG cells as images, lists and structs as JSON text."""
    out = wandb.Table(columns=list(table.column_names))
    for row in table.to_pylist():
        out.add_data(*[_cell(wandb, row[c]) for c in table.column_names])
    return out


def analysis_tables(wandb: Any, tables: Mapping[str, pa.Table], audit: Any) -> dict[str, Any]:
    """The W&B tables of every analysis-stage table in ``tables`` (by role)."""
    from tasks.analysis import load_stages

    roles = {role for stage in load_stages() for role in stage.tables} | set(WANDB_TABLES)
    return {
        role: WANDB_TABLES.get(role, generic_table)(wandb, tables[role], audit)
        for role in sorted(roles)
        if role in tables
    }
