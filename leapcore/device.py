"""Device choice and memory: the best device by default, chunk sizes from a memory budget, peak memory."""

from __future__ import annotations

import os
import re
import resource
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

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


_deterministic_lock = threading.Lock()
_deterministic_users = 0
_deterministic_saved: tuple[bool, bool, bool, bool] | None = None


@contextmanager
def deterministic_algorithms(enabled: bool, device: torch.device) -> Iterator[None]:
    """Run the block with PyTorch's deterministic CUDA kernels (the config's ``deterministic``).

    On CUDA several backward passes add with atomics, so two runs with one seed differ in the last
    bits and a prototype optimisation amplifies that (on an H100, 30 steps of EfficientNet-Lite0:
    pixels up to 0.5 apart, mean target probabilities 0.61-0.87 over runs). With ``enabled`` on a CUDA device
    this sets ``torch.use_deterministic_algorithms(True)`` and cuDNN's deterministic mode for the
    block and restores the previous settings after it; blocks in several threads share one setting
    (counted, restored when the last one ends). The CPU is deterministic already: nothing changes.

    Raises:
        InputError: a model operation has no deterministic CUDA kernel (named in the message).
    """
    global _deterministic_users, _deterministic_saved
    if not enabled or device.type != "cuda":
        yield
        return
    with _deterministic_lock:
        if _deterministic_users == 0:
            _deterministic_saved = (
                torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.backends.cudnn.deterministic,
                torch.backends.cudnn.benchmark,
            )
            # cuBLAS needs a fixed workspace for reproducible matrix products (PyTorch checks it).
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        _deterministic_users += 1
    try:
        yield
    except RuntimeError as err:
        found = re.search(r"(\S+) does not have a deterministic implementation", str(err))
        if found is None:
            raise
        raise InputError(
            f"deterministic is true, but the model runs {found.group(1)}, which has no "
            "deterministic CUDA kernel; set deterministic: false (runs with one seed then differ "
            "slightly on the GPU) or run on the CPU (device='cpu')."
        ) from err
    finally:
        with _deterministic_lock:
            _deterministic_users -= 1
            if _deterministic_users == 0 and _deterministic_saved is not None:
                on, warn_only, cudnn_det, cudnn_bench = _deterministic_saved
                torch.use_deterministic_algorithms(on, warn_only=warn_only)
                torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = (
                    cudnn_det,
                    cudnn_bench,
                )
