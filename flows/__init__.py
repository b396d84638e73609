"""Prefect flows: ``audit_model`` (the whole audit of a model) and ``explain_samples`` (isolation on
the user's images), plus the audit requesters of ``flows.hooks`` and ``flows.registry_watch``.

Names are imported on first use, so ``from flows import request_audit`` does not import the
pipeline and ``import flows`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "audit_model": "flows.audit",
    "audit_stages": "flows.audit",
    "plan_stages": "flows.audit",
    "explain_samples": "flows.explain",
    "request_audit": "flows.hooks",
    "watch_registry": "flows.registry_watch",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'flows' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
