"""Hugging Face ``transformers`` image classifiers and segmenters (ViT, DeiT, BEiT, Swin, ConvNeXt,
SegFormer, ...).

Where from:
- a local ``save_pretrained`` folder (``config.json`` with ``transformers_version``; the ``file``
  source hands such folders here);
- the local Hugging Face cache: ``hf:org/name`` or ``huggingface:org/name`` (``@revision`` allowed),
  read with ``HF_HUB_OFFLINE`` semantics: never the network, a clear error when not cached;
- MLflow's ``transformers`` flavor (``models:/...``; ``sources/mlflow.py`` hands the folder here).

What leapcore takes from the folder: the class names from ``config.id2label``; the preprocessing
(mean, std, input size) from the saved image processor (``preprocessor_config.json``). Without an
image processor the fallback (no normalisation, the config's ``image_size``) is logged and written
to ``metadata["preprocessing"]``. Loading never runs code from the folder: weights are read from
``model.safetensors`` only and ``trust_remote_code`` stays off, unless ``trusted=True``.
``transformers`` is imported only when a model is loaded (``pip install 'leapcore[hf]'``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from leapcore.errors import ModelSourceError, UntrustedSourceError
from leapcore.preprocess import image_processor_spec
from leapcore.sources.base import (
    LoadedModel,
    hub_offline,
    normalize_steps,
    register_source,
    state_dict_digest,
)

log = logging.getLogger(__name__)

PREFIXES = ("hf:", "huggingface:")
NO_PROCESSOR = (
    "no image processor saved with the model (preprocessor_config.json): leapcore falls back to "
    "no normalisation (pixel values in [0, 1] go in as they are) at the config's image_size; pass "
    "mean=..., std=... if the model was trained with normalised inputs"
)


def is_hf_id(uri: str) -> bool:
    return uri.startswith(PREFIXES)


def is_transformers_folder(path: Path) -> bool:
    """A ``save_pretrained`` folder: its ``config.json`` names a ``transformers_version``."""
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        return "transformers_version" in json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ModelSourceError(
            "Hugging Face models need the transformers package: pip install 'leapcore[hf]'."
        ) from None
    return transformers


@register_source(
    "huggingface",
    is_hf_id,
    "Hugging Face transformers image classifiers / segmenters: hf:org/name from the local cache, "
    "save_pretrained folders",
    priority=15,
)
def load_huggingface(uri: str, trusted: bool = False) -> LoadedModel:
    """Load a transformers model from the local cache (``hf:org/name[@revision]``) or a folder.

    Args:
        uri: ``hf:org/name``, ``huggingface:org/name`` (``@revision`` optional) or a folder path.
        trusted: allow ``pytorch_model.bin`` (a pickle) and ``trust_remote_code``.

    Raises:
        ModelSourceError: not in the local cache (where it must go is said), or not a model.
        UntrustedSourceError: only pickled weights, or the model needs remote code, without trusted.
    """
    if is_hf_id(uri):
        return load_transformers_folder(cached_folder(uri), uri, trusted, "huggingface")
    return load_transformers_folder(Path(uri).expanduser(), uri, trusted, "huggingface")


def cached_folder(uri: str) -> Path:
    """The snapshot folder of ``hf:org/name[@revision]`` in the local cache; never downloads."""
    repo = uri.split(":", 1)[1]
    repo, _, revision = repo.partition("@")
    from huggingface_hub import snapshot_download

    try:
        with hub_offline():
            folder = snapshot_download(repo, revision=revision or None, local_files_only=True)
    except Exception as err:  # LocalEntryNotFoundError, OfflineModeIsEnabled, bad repo ids
        from huggingface_hub import constants

        raise ModelSourceError(
            f"{uri}: {repo!r} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and "
            "leapcore never downloads (HF_HUB_OFFLINE). Copy the model there from a machine with "
            "network access (huggingface-cli download, or the models--org--name folder), or pass "
            f"the path of a save_pretrained folder. ({type(err).__name__})"
        ) from None
    return Path(folder)


def load_transformers_folder(
    path: Path,
    uri: str,
    trusted: bool = False,
    source: str = "huggingface",
    processor_dir: Path | None = None,
) -> LoadedModel:
    """A ``save_pretrained`` folder -> :class:`LoadedModel` (class names, preprocessing, digest).

    ``processor_dir``: where the image processor was saved, when not in ``path`` (MLflow).
    """
    if not (path / "config.json").is_file():
        raise ModelSourceError(f"{uri}: {path} holds no config.json; not a transformers model.")
    raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    if raw.get("auto_map") and not trusted:
        raise UntrustedSourceError(
            f"{uri} needs remote code (config.json has auto_map: {sorted(raw['auto_map'])}), which "
            "would run Python from the model's folder. Pass trusted=True only if you trust it."
        )
    safetensors = any(path.glob("*.safetensors"))
    if not safetensors and not trusted:
        pickled = sorted(p.name for p in path.glob("*.bin"))
        raise UntrustedSourceError(
            f"{uri} has no .safetensors weights ({', '.join(pickled) or 'no weights at all'}); "
            "pickled weights can run code when loaded. Convert them to safetensors or pass "
            "trusted=True."
        )
    transformers = _transformers()
    task = _task(raw)
    auto = (
        transformers.AutoModelForSemanticSegmentation
        if task == "segmentation"
        else transformers.AutoModelForImageClassification
    )
    try:
        model = auto.from_pretrained(
            str(path),
            trust_remote_code=bool(trusted),
            use_safetensors=True if not trusted else None,
            local_files_only=True,
        )
    except Exception as err:
        raise ModelSourceError(
            f"{uri}: transformers could not load {path} as an image {task} model: "
            f"{type(err).__name__}: {str(err)[:300]}"
        ) from err
    model.eval()
    mean, std, shape, note, spec = _preprocessing(processor_dir or path, model.config, transformers)
    if note:
        log.warning("%s: %s", uri, note)

    id2label = getattr(model.config, "id2label", None) or {}
    classes = [str(id2label[k]) for k in sorted(id2label, key=int)] if id2label else []
    metadata: dict[str, Any] = {
        "format": "transformers",
        "architecture": type(model).__name__,
        "task": task,
        "preprocessing": note or "from the saved image processor",
        "class_list_from": "config.id2label",
    }
    if spec:
        metadata["eval_transform"] = spec
    return LoadedModel(
        model=model,
        framework="pt",
        preprocessing=normalize_steps(mean, std),
        class_list=classes,
        input_shape=shape,
        digest=state_dict_digest(model.state_dict()),
        uri=uri,
        source=source,
        metadata=metadata,
        mean=mean,
        std=std,
    )


def _task(raw: dict[str, Any]) -> str:
    names = " ".join(raw.get("architectures") or [])
    if (
        "SemanticSegmentation" in names
        or raw.get("model_type") in ("segformer", "dpt")
        and ("ForImageClassification" not in names)
    ):
        return "segmentation"
    return "classification"


def _preprocessing(
    path: Path, config: Any, transformers: Any
) -> tuple[tuple | None, tuple | None, tuple[int, int, int], str, dict | None]:
    """``(mean, std, (C, H, W), fallback note, eval-transform spec)`` from the saved image
    processor, else the config (and no eval transform)."""
    channels = int(getattr(config, "num_channels", 3) or 3)
    size = getattr(config, "image_size", 224)
    size = size if isinstance(size, int) else 224
    if not (path / "preprocessor_config.json").is_file():
        return None, None, (channels, size, size), NO_PROCESSOR, None
    processor = transformers.AutoImageProcessor.from_pretrained(
        str(path), local_files_only=True, trust_remote_code=False
    )
    h = w = size
    wanted = getattr(processor, "size", None) or {}
    if isinstance(wanted, dict) or hasattr(wanted, "get"):
        h = int(wanted.get("height") or wanted.get("shortest_edge") or h)
        w = int(wanted.get("width") or wanted.get("shortest_edge") or w)
    mean = std = None
    if getattr(processor, "do_normalize", True):
        mean = tuple(float(v) for v in processor.image_mean)
        std = tuple(float(v) for v in processor.image_std)
    return mean, std, (channels, h, w), "", image_processor_spec(processor, path.name)


def load_transformers_flavor(
    path: Path, flavor: dict[str, Any], uri: str, trusted: bool, source: str
) -> LoadedModel:
    """MLflow's ``transformers`` flavor: the model's ``save_pretrained`` folder sits under
    ``model_binary`` (default ``model``), the image processor under ``components/``."""
    folder = path / flavor.get("model_binary", "model")
    if not folder.is_dir():
        raise ModelSourceError(
            f"{uri} has the transformers flavor but no model folder {folder.name!r} (a model "
            "logged with save_pretrained=False is only a reference to the Hub; leapcore never "
            "downloads)."
        )
    processor = path / "components" / "image_processor"
    if processor.is_dir() and not (folder / "preprocessor_config.json").is_file():
        return load_transformers_folder(folder, uri, trusted, source, processor)
    return load_transformers_folder(folder, uri, trusted, source)
