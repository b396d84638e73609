"""Penultimate-layer features: what a classifier's last layer sees, for comparing images in the
model's own feature space (the audit diff's prototype similarity)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from leapcore.errors import InputError

# Linear operations of a torch.export graph and which argument is the feature batch.
_LINEAR_OPS = {"aten.linear.default": 0, "aten.addmm.default": 1, "aten.mm.default": 0}


def _compose(preprocessing: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    if preprocessing is None:
        return lambda x: x
    steps = list(preprocessing) if isinstance(preprocessing, (list, tuple)) else [preprocessing]

    def apply(x: torch.Tensor) -> torch.Tensor:
        for step in steps:
            x = step(x)
        return x

    return apply


def _graph_module(model: Any) -> Any:
    graph = model if isinstance(model, torch.fx.GraphModule) else None
    return graph if graph is not None else getattr(model, "graph_module", None)


def penultimate_features(
    model: Any, images: torch.Tensor, preprocessing: Any = None, layer: str | None = None
) -> torch.Tensor:
    """Each image's features at the input of the model's classifier layer, ``[N, D]``.

    The layer is ``layer`` (a module name from ``model.named_modules()``) when given, else the last
    ``torch.nn.Linear`` the model holds; for ``torch.export`` programs (MLflow's ``pt2`` format),
    which keep no modules, the input of the last linear/addmm/mm operation of the graph. A forward
    hook reads it and is removed afterwards, also when the forward raises.

    Args:
        model: a torch module (or a module holding a ``torch.export`` graph as ``graph_module``).
        images: ``[N, C, H, W]`` pixels in [0, 1] at the model's input size.
        preprocessing: applied to the pixels first (a callable or a list of callables).
        layer: the module whose input is the feature (e.g. ``"head"`` or ``"fc"``).

    Raises:
        InputError: ``layer`` names no module, or no classifier layer can be found.
    """
    if not isinstance(model, torch.nn.Module):
        raise InputError(
            f"the prototype similarity needs a PyTorch model, not {type(model).__name__}."
        )
    modules = dict(model.named_modules())
    if layer is not None and layer not in modules:
        close = [n for n in modules if n and layer.split(".")[-1] in n][:5]
        raise InputError(f"the model has no module {layer!r} (modules like it: {close}).")
    target = modules[layer] if layer is not None else None
    if target is None:
        linears = [m for m in modules.values() if isinstance(m, torch.nn.Linear)]
        target = linears[-1] if linears else None
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    x = _compose(preprocessing)(images.to(device))
    with torch.no_grad():
        if target is not None:
            return _hooked_input(model, target, x)
        graph = _graph_module(model)
        if graph is not None:
            return _graph_input(graph, x, getattr(model, "fixed_batch", None))
    raise InputError(
        f"found no classifier layer (torch.nn.Linear) in {type(model).__name__}; name the layer "
        "whose input is the feature vector (diff option `layer`)."
    )


def _hooked_input(model: torch.nn.Module, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    seen: list[torch.Tensor] = []

    def keep(_module: Any, inputs: tuple, _output: Any) -> None:
        seen.append(inputs[0].detach())

    handle = module.register_forward_hook(keep)
    try:
        model(x)
    finally:
        handle.remove()
    if not seen:
        raise InputError(
            f"the layer {type(module).__name__} was not called by the model's forward."
        )
    return seen[-1].flatten(1).float().cpu()


def _graph_input(graph: Any, x: torch.Tensor, fixed_batch: int | None) -> torch.Tensor:
    nodes = [
        n for n in graph.graph.nodes if n.op == "call_function" and str(n.target) in _LINEAR_OPS
    ]
    if not nodes:
        raise InputError("found no linear operation in the exported program; name the `layer`.")
    last = nodes[-1]
    wanted = last.args[_LINEAR_OPS[str(last.target)]]

    class Reader(torch.fx.Interpreter):
        value: torch.Tensor | None = None

        def run_node(self, n: Any) -> Any:
            out = super().run_node(n)
            if n is wanted:
                self.value = out
            return out

    size = fixed_batch or len(x)
    parts = []
    for start in range(0, len(x), size):
        batch = x[start : start + size]
        pad = size - len(batch)
        if pad:  # a program exported for a fixed batch size takes only that size
            batch = torch.cat([batch, batch[-1:].expand(pad, *batch.shape[1:])])
        reader = Reader(graph)
        reader.run(batch)
        parts.append(reader.value.flatten(1)[: size - pad])
    return torch.cat(parts).float().cpu()
