"""``attribute``: every registered method behind one call, batched over images x targets.

The public function validates once (methods, options, layers, targets, images, framework) and then
runs each method over chunks of (image, target) pairs sized by the memory budget. Maps come back
signed, at the input's resolution, on the host, with the wall-clock seconds each method took.
"""

from __future__ import annotations

import contextlib
import difflib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from leapcore.adapter import LogitsModel, Preprocessing, unwrap_logits
from leapcore.attribution.registry import METHODS, MethodSpec, get_method, list_methods
from leapcore.device import chunk_size_for
from leapcore.errors import InputError

COMMON_OPTIONS = ("batch_size", "memory_budget_mb", "preprocessing", "class_list", "layer")
Targets = int | Sequence[int] | Sequence[Sequence[int]]


@dataclass
class AttributionResult:
    """Signed maps of every (image, target) pair and method.

    Attributes:
        image_index: ``[P]`` image of each pair.
        targets: ``[P]`` class of each pair.
        maps: method -> ``[P, H, W]`` float32 maps at the input's resolution (host).
        seconds: method -> wall-clock seconds for all pairs (device work included).
        extras: method -> name -> tensor with a leading ``[P]`` axis (e.g. CRP's concept ids and
            concept heatmaps, internal influence per unit).
    """

    image_index: torch.Tensor
    targets: torch.Tensor
    maps: dict[str, torch.Tensor]
    seconds: dict[str, float]
    extras: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    @property
    def methods(self) -> list[str]:
        """Method names in the order they ran."""
        return list(self.maps)

    def map(self, method: str, image: int, target: int) -> torch.Tensor:
        """The ``[H, W]`` map of one image and target."""
        hit = (self.image_index == image) & (self.targets == target)
        if not bool(hit.any()):
            raise KeyError(f"no pair (image {image}, target {target}) in this result")
        return self.maps[method][int(hit.nonzero()[0, 0])]


@dataclass
class MethodContext:
    """What a method's ``compute`` gets besides the batch."""

    model: LogitsModel
    options: dict[str, Any]
    rows: int
    framework: str

    @property
    def network(self) -> nn.Module:
        """The torch module behind the adapter (preprocessing not included)."""
        return self.model.model

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """The adapter's preprocessing of pixel images (identity without one)."""
        return self.model.preprocess(images) if self.model.preprocess is not None else images

    def layer(self, name: str | None = None) -> nn.Module:
        """The network's module called ``name`` (default: the ``layer`` option)."""
        return find_layer(self.network, name if name is not None else self.options.get("layer"))


def find_layer(network: nn.Module, name: str | None) -> nn.Module:
    """Look a module up by its dotted name; an unknown name lists the model's names near it."""
    names = dict(network.named_modules())
    if name is None:
        raise InputError(
            "this method needs a layer: pass layer='<module name>'; the model's last convolution "
            f"layers are {_last_convs(network)}."
        )
    if name in names and name != "":
        return names[name]
    close = difflib.get_close_matches(name, [n for n in names if n], n=5, cutoff=0.4)
    prefix = name.rsplit(".", 1)[0]
    siblings = [n for n in names if n.startswith(prefix + ".")][:8] if "." in name else []
    parents = [n for n in names if n and name.startswith(n + ".")][::-1]
    near = list(dict.fromkeys(parents + close + siblings)) or [n for n in names if n][:10]
    raise InputError(f"the model has no layer {name!r}; layers near it: {', '.join(near)}.")


def _last_convs(network: nn.Module) -> list[str]:
    convs = [n for n, m in network.named_modules() if isinstance(m, nn.Conv2d)]
    return convs[-3:]


def expand_targets(targets: Targets, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(image_index, target)`` pairs: one int for all, one per image, or a list per image."""
    if isinstance(targets, int):
        per_image: list[list[int]] = [[targets]] * count
    elif isinstance(targets, torch.Tensor) and targets.ndim == 0:
        per_image = [[int(targets)]] * count
    else:
        items = list(targets.tolist() if isinstance(targets, torch.Tensor) else targets)
        if len(items) != count:
            raise InputError(
                f"targets has {len(items)} entries for {count} images; pass one per image."
            )
        per_image = [[int(t)] if isinstance(t, int) else [int(v) for v in t] for t in items]
    images = [i for i, ts in enumerate(per_image) for _ in ts]
    flat = [t for ts in per_image for t in ts]
    if not flat:
        raise InputError("targets is empty: pass at least one class index per image.")
    return torch.tensor(images, dtype=torch.long), torch.tensor(flat, dtype=torch.long)


def _is_tensorflow(model: Any) -> bool:
    root = type(model).__module__.split(".")[0]
    return root in ("keras", "tensorflow", "tf_keras")


def as_logits_model(
    model: Any,
    images: torch.Tensor,
    preprocessing: Preprocessing = None,
    class_list: Sequence[str] | None = None,
) -> LogitsModel:
    """The adapter for ``model``: itself if it is one, the TensorFlow bridge for Keras, else torch."""
    if isinstance(model, LogitsModel):
        # Hooks and composites go on the user's modules, so the adapter must call those modules and
        # not a batch-norm-folded copy; the layout stays the usual one for the same reason.
        return LogitsModel(
            model.model, model.num_classes, model.preprocess, model.input_shape, False, False
        )
    shape = tuple(images.shape[1:])
    if _is_tensorflow(model):
        from leapcore.frameworks.tensorflow import keras_logits_model

        if class_list is None:
            raise InputError("a TensorFlow model needs class_list=[...] (one name per output).")
        return keras_logits_model(model, len(class_list), preprocessing, shape)  # type: ignore[arg-type]
    if not isinstance(model, nn.Module):
        raise InputError(
            f"model must be a torch.nn.Module or a Keras model, not {type(model).__name__}."
        )
    if class_list is None:
        wrapped = LogitsModel(
            model, 1, preprocessing, shape, channels_last=False, fold_batchnorm=False
        )
        with torch.no_grad(), inference_mode_switch(model):
            probe = images[:1].to(_device(model) or images.device)
            pre = wrapped.preprocess(probe) if wrapped.preprocess is not None else probe
            num_classes = unwrap_logits(model(pre)).shape[-1]
    else:
        num_classes = len(class_list)
    return LogitsModel(
        model, num_classes, preprocessing, shape, channels_last=False, fold_batchnorm=False
    )


@contextlib.contextmanager
def inference_mode_switch(model: nn.Module) -> Iterator[None]:
    """Eval mode for the call, restored afterwards (also on error).

    Only modules in training mode are touched, by their flag (``Module.train`` recurses, which makes
    restoring every module quadratic in the depth of big models).
    """
    switched = [m for m in model.modules() if m.training]
    for m in switched:
        m.training = False
    try:
        yield
    finally:
        for m in switched:
            m.training = True


def _device(model: nn.Module) -> torch.device | None:
    first = next(model.parameters(), None)
    if first is None:
        first = next(model.buffers(), None)
    return first.device if first is not None else None


def framework_of(model: LogitsModel) -> str:
    """``"tf"`` for the TensorFlow gradient bridge, else ``"pt"``."""
    return "tf" if type(model.model).__name__ == "KerasBridge" else "pt"


def check_images(images: Any) -> torch.Tensor:
    """Images as float ``[N, C, H, W]`` in [0, 1]."""
    if not isinstance(images, torch.Tensor):
        raise InputError(
            f"images must be a torch tensor [N, C, H, W], not {type(images).__name__}."
        )
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[0] == 0:
        raise InputError(f"images must have shape [N, C, H, W]; got {list(images.shape)}.")
    images = images.float()
    lo, hi = (float(v) for v in torch.aminmax(images))
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise InputError(
            f"images range over [{lo:.3g}, {hi:.3g}]: pass pixel values in [0, 1], before "
            "normalisation (preprocessing is applied inside the adapter)."
        )
    return images


def method_options(spec: MethodSpec, options: dict[str, Any]) -> dict[str, Any]:
    """The spec's defaults, overridden by common options it takes and by ``options[spec.name]``."""
    merged = dict(spec.defaults)
    for key in COMMON_OPTIONS:
        if key in spec.defaults and options.get(key) is not None:
            merged[key] = options[key]
    own = options.get(spec.name) or {}
    if not isinstance(own, dict):
        raise InputError(f"options for {spec.name!r} must be a dict, not {type(own).__name__}.")
    unknown = sorted(set(own) - set(spec.defaults))
    if unknown:
        raise InputError(
            f"{spec.name} takes no option {', '.join(map(repr, unknown))}; its options: "
            f"{', '.join(sorted(spec.defaults)) or 'none'}."
        )
    merged.update(own)
    return merged


def to_map(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[B, C, H, W]`` (summed over channels) or ``[B, H, W]`` -> ``[B, H, W]`` at ``size``."""
    if maps.ndim == 4:
        maps = maps.sum(dim=1)
    if tuple(maps.shape[-2:]) != tuple(size):
        maps = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return maps


def attribute(
    model: Any,
    images: torch.Tensor,
    targets: Targets,
    methods: Sequence[str] = ("integrated_gradients",),
    **options: Any,
) -> AttributionResult:
    """Attribute each target of each image with each method.

    Args:
        model: a :class:`~leapcore.adapter.LogitsModel`, a torch module or a Keras model; pixels in
            [0, 1] go in, the ``preprocessing`` option is applied inside the adapter.
        images: ``[N, C, H, W]`` in [0, 1].
        targets: one class for all images, one per image, or a list per image.
        methods: registry names or aliases (see :func:`leapcore.attribution.list_methods`).
        **options: common options (``batch_size``: pairs per call; ``memory_budget_mb``;
            ``preprocessing``; ``class_list``; ``layer`` for the methods that take one) and, under a
            method's name, a dict of that method's options, e.g. ``integrated_gradients={"n_steps": 64}``.

    Returns:
        An :class:`AttributionResult`.

    Raises:
        InputError: unknown method, option or layer; a method the model's framework cannot do;
            images outside [0, 1]; targets that do not match the images.
    """
    if isinstance(methods, str):
        methods = [methods]
    if not methods:
        raise InputError("methods is empty: name at least one attribution method.")
    specs = [get_method(m) for m in methods]
    per_method = set(options) - set(COMMON_OPTIONS)
    unknown = sorted(k for k in per_method if k not in {s.name for s in specs})
    if unknown:
        raise InputError(
            f"unknown option {', '.join(map(repr, unknown))}: common options are "
            f"{', '.join(COMMON_OPTIONS)}; per-method options go under the name of a requested method."
        )
    images = check_images(images)
    adapter = as_logits_model(
        model, images, options.get("preprocessing"), options.get("class_list")
    )
    framework = framework_of(adapter)
    refused = [s.name for s in specs if framework not in s.frameworks]
    if refused:
        possible = sorted(s for s in _all_specs() if framework in _all_specs()[s].frameworks)
        raise InputError(
            f"{', '.join(refused)} cannot run on a {framework} model (it needs hooks inside a torch "
            f"network); methods that can: {', '.join(possible)}."
        )
    resolved = {s.name: method_options(s, options) for s in specs}
    for spec in specs:  # every layer name is checked before any work starts
        layer = resolved[spec.name].get("layer")
        if layer is not None:
            find_layer(adapter.model, layer)
    device = _device(adapter) or images.device
    images = images.to(device)
    image_index, flat_targets = expand_targets(targets, images.shape[0])
    num_classes = adapter.num_classes
    if int(flat_targets.min()) < 0 or int(flat_targets.max()) >= num_classes:
        raise InputError(f"targets must be class indices in [0, {num_classes - 1}].")
    pairs = len(flat_targets)
    with inference_mode_switch(adapter):
        rows = options.get("batch_size") or chunk_size_for(
            adapter, tuple(images.shape[1:]), pairs, device, None, options.get("memory_budget_mb")
        )
        maps: dict[str, torch.Tensor] = {}
        seconds: dict[str, float] = {}
        extras: dict[str, dict[str, torch.Tensor]] = {}
        for spec in specs:
            context = MethodContext(adapter, resolved[spec.name], rows, framework)
            start = time.perf_counter()
            chunks, extra_chunks = [], []
            for first in range(0, pairs, rows):
                index = image_index[first : first + rows].to(device)
                batch = images[index]
                target = flat_targets[first : first + rows].to(device)
                out = spec.compute(context, batch, target)
                result, extra = out if isinstance(out, tuple) else (out, {})
                chunks.append(to_map(result.detach(), images.shape[-2:]).float())
                extra_chunks.append(extra)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds[spec.name] = time.perf_counter() - start
            maps[spec.name] = torch.cat(chunks).cpu()
            if extra_chunks[0]:
                extras[spec.name] = {
                    k: torch.cat([e[k].detach() for e in extra_chunks]).cpu()
                    for k in extra_chunks[0]
                }
    return AttributionResult(image_index, flat_targets, maps, seconds, extras)


def _all_specs() -> dict[str, MethodSpec]:
    list_methods()
    return METHODS
