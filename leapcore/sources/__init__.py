"""Model sources: one registry of named sources, each turning a URI into a :class:`LoadedModel`.

``load_model("efficientnet_lite0")``, ``load_model("models:/name@alias")``, ``load_model("path/to/model.pt2")``:
the first source whose ``matches`` accepts the URI loads it. Sources register with
:func:`register_source`; :func:`list_sources` names them. Loading never runs untrusted code: pickles
and Keras ``Lambda`` layers need ``trusted=True`` (see each source).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from leapcore.errors import ModelSourceError


@dataclass
class LoadedModel:
    """A model and what leapcore knows about it (the adapter the engine and pipeline use).

    Attributes:
        model: a torch module, or a Keras model when ``framework == "tf"``.
        framework: ``"pt"`` or ``"tf"``.
        preprocessing: callables applied inside the graph (pixel values in [0, 1] go in).
        class_list: one name per output.
        input_shape: ``(C, H, W)``.
        layout: ``"NCHW"`` or ``"NHWC"`` (the model's own input layout).
        digest: content digest of the weights (the pipeline's cache key).
        uri: what was asked for.
        source: the name of the source that loaded it.
        metadata: anything else the source found (registry name/version/alias, run id, ...).
    """

    model: Any
    framework: str
    preprocessing: list[Callable]
    class_list: list[str]
    input_shape: tuple[int, int, int]
    digest: str
    uri: str
    source: str
    layout: str = "NCHW"
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def mode(self) -> str:
        return self.framework


@dataclass
class ModelSource:
    name: str
    matches: Callable[[str], bool]
    load: Callable[..., LoadedModel]
    description: str = ""


_SOURCES: dict[str, ModelSource] = {}


def register_source(name: str, matches: Callable[[str], bool], description: str = "") -> Callable:
    """Decorator: register ``load(uri, **options) -> LoadedModel`` under ``name``."""

    def wrap(load: Callable[..., LoadedModel]) -> Callable[..., LoadedModel]:
        _SOURCES[name] = ModelSource(name, matches, load, description)
        return load

    return wrap


def list_sources() -> list[str]:
    _ensure_builtin()
    return sorted(_SOURCES)


def load_model(uri: str, source: str | None = None, **options: Any) -> LoadedModel:
    """Load ``uri`` with the named ``source``, or the first registered source that matches it.

    Raises:
        ModelSourceError: unknown source name (the known ones are listed) or no source matches.
    """
    _ensure_builtin()
    if source is not None:
        if source not in _SOURCES:
            raise ModelSourceError(f"unknown model source {source!r}; known sources: {', '.join(list_sources())}.")
        return _SOURCES[source].load(uri, **options)
    for candidate in _SOURCES.values():
        if candidate.matches(uri):
            return candidate.load(uri, **options)
    raise ModelSourceError(
        f"no model source matches {uri!r}. Give a zoo name (efficientnet_lite0, a torchvision or timm "
        "name), an MLflow URI (models:/name/version, models:/name@alias, runs:/<run_id>/<path>) or a "
        f"model file path. Known sources: {', '.join(list_sources())}."
    )


def _ensure_builtin() -> None:
    # Importing the modules registers them; the MLflow one imports mlflow only when it loads.
    from leapcore.sources import zoo  # noqa: F401
