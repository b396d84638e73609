"""What every model source shares: the adapter (:class:`LoadedModel`), the registry that sources
join with :func:`register_source`, class lists, preprocessing, the weights digest and the trial
forward pass. The source modules import this module, never the package (whose
:func:`~leapcore.sources.load_model` picks a source), so no source needs another to load.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from leapcore.errors import ModelOutputError, ModelSourceError
from leapcore.preprocess import Normalize

log = logging.getLogger(__name__)

COMMON_OPTIONS = ("class_list", "mean", "std", "input_shape", "check")


@dataclass
class LoadedModel:
    """A model and what leapcore knows about it (the adapter the engine and pipeline use).

    Attributes:
        model: a torch module, or a Keras model / TensorFlow callable when ``framework == "tf"``.
        framework: ``"pt"`` or ``"tf"`` (the engine's ``mode``).
        preprocessing: callables applied inside the graph (pixel values in [0, 1] go in); for both
            frameworks a torch ``Normalize`` built from ``mean``/``std``, applied to NCHW pixels.
        class_list: one name per output.
        input_shape: ``(C, H, W)`` whatever the layout.
        digest: content digest of the weights (the pipeline's cache key).
        uri: what was asked for.
        source: the name of the source that loaded it.
        layout: ``"NCHW"`` or ``"NHWC"`` (the model's own input layout).
        metadata: anything else the source found (registry name/version/alias, run id, file format).
        mean: per-channel mean of the preprocessing, when known.
        std: per-channel std of the preprocessing, when known.
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
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @property
    def mode(self) -> str:
        return self.framework


@dataclass
class ModelSource:
    name: str
    matches: Callable[[str], bool]
    load: Callable[..., LoadedModel]
    description: str = ""
    priority: int = 50


SOURCES: dict[str, ModelSource] = {}


def register_source(
    name: str, matches: Callable[[str], bool], description: str = "", priority: int = 50
) -> Callable:
    """Decorator: register ``load(uri, **options) -> LoadedModel`` under ``name``.

    Sources with a lower ``priority`` are asked first when no source is named.
    """

    def wrap(load: Callable[..., LoadedModel]) -> Callable[..., LoadedModel]:
        SOURCES[name] = ModelSource(name, matches, load, description, priority)
        return load

    return wrap


# ---------------------------------------------------------------------------------------------- #
# What every source shares: class lists, preprocessing, the trial forward pass
# ---------------------------------------------------------------------------------------------- #
def read_class_list(value: Any) -> list[str]:
    """A list of names, or a file: ``.json`` (a list, or ``{"class_list": [...]}``) or text (one a line)."""
    if isinstance(value, (str, Path)):
        path = Path(value)
        if not path.is_file():
            raise ModelSourceError(
                f"class_list {str(value)!r} is not a file; pass a list of names or the path of a "
                ".txt file (one name a line) or a .json list."
            )
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".json":
            data = json.loads(text)
            if isinstance(data, dict):
                data = data.get("class_list", data.get("classes"))
            if not isinstance(data, list):
                raise ModelSourceError(
                    f"{path} holds no list of class names (expected a JSON list or "
                    '{"class_list": [...]}).'
                )
            return [str(c) for c in data]
        return [line.strip() for line in text.splitlines() if line.strip()]
    if isinstance(value, Sequence) and len(value) > 0:
        return [str(c) for c in value]
    raise ModelSourceError(
        "class_list must be a non-empty list of names or the path of a .txt/.json file."
    )


def normalize_steps(mean: Sequence[float] | None, std: Sequence[float] | None) -> list[Callable]:
    """``[Normalize(mean, std)]`` (torch, NCHW; the TF bridge runs it before the model), or ``[]``."""
    if mean is None and std is None:
        return []
    channels = len(mean) if mean is not None else len(std)
    mean = tuple(float(m) for m in mean) if mean is not None else (0.0,) * channels
    std = tuple(float(s) for s in std) if std is not None else (1.0,) * channels
    return [Normalize(mean, std)]


def _shape(value: Any) -> tuple[int, int, int]:
    shape = tuple(int(v) for v in value)
    if len(shape) != 3:
        raise ModelSourceError(f"input_shape must be (C, H, W), got {list(shape)}.")
    return shape  # type: ignore[return-value]


def finish(
    loaded: LoadedModel,
    class_list: Any = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    input_shape: Sequence[int] | None = None,
    check: bool = True,
) -> LoadedModel:
    """Apply the user's overrides, then check the model's output width against the class list."""
    if input_shape is not None:
        loaded.input_shape = _shape(input_shape)
    if mean is not None or std is not None:
        loaded.mean = tuple(mean) if mean is not None else loaded.mean
        loaded.std = tuple(std) if std is not None else loaded.std
        loaded.preprocessing = normalize_steps(loaded.mean, loaded.std)
    where = loaded.metadata.get("class_list_from", f"the {loaded.source} source")
    if class_list is not None:
        loaded.class_list = read_class_list(class_list)
        where = "the class_list option"
    if check:
        width = output_width(loaded)
        if not loaded.class_list:
            log.warning(
                "%s has no class list; naming its %d outputs '0'..'%d'. Pass class_list=[...].",
                loaded.uri,
                width,
                width - 1,
            )
            loaded.class_list = [str(i) for i in range(width)]
        elif width != len(loaded.class_list):
            raise ModelSourceError(
                f"{loaded.uri} returns {width} outputs but the class list from {where} has "
                f"{len(loaded.class_list)} names; pass class_list with one name per output."
            )
    return loaded


def output_width(loaded: LoadedModel) -> int:
    """Run the model once on a mid-grey batch of one and return the width of its logits."""
    c, h, w = loaded.input_shape
    try:
        if loaded.framework == "tf":
            from leapcore.frameworks.tensorflow import keras_output

            out = keras_output(loaded.model, (1, h, w, c))
        else:
            from leapcore.adapter import unwrap_logits

            x = torch.full((1, c, h, w), 0.5)
            for step in loaded.preprocessing:
                x = step(x)
            with torch.no_grad():
                out = unwrap_logits(loaded.model(x))
    except ModelOutputError:
        raise
    except Exception as err:
        raise ModelSourceError(
            f"{loaded.uri} did not run on an input of shape (C, H, W) = {loaded.input_shape}: "
            f"{type(err).__name__}: {str(err)[:300]}. Pass input_shape=(C, H, W) if the model "
            "takes another size."
        ) from err
    if out.ndim == 4:  # a segmentation map: classes first (torch) or last (Keras)
        return int(out.shape[3] if loaded.framework == "tf" else out.shape[1])
    if out.ndim != 2:
        raise ModelSourceError(
            f"{loaded.uri} returns shape {list(out.shape)} for one image; expected logits "
            "[batch, classes] (or [batch, classes, H, W] from a segmentation model). Wrap the model "
            "so that it returns class logits."
        )
    return int(out.shape[1])


def state_dict_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """A content digest of weights (names, shapes and values): the pipeline's cache key for a model."""
    h = hashlib.sha256()
    for name, tensor in state_dict.items():
        h.update(name.encode())
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Hugging Face Hub offline mode for the call: the cache or an error at once, never the network.

    ``HF_HUB_OFFLINE`` is read when ``huggingface_hub`` is imported, usually before leapcore can set
    it, so the module's flag is set for the call and restored afterwards.
    """
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous
