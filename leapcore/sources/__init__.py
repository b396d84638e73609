"""Model sources: one registry of named sources, each turning a URI into a :class:`LoadedModel`.

``load_model("efficientnet_lite0")``, ``load_model("models:/name@alias")``,
``load_model("path/to/model.pt2")``: the first source (by priority) whose ``matches`` accepts the URI
loads it; ``source="file"`` forces one. Sources register with :func:`register_source`;
:func:`list_sources` names them.

Every source returns the same adapter: the model, its framework and input layout, the preprocessing
(mean and std), the input shape, the class list and a digest of the weights (the pipeline's cache
key). Options that every source takes (``class_list``, ``mean``, ``std``, ``input_shape``) override
what the source found; the model is then run once on a small input to check that its output width
matches the class list.

Loading never runs untrusted code: pickled models and Keras ``Lambda`` layers are refused with an
:class:`~leapcore.errors.UntrustedSourceError` unless ``trusted=True`` is passed (MLflow registry
models may also be trusted with ``LEAPCORE_TRUST_MLFLOW_REGISTRY=1``; see ``sources/mlflow.py``).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from leapcore.errors import ModelSourceError
from leapcore.sources.base import (
    COMMON_OPTIONS,
    SOURCES,
    LoadedModel,
    ModelSource,
    finish,
    normalize_steps,
    output_width,
    read_class_list,
    register_source,
)

__all__ = [
    "LoadedModel",
    "ModelSource",
    "describe_sources",
    "find_source",
    "finish",
    "list_sources",
    "load_model",
    "normalize_steps",
    "output_width",
    "read_class_list",
    "register_source",
]


def list_sources() -> list[str]:
    """The names of the registered sources."""
    _ensure_builtin()
    return sorted(SOURCES)


def describe_sources() -> dict[str, str]:
    """``{name: what it loads}`` for every registered source."""
    _ensure_builtin()
    return {name: SOURCES[name].description for name in sorted(SOURCES)}


def find_source(uri: str) -> str | None:
    """The name of the source that would load ``uri``, or None."""
    _ensure_builtin()
    for candidate in sorted(SOURCES.values(), key=lambda s: s.priority):
        if candidate.matches(uri):
            return candidate.name
    return None


def load_model(uri: str | Path, source: str | None = None, **options: Any) -> LoadedModel:
    """Load ``uri`` with the named ``source``, or the first registered source that matches it.

    Args:
        uri: a zoo name, an MLflow URI or a model file/folder path.
        source: force one source (see :func:`list_sources`).
        **options: ``class_list`` (a list, or a ``.txt`` file with one name a line, or a ``.json``
            list), ``mean``, ``std``, ``input_shape`` (``(C, H, W)``) override what the source found;
            ``check=False`` skips the trial forward pass; ``trusted=True`` allows pickles and Keras
            ``Lambda`` layers; other options belong to one source (e.g. ``arch`` for weight files).

    Raises:
        ModelSourceError: unknown source name (the known ones are listed), no source matches, the
            model cannot be found or read, or its output width disagrees with the class list.
        UntrustedSourceError: loading would unpickle or run code and ``trusted`` was not set.
    """
    _ensure_builtin()
    uri = str(uri)
    if source is not None:
        if source not in SOURCES:
            raise ModelSourceError(
                f"unknown model source {source!r}; known sources: {', '.join(list_sources())}."
            )
        chosen = SOURCES[source]
    else:
        name = find_source(uri)
        if name is None:
            raise ModelSourceError(
                f"no model source matches {uri!r}. Give a zoo name (efficientnet_lite0, a torchvision "
                "or timm name, hf-hub:org/name), a transformers id (hf:org/name), an MLflow URI (models:/name/version, "
                "models:/name@alias, runs:/<run_id>/<path>) or the path of an existing model file or "
                f"folder. Known sources: {', '.join(list_sources())}."
            )
        chosen = SOURCES[name]
    common = {k: options.pop(k) for k in COMMON_OPTIONS if k in options}
    if "trusted" in options and "trusted" not in inspect.signature(chosen.load).parameters:
        options.pop("trusted")  # a source that never runs code from files has nothing to trust
    _check_options(chosen, options)
    loaded = chosen.load(uri, **options)
    return finish(loaded, **common)


def _check_options(chosen: ModelSource, options: dict[str, Any]) -> None:
    params = inspect.signature(chosen.load).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    accepted = [n for n in params if n != "uri"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ModelSourceError(
            f"source {chosen.name!r} takes no option {', '.join(map(repr, unknown))}; its options: "
            f"{', '.join(accepted + list(COMMON_OPTIONS))}."
        )


def _ensure_builtin() -> None:
    # Importing the modules registers them; mlflow and tensorflow are imported only when loading.
    from leapcore.sources import files, huggingface, mlflow, zoo  # noqa: F401
