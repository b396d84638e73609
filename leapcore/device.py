"""Device choice and memory: the best device by default, chunk sizes from a memory budget, peak memory."""

from __future__ import annotations

import resource
import sys

import torch

from leapcore.errors import InputError


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given (checked), else ``cuda``, then ``mps``, then ``cpu``."""
    if device is not None:
        chosen = torch.device(device)
        if chosen.type == "cuda" and not torch.cuda.is_available():
            raise InputError(
                f"device {str(device)!r} was asked for but CUDA is not available; use device='cpu' or None."
            )
        if chosen.type == "mps" and not (
            getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
        ):
            raise InputError(
                f"device {str(device)!r} was asked for but MPS is not available; use device='cpu' or None."
            )
        return chosen
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def estimate_row_bytes(
    model: torch.nn.Module, shape: tuple[int, int, int], device: torch.device
) -> int:
    """Bytes one batch row needs for forward + backward: three times the activations of one forward.

    Activations are summed from forward hooks on leaf modules; a model with few submodules (e.g. a
    ``torch.export`` graph or the TensorFlow bridge) is assumed to need at least 200 input-sized tensors.
    """
    total = 0

    def hook(_module, _inputs, output):
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel() * output.element_size()

    probe = torch.full((1, *shape), 0.5, device=device)
    with torch.no_grad():
        model(probe)  # a first call settles what runs (LogitsModel folds batch norms on it)
    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad():
            model(probe)
    finally:
        for h in handles:
            h.remove()
    input_bytes = 4 * shape[0] * shape[1] * shape[2]
    # Opaque models (a torch.export graph, the TensorFlow bridge) show only a few leaf modules whose
    # outputs miss the activations inside; assume a deep network's worth for them.
    opaque = len(leaves) <= 4
    return max(3 * total, 200 * input_bytes) if opaque else 3 * total


def chunk_size_for(
    model: torch.nn.Module,
    shape: tuple[int, int, int],
    batch: int,
    device: torch.device,
    max_batch_size: int | None,
    memory_budget_mb: float | None,
) -> int:
    """Rows per model call: ``max_batch_size``, else what fits the budget (80 % of free GPU memory)."""
    if max_batch_size is not None:
        return max(1, min(batch, max_batch_size))
    if memory_budget_mb is None and device.type != "cuda":
        return batch
    per_row = estimate_row_bytes(model, shape, device)  # first: its probe call may copy the model
    if memory_budget_mb is not None:
        budget = memory_budget_mb * 2**20
    else:
        free, _ = torch.cuda.mem_get_info(device)
        budget = 0.8 * free
    return max(1, min(batch, int(budget // per_row)))


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of the run: the CUDA allocator's peak on a GPU, the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024
