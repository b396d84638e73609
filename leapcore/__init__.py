"""leapcore: prototypes, entanglement and feature isolation for image classifiers, with no account.

``from leapcore import engine; df, results = engine.generate(...)`` is a drop-in for leap-ie.
The engine imports neither Prefect, MLflow nor W&B.
"""

__version__ = "0.1.0"

from leapcore import engine  # noqa: E402
from leapcore.config import EngineConfig, load_config  # noqa: E402
from leapcore.errors import (  # noqa: E402
    ConfigError,
    InputError,
    LeapError,
    ModelOutputError,
    ModelSourceError,
    NonFiniteError,
    UntrustedSourceError,
)

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
