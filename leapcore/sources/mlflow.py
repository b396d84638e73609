"""MLflow models: ``models:/name/version``, ``models:/name@alias``, ``runs:/<run_id>/<path>``.

Reads the ``pytorch`` flavor in both formats (``pt2``, MLflow 3's default, checked to be pickle-free;
``pickle`` only when trusted), and the ``keras`` / ``tensorflow`` flavors (Keras ``safe_mode``, or a
SavedModel). Class list, mean, std and input shape come from the model's ``leapcore`` metadata, as
:func:`tasks.mlflow_models.log_model_with_metadata` writes it (the pipeline side: this module only
reads); the input shape falls back to the model's signature.

Trust: a pickled model loads only with ``trusted=True``, or, for ``models:/`` URIs (models of the
tracking server you point MLflow at), with the environment setting
``LEAPCORE_TRUST_MLFLOW_REGISTRY=1``.

``mlflow`` is imported inside functions only: ``import leapcore`` never imports it.
"""

from __future__ import annotations

import importlib
import io
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from leapcore.errors import ModelSourceError, UntrustedSourceError
from leapcore.sources.adapters import keras_loaded, saved_model_loaded, torch_loaded
from leapcore.sources.base import LoadedModel, normalize_steps, register_source

log = logging.getLogger(__name__)

TRUST_REGISTRY_ENV = "LEAPCORE_TRUST_MLFLOW_REGISTRY"
METADATA_KEY = "leapcore"
_MODELS = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[^/]+)|@(?P<alias>[^/]+))?/?$")
_RUNS = re.compile(r"^runs:/(?P<run_id>[^/]+)/(?P<path>.+)$")


def is_mlflow_uri(uri: str) -> bool:
    return uri.startswith(("models:/", "runs:/"))


def registry_trusted() -> bool:
    """Whether ``LEAPCORE_TRUST_MLFLOW_REGISTRY`` says to trust ``models:/`` URIs."""
    return os.environ.get(TRUST_REGISTRY_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def redact_uri(uri: str) -> str:
    """``https://user:token@host/...`` -> ``https://***@host/...``: URIs go into messages."""
    return re.sub(r"(?<=://)[^/@]+@", "***@", str(uri))


def import_mlflow() -> Any:
    """``mlflow``, or a :class:`ModelSourceError` that says how to install it."""
    try:
        import mlflow
    except ImportError:
        raise ModelSourceError(
            "MLflow URIs need mlflow: pip install 'leapcore[pipeline]'."
        ) from None
    return mlflow


@register_source(
    "mlflow",
    is_mlflow_uri,
    "MLflow models:/name/version, models:/name@alias, runs:/<run_id>/<path> (pytorch pt2 / "
    "pickle, keras, tensorflow flavors)",
    priority=10,
)
def load_mlflow(
    uri: str,
    trusted: bool = False,
    tracking_uri: str | None = None,
    registry_uri: str | None = None,
) -> LoadedModel:
    """Load an MLflow model URI from the tracking server (the current one, or ``tracking_uri``).

    Raises:
        ModelSourceError: the model, version, alias, run or path does not exist (the message lists
            what does), or the flavor is not one leapcore reads.
        UntrustedSourceError: the model is pickled and neither ``trusted`` nor
            ``LEAPCORE_TRUST_MLFLOW_REGISTRY`` allows it.
    """
    mlflow = import_mlflow()
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri)
    server = redact_uri(tracking_uri or mlflow.get_tracking_uri())
    info = _resolve(client, uri, server)
    trust = trusted or (uri.startswith("models:/") and registry_trusted())
    with tempfile.TemporaryDirectory(prefix="leapcore-mlflow-") as tmp:
        try:
            # Registry URIs are downloaded from the version's own artifact URI: MLflow resolves
            # models:/ URIs with the global client, whatever tracking_uri says.
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=info.pop("download_uri", uri),
                dst_path=tmp,
                tracking_uri=tracking_uri,
                registry_uri=registry_uri,
            )
        except Exception as err:
            raise _not_found(client, uri, server, err) from None
        loaded = load_model_folder(Path(local), uri, trusted=trust, source="mlflow")
    loaded.metadata.update(info)
    loaded.metadata["tracking_uri"] = server
    return loaded


# ---------------------------------------------------------------------------------------------- #
# Resolving names, versions, aliases and runs, with errors that list what exists
# ---------------------------------------------------------------------------------------------- #
def _resolve(client: Any, uri: str, server: str) -> dict[str, Any]:
    from mlflow.exceptions import MlflowException

    models, runs = _MODELS.match(uri), _RUNS.match(uri)
    if models is None and runs is None:
        raise ModelSourceError(
            f"{uri!r} is not an MLflow model URI leapcore reads: use models:/<name>/<version>, "
            "models:/<name>@<alias> or runs:/<run_id>/<path>."
        )
    if runs is not None:
        run_id, path = runs["run_id"], runs["path"].strip("/")
        try:
            run = client.get_run(run_id)
        except MlflowException:
            raise ModelSourceError(f"MLflow has no run {run_id!r} on {server}.") from None
        found = {"run_id": run_id, "artifact_path": path}
        logged = [m for m in _run_models(client, run) if m.name == path]
        # MLflow 3 keeps a model logged in a run under the logged model; older ones in the run.
        found["download_uri"] = (
            logged[0].artifact_location if logged else f"{run.info.artifact_uri}/{path}"
        )
        return found
    name, version, alias = models["name"], models["version"], models["alias"]
    if name.startswith("m-") and version is None and alias is None:
        try:  # a logged model's id (MLflow 3), not a registry name
            location = client.get_logged_model(name).artifact_location
        except MlflowException:
            raise ModelSourceError(f"MLflow has no logged model {name!r} on {server}.") from None
        return {"model_id": name, "download_uri": location}
    try:
        registered = client.get_registered_model(name)
    except MlflowException:
        raise ModelSourceError(
            f"MLflow has no registered model {name!r} on {server}; registered models: "
            f"{_registered_names(client) or 'none'}."
        ) from None
    if alias is not None:
        aliases = dict(getattr(registered, "aliases", {}) or {})
        if alias not in aliases:
            known = ", ".join(f"{a} (version {v})" for a, v in sorted(aliases.items())) or "none"
            raise ModelSourceError(
                f"registered model {name!r} has no alias {alias!r}; its aliases: {known}."
            )
        version = str(aliases[alias])
    elif version is None:
        raise ModelSourceError(
            f"{uri!r} names no version: use models:/{name}/<version> or models:/{name}@<alias>."
        )
    elif version.isdigit():
        try:
            client.get_model_version(name, version)
        except MlflowException:
            versions = sorted(
                (int(v.version) for v in client.search_model_versions(f"name='{name}'")),
            )
            raise ModelSourceError(
                f"registered model {name!r} has no version {version}; its versions: "
                f"{', '.join(map(str, versions)) or 'none'}."
            ) from None
    found = {"registered_model": name, "version": version, "alias": alias}
    if version.isdigit():
        found["download_uri"] = client.get_model_version_download_uri(name, version)
    return found


def _registered_names(client: Any) -> str:
    try:
        return ", ".join(sorted(m.name for m in client.search_registered_models(max_results=20)))
    except Exception:
        return ""


def _not_found(client: Any, uri: str, server: str, err: Exception) -> ModelSourceError:
    runs = _RUNS.match(uri)
    if runs is not None:
        names = _run_model_names(client, runs["run_id"])
        listed = f"; models logged in this run: {', '.join(names)}" if names else ""
        return ModelSourceError(
            f"run {runs['run_id']} on {server} has no model at {runs['path']!r}{listed}."
        )
    return ModelSourceError(f"could not download {uri!r} from {server}: {str(err)[:300]}")


def _run_models(client: Any, run: Any) -> list[Any]:
    """The models logged in ``run`` (MLflow 3 logged models), newest first."""
    try:
        return list(
            client.search_logged_models(
                experiment_ids=[run.info.experiment_id],
                filter_string=f"source_run_id = '{run.info.run_id}'",
                order_by=[{"field_name": "creation_timestamp", "ascending": False}],
            )
        )
    except Exception:
        return []


def _run_model_names(client: Any, run_id: str) -> list[str]:
    try:
        return sorted({m.name for m in _run_models(client, client.get_run(run_id))})
    except Exception:
        return []


# ---------------------------------------------------------------------------------------------- #
# A downloaded (or local) MLflow model folder
# ---------------------------------------------------------------------------------------------- #
def load_model_folder(
    path: Path, uri: str, trusted: bool = False, source: str = "mlflow"
) -> LoadedModel:
    """Load a local MLflow model folder (one with an ``MLmodel`` file)."""
    import_mlflow()
    from mlflow.models import Model

    mlmodel = Model.load(str(path / "MLmodel"))
    meta = dict((mlmodel.metadata or {}).get(METADATA_KEY, {}) or {})
    flavors = mlmodel.flavors
    if "pytorch" in flavors:
        loaded = _load_pytorch_flavor(path, flavors["pytorch"], uri, trusted, source)
    elif "keras" in flavors or "tensorflow" in flavors:
        loaded = _load_tf_flavor(path, flavors, uri, trusted, source)
    elif "transformers" in flavors:
        from leapcore.sources.huggingface import load_transformers_flavor

        loaded = load_transformers_flavor(path, flavors["transformers"], uri, trusted, source)
    else:
        readable = ", ".join(sorted(f for f in flavors if f != "python_function")) or "pyfunc only"
        raise ModelSourceError(
            f"{uri} has MLflow flavor(s) {readable}; leapcore reads the pytorch, keras, "
            "tensorflow and transformers flavors."
        )
    _apply_metadata(loaded, meta, mlmodel, uri)
    return loaded


def _load_pytorch_flavor(
    path: Path, flavor: dict[str, Any], uri: str, trusted: bool, source: str
) -> LoadedModel:
    import torch

    from leapcore.sources.torch_files import is_torchscript, load_pt2, load_torchscript, zip_names

    data = path / flavor.get("model_data", "data")
    if (data / "model.pt2").is_file():
        model = load_pt2((data / "model.pt2").read_bytes(), uri, trusted)
        return torch_loaded(model, uri, source, {"format": "pt2"})
    pth = data / "model.pth"
    if not pth.is_file():
        raise ModelSourceError(
            f"{uri} is a pytorch model with neither data/model.pt2 nor model.pth."
        )
    raw = pth.read_bytes()
    names = zip_names(raw)
    if names is not None and is_torchscript(names):
        return torch_loaded(load_torchscript(raw), uri, source, {"format": "torchscript"})
    if not trusted:
        raise UntrustedSourceError(
            f"{uri} is saved in MLflow's pickle format (serialization_format='pickle'): "
            "unpickling it can run arbitrary code, so leapcore refused to load it. If you trust "
            "it, pass trusted=True (CLI: --trusted), or set "
            f"{TRUST_REGISTRY_ENV}=1 to trust the models:/ URIs of your own tracking server; or "
            "re-log it with serialization_format='pt2'."
        )
    info = data / "pickle_module_info.txt"
    module_name = info.read_text().strip() if info.is_file() else "pickle"
    log.warning("unpickling %s with %s because it is trusted", uri, module_name)
    model = torch.load(
        io.BytesIO(raw),
        map_location="cpu",
        weights_only=False,
        pickle_module=importlib.import_module(module_name),
    )
    return torch_loaded(model, uri, source, {"format": "pickle"})


def _load_tf_flavor(
    path: Path, flavors: dict[str, Any], uri: str, trusted: bool, source: str
) -> LoadedModel:
    if "keras" in flavors:  # Keras 3 flavor: data/model.keras, or an exported SavedModel
        flavor = flavors["keras"]
        data = path / flavor.get("data", "data")
        model_path = data / "model" if data.is_dir() else data
        if flavor.get("save_exported_model"):
            return saved_model_loaded(model_path, uri, trusted, source)
        return keras_loaded(Path(f"{model_path}.keras"), uri, trusted, source)
    flavor = flavors["tensorflow"]
    if flavor.get("model_type", "keras") == "keras":
        data = path / flavor.get("data", "data")
        for candidate in ("model.keras", "model.h5", "model"):
            if (data / candidate).exists():
                return keras_loaded(data / candidate, uri, trusted, source)
        raise ModelSourceError(f"{uri}: no Keras model file under {data}.")
    saved = path / flavor.get("saved_model_dir", "tf2model")
    return saved_model_loaded(saved, uri, trusted, source)


def _apply_metadata(loaded: LoadedModel, meta: dict[str, Any], mlmodel: Any, uri: str) -> None:
    if meta.get("class_list"):
        loaded.class_list = [str(c) for c in meta["class_list"]]
        loaded.metadata["class_list_from"] = f"the MLflow metadata of {uri}"
    if meta.get("mean") is not None or meta.get("std") is not None:
        loaded.mean = tuple(meta["mean"]) if meta.get("mean") is not None else None
        loaded.std = tuple(meta["std"]) if meta.get("std") is not None else None
        loaded.preprocessing = normalize_steps(loaded.mean, loaded.std)
    if meta.get("eval_transform"):
        loaded.metadata["eval_transform"] = dict(meta["eval_transform"])
    shape = meta.get("input_shape") or _signature_shape(mlmodel, loaded.layout)
    if shape:
        loaded.input_shape = tuple(int(s) for s in shape)  # type: ignore[assignment]


def _signature_shape(mlmodel: Any, layout: str) -> tuple[int, int, int] | None:
    try:
        shape = mlmodel.signature.inputs.inputs[0].shape
    except (AttributeError, IndexError, TypeError):
        return None
    if shape is None or len(shape) != 4 or any(int(s) < 1 for s in shape[1:]):
        return None
    _, a, b, c = (int(s) for s in shape)
    return (a, b, c) if layout == "NCHW" else (c, a, b)
