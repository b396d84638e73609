"""Zoo names: the bundled ``efficientnet_lite0`` and torchvision / timm names, from local files only."""

from __future__ import annotations

from typing import Any

from leapcore.models import get_model, state_dict_digest
from leapcore.sources import LoadedModel, register_source


def _is_zoo_name(uri: str) -> bool:
    return "/" not in uri and ":" not in uri and "." not in uri or uri.startswith("hf-hub:")


@register_source("zoo", _is_zoo_name, "efficientnet_lite0 (bundled), torchvision and timm names")
def load_zoo(uri: str, pretrained: bool = True, source: str | None = None, **_: Any) -> LoadedModel:
    preprocessing, model, classes = get_model(uri, source=source, pretrained=pretrained)
    return LoadedModel(
        model=model,
        framework="pt",
        preprocessing=preprocessing,
        class_list=classes,
        input_shape=(3, 224, 224),
        digest=state_dict_digest(model.state_dict()),
        uri=uri,
        source="zoo",
    )
