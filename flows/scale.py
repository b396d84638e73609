"""Where an audit's tasks run: threads in the flow's process, or a Dask cluster (``prefect-dask``).

``audit_model(..., task_runner="dask")`` fans prototype optimisation and isolation out in chunks of
classes; :func:`make_task_runner` turns the plain string a deployment parameter can hold into a
Prefect task runner:

- ``"threads"`` (default): ``ThreadPoolTaskRunner`` in the flow run's process;
- ``"dask"``: a ``distributed.LocalCluster`` started for the flow run and closed after it;
- ``"tcp://scheduler:8786"`` (or ``"dask://scheduler:8786"``): an existing Dask cluster;
- ``"ray"`` / ``"ray://head:10001"``: ``prefect-ray``'s ``RayTaskRunner`` when it is installed.

:func:`classes_per_chunk` sizes the chunks so that one worker stays within a memory budget: the
rows one chunk puts through the model at once (``prototypes_per_class * transform_samples`` per
class during optimisation, ``prototypes_per_class * max_isolate_classes`` during isolation) times
the bytes a row needs for forward and backward, plus the model, must fit the worker's memory limit
less a fixed reserve for the interpreter and torch.
"""

from __future__ import annotations

import math
from typing import Any

THREADS = "threads"
DASK = "dask"
RAY = "ray"
# Resident memory of a worker process with torch imported, before any model: measured 300-400 MiB
# on Linux with torch 2.x (see tests/deployments/test_scale.py); rounded up.
WORKER_RESERVE_MB = 512.0


def make_task_runner(
    spec: str | Any | None = THREADS,
    *,
    n_workers: int = 2,
    threads_per_worker: int = 1,
    worker_memory_mb: float | None = None,
    max_workers: int | None = None,
) -> Any:
    """A Prefect task runner from ``spec`` (a string above, or a task runner, returned as is).

    Args:
        spec: ``"threads"``, ``"dask"``, a Dask scheduler address, ``"ray"`` or a Ray address.
        n_workers: workers of a local Dask cluster.
        threads_per_worker: threads per local Dask worker (1 keeps torch's threads in charge).
        worker_memory_mb: memory limit of each local Dask worker; Dask pauses and restarts
            workers that exceed it. None leaves Dask's default (system memory / workers).
        max_workers: threads of the thread pool runner (default: Prefect's).

    Raises:
        ValueError: an unknown spec, naming the accepted ones.
    """
    if spec is None:
        spec = THREADS
    if not isinstance(spec, str):
        return spec
    text = spec.strip()
    lowered = text.lower()
    if lowered in (THREADS, "thread", "threadpool"):
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=max_workers)
    if lowered == DASK or lowered.startswith(("dask://", "tcp://", "tls://")):
        from prefect_dask import DaskTaskRunner

        if lowered == DASK:
            kwargs: dict[str, Any] = {
                "n_workers": n_workers,
                "threads_per_worker": threads_per_worker,
                "processes": True,
                "dashboard_address": None,
                "host": "127.0.0.1",
            }
            if worker_memory_mb is not None:
                kwargs["memory_limit"] = f"{int(worker_memory_mb)}MiB"
            return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=kwargs)
        address = "tcp://" + text.split("://", 1)[1] if lowered.startswith("dask://") else text
        return DaskTaskRunner(address=address)
    if lowered == RAY or lowered.startswith("ray://"):
        try:
            from prefect_ray import RayTaskRunner
        except ImportError:
            raise ValueError(
                "task runner 'ray' needs prefect-ray: pip install prefect-ray (see deployments/README.md)."
            ) from None
        return RayTaskRunner() if lowered == RAY else RayTaskRunner(address=text)
    raise ValueError(
        f"unknown task runner {spec!r}; use 'threads', 'dask' (a local cluster), a Dask scheduler "
        "address such as 'tcp://10.0.0.5:8786', or 'ray'."
    )


def is_distributed(spec: str | Any | None) -> bool:
    """Whether ``spec`` sends tasks to other processes (so chunks must fit a worker's memory)."""
    if spec is None:
        return False
    if not isinstance(spec, str):
        return type(spec).__name__ != "ThreadPoolTaskRunner"
    return spec.strip().lower() not in (THREADS, "thread", "threadpool")


def classes_per_chunk(
    num_classes: int,
    row_bytes: int,
    rows_per_class: int,
    model_bytes: int,
    worker_memory_mb: float,
    reserve_mb: float = WORKER_RESERVE_MB,
    max_chunk: int | None = None,
) -> int:
    """Classes per chunk such that one chunk's working set fits ``worker_memory_mb``.

    Args:
        num_classes: classes to audit (the chunk is never larger).
        row_bytes: bytes one batch row needs for forward and backward
            (:func:`leapcore.device.estimate_row_bytes`).
        rows_per_class: rows one class puts through the model at once.
        model_bytes: parameters and buffers of the model (each worker holds a copy).
        worker_memory_mb: the memory limit of one worker.
        reserve_mb: memory of the worker process itself (interpreter, torch, Dask).
        max_chunk: an upper bound, e.g. to give every worker at least one chunk.

    Returns:
        At least 1: a single class that does not fit is still run (the engine then splits its
        rows by ``memory_budget_mb``, see :func:`chunk_config`).
    """
    free = worker_memory_mb * 2**20 - reserve_mb * 2**20 - model_bytes
    per_class = max(1, row_bytes * max(1, rows_per_class))
    fit = int(free // per_class) if free > 0 else 0
    chunk = max(1, min(num_classes, fit))
    if max_chunk is not None:
        chunk = max(1, min(chunk, max_chunk))
    return chunk


def chunk_plan(
    model: Any,
    input_shape: tuple[int, int, int],
    config: Any,
    num_classes: int,
    worker_memory_mb: float,
    n_workers: int = 1,
    reserve_mb: float = WORKER_RESERVE_MB,
) -> int:
    """Classes per chunk for ``model`` under ``config`` (an ``EngineConfig``), measured on the CPU.

    The larger of the two stages' rows per class counts; with several workers the chunk is also
    capped so that every worker gets work (``ceil(num_classes / n_workers)``).
    """
    import torch

    from leapcore.device import estimate_row_bytes

    row_bytes = estimate_row_bytes(model, input_shape, torch.device("cpu"))
    per_class = config.prototypes_per_class * max(
        config.transform_samples, config.max_isolate_classes if config.isolation else 1
    )
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return classes_per_chunk(
        num_classes,
        row_bytes,
        per_class,
        model_bytes,
        worker_memory_mb,
        reserve_mb,
        max_chunk=math.ceil(num_classes / max(1, n_workers)),
    )


def chunk_config(config: dict[str, Any] | None, worker_memory_mb: float | None) -> dict[str, Any]:
    """``config`` with ``memory_budget_mb`` set from the worker's limit (unless the user set it),
    so the engine splits a chunk's rows into batches that fit even when one class is too large."""
    out = dict(config or {})
    if worker_memory_mb is not None and out.get("memory_budget_mb") is None:
        out["memory_budget_mb"] = max(64.0, worker_memory_mb - WORKER_RESERVE_MB)
    return out


def chunks(classes: list[Any], size: int) -> list[list[Any]]:
    """``classes`` in consecutive chunks of ``size`` (the last may be shorter)."""
    if size < 1:
        raise ValueError(f"chunk size must be at least 1, not {size}.")
    return [classes[i : i + size] for i in range(0, len(classes), size)]
