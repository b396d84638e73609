"""leapcore: prototypes, entanglement and feature isolation for image classifiers, with no account.

``from leapcore import engine; df, results = engine.generate(...)`` is a drop-in for leap-ie.
The engine imports neither Prefect, MLflow nor W&B.

``engine``, ``EngineConfig`` and ``load_config`` are imported on first use (PEP 562), so
``import leapcore`` (and ``leap --help``) does not import PyTorch or pandas.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from leapcore.errors import (  # noqa: E402 (errors import nothing heavy)
    ConfigError,
    InputError,
    LeapError,
    ModelOutputError,
    ModelSourceError,
    NonFiniteError,
    UntrustedSourceError,
)

_LAZY = {
    "engine": ("leapcore.engine", None),
    "EngineConfig": ("leapcore.config", "EngineConfig"),
    "load_config": ("leapcore.config", "load_config"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'leapcore' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "ConfigError",
    "EngineConfig",
    "InputError",
    "LeapError",
    "ModelOutputError",
    "ModelSourceError",
    "NonFiniteError",
    "UntrustedSourceError",
    "__version__",
    "engine",
    "load_config",
]
