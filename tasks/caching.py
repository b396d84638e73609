"""Content-keyed caching of stages: what a stage computes depends only on what its key holds.

A stage's key is the SHA-256 of:

- the model: its weights digest and the identity of its source and load options;
- the config options the stage reads (:func:`stage_options`), never a secret;
- the content hashes of its input artifacts;
- any other plain argument (targets, the class chunk, the device);
- the stage function's own source, the leapcore version and a digest of the engine's code (every
  file of the ``leapcore`` package), so that a changed engine never serves results it no longer
  computes (a development checkout keeps its version number while its code moves).

So an identical re-run finds every stage in Prefect's result store (state ``Cached``), and changing
``max_steps`` changes only the keys of prototype optimisation and of what reads its artifacts.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext

from leapcore import __version__
from leapcore.config import (
    ALL,
    BASELINE,
    ENTANGLEMENT,
    ISOLATION,
    LR,
    PROTOTYPES,
    EngineConfig,
    options_for_stage,
    stage_name,
)
from leapcore.secrets import is_secret_name
from tasks.artifacts import ArtifactRef, ArtifactStore
from tasks.model import ModelLocator, ModelRef

# Bump when the shape of stage outputs changes, so older cached results are not reused.
KEY_FORMAT = 1

# Options that name, label or route a run but never change what a stage computes.
NOT_RESULTS = frozenset(
    {"leap_api_key", "wandb_api_key", "wandb_entity", "project_name", "output_dir", "samples"}
)
# Prototype options that the learning-rate range test and the equidistant baseline never read;
# every other prototype option shapes the objective they optimise, so it is in their keys.
LOOP_ONLY = frozenset({"max_steps", "log_freq", "always_update", "equalise"})

FETCH = "fetch_model"
SAMPLES = "samples"
SAMPLE_ISOLATION = "sample_isolation"
REPORT = "report"
ATTRIBUTION = "attribution"
TRANSFER = "transfer"
SPURIOUS = "spurious_scan"
DIFF = "diff"


def stage_options(stage: str, config: EngineConfig) -> list[str]:
    """The names of the config options that ``stage`` reads (secrets and labels left out)."""
    stage = stage_name(stage)
    shared = set(options_for_stage(ALL))
    objective = set(options_for_stage(PROTOTYPES)) - shared - LOOP_ONLY
    if stage == FETCH:
        names: set[str] = set()
    elif stage == LR:
        names = set(options_for_stage(LR)) | objective
    elif stage == BASELINE:
        names = set(options_for_stage(BASELINE))
        if config.use_baseline:
            names |= objective
    elif stage in (PROTOTYPES, ENTANGLEMENT):
        names = set(options_for_stage(stage))
    elif stage in (ISOLATION, SAMPLE_ISOLATION):
        names = set(options_for_stage(ISOLATION)) | {"log_freq"}
        if config.isolation_steps is None:
            names.add("max_steps")
    elif stage in (SAMPLES, ATTRIBUTION, TRANSFER):
        names = shared  # attribution's methods and their options are task arguments, in the key
    elif stage == SPURIOUS:  # extra prototypes (the prototype options) and occlusion evidence
        names = set(options_for_stage(PROTOTYPES)) | set(options_for_stage(ISOLATION)) | shared
    elif stage == DIFF:
        names = set()  # the diff reads tables and the two models, no engine option
    elif stage == REPORT:
        names = set(EngineConfig.model_fields)  # the report shows the whole (secret-free) config
        return sorted(n for n in names if not is_secret_name(n) and n != "samples")
    else:
        raise ValueError(f"unknown stage {stage!r}")
    return sorted(n for n in names if n not in NOT_RESULTS and not is_secret_name(n))


def key_value(stage: str, value: Any) -> Any:
    """The part of a task argument that goes into the cache key (JSON-able, no secrets)."""
    if isinstance(value, EngineConfig):
        dumped = value.model_dump(mode="json", include=set(stage_options(stage, value)))
        return {"config": dumped}
    if isinstance(value, ArtifactRef):
        return {"artifact": value.sha256, "schema": value.schema}
    if isinstance(value, ModelRef):
        return {"model": value.digest, "identity": value.identity}
    if isinstance(value, ModelLocator):
        return {"source": value.identity.key if value.identity else None}
    if isinstance(value, ArtifactStore):
        return {"store": value.uri}
    if hasattr(value, "key_parts"):
        return key_value(stage, value.key_parts())
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: key_value(stage, getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, dict):
        return {
            str(k): key_value(stage, v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))
        }
    if isinstance(value, (list, tuple)):
        return [key_value(stage, v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    # Tensors, models, open files: their hashes change from run to run, so they never go in a key.
    raise TypeError(
        f"a {type(value).__name__} cannot be part of a stage's cache key; pass an ArtifactRef."
    )


def source_digest(fn: Any) -> str:
    """SHA-256 of a function's source (falling back to its qualified name)."""
    fn = inspect.unwrap(fn)
    try:
        text = inspect.getsource(fn)
    except (OSError, TypeError):
        text = f"{fn.__module__}.{fn.__qualname__}"
    return hashlib.sha256(text.encode()).hexdigest()


@functools.cache
def engine_digest() -> str:
    """:func:`package_digest` of the installed ``leapcore`` package, computed once per process."""
    import leapcore

    return package_digest(Path(leapcore.__file__).parent)


def package_digest(root: Path) -> str:
    """SHA-256 of a package's sources and templates (``.py``, ``.html``, ``.json``) under ``root``."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix in (".py", ".html", ".json"):
            digest.update(path.relative_to(root).as_posix().encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def stage_key(stage: str, fn: Any, parameters: dict[str, Any]) -> str:
    """The cache key of one stage call."""
    parts = {
        "stage": stage,
        "format": KEY_FORMAT,
        "leapcore": __version__,
        "engine": engine_digest(),
        "source": source_digest(fn),
        "arguments": {name: key_value(stage, v) for name, v in sorted(parameters.items())},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


class StageKey:
    """A Prefect cache-key function for ``stage`` (named, so task options can show it)."""

    def __init__(self, stage: str):
        self.stage = stage
        self.__name__ = f"{stage}_cache_key"

    def __call__(self, context: TaskRunContext, parameters: dict[str, Any]) -> str:
        return stage_key(self.stage, context.task.fn, parameters)


def stage_cache_policy(stage: str) -> CachePolicy:
    """A Prefect cache policy keyed by :func:`stage_key`."""
    return CachePolicy.from_cache_key_fn(StageKey(stage))
