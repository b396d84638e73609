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
import os
from typing import Any

from prefect import get_run_logger, task

WORKERS_ENV = "LEAP_DASK_WORKERS"
WORKER_MEMORY_ENV = "LEAP_DASK_WORKER_MEMORY_MB"
THREADS = "threads"
DASK = "dask"
RAY = "ray"
# Resident memory of a Dask worker process with torch, prefect and leapcore imported, before any
# model: measured about 580 MiB on Linux with torch 2.14 (tests/deployments/test_scale.py).
WORKER_RESERVE_MB = 768.0
# Chunks are planned to use at most this share of a worker's memory limit.
HEADROOM = 0.8
# Dask settings of the local cluster's workers. Our tasks hand Dask only small artifact
# references, so a worker's memory is torch's, which Dask can neither spill nor free: pausing a
# worker at 80 % of its limit would wait for memory that never drops and hang the flow run (seen in
# CI). The Nanny still restarts a worker at 95 % (``terminate``), which fails the task loudly.
WORKER_MEMORY_SETTINGS: dict[str, Any] = {
    "distributed": {"worker": {"memory": {"target": False, "spill": False, "pause": False}}}
}


def worker_dask_config() -> dict[str, Any]:
    """The Dask config for a local cluster's workers: this process's, with
    ``WORKER_MEMORY_SETTINGS`` on top (a Nanny *replaces* top-level keys, so it gets the whole)."""
    import dask.config

    return dask.config.merge(dask.config.config, WORKER_MEMORY_SETTINGS)


def make_task_runner(
    spec: str | Any | None = THREADS,
    *,
    n_workers: int | None = None,
    threads_per_worker: int = 1,
    worker_memory_mb: float | None = None,
    max_workers: int | None = None,
) -> Any:
    """A Prefect task runner from ``spec`` (a string above, or a task runner, returned as is).

    Args:
        spec: ``"threads"``, ``"dask"``, a Dask scheduler address, ``"ray"`` or a Ray address.
        n_workers: workers of a local Dask cluster (default ``LEAP_DASK_WORKERS`` or 2).
        threads_per_worker: threads per local Dask worker (1 keeps torch's threads in charge).
        worker_memory_mb: memory limit of each local Dask worker (default
            ``LEAP_DASK_WORKER_MEMORY_MB``, else Dask's: system memory / workers); chunks of
            classes are sized to use at most 80 % of it. Local workers never pause (see
            ``WORKER_MEMORY_SETTINGS``); on a cluster of your own, set
            ``distributed.worker.memory.pause: false`` likewise.
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
            n_workers = n_workers or int(os.environ.get(WORKERS_ENV, "2"))
            if worker_memory_mb is None and os.environ.get(WORKER_MEMORY_ENV):
                worker_memory_mb = float(os.environ[WORKER_MEMORY_ENV])
            kwargs: dict[str, Any] = {
                "n_workers": n_workers,
                "threads_per_worker": threads_per_worker,
                "processes": True,
                "dashboard_address": "127.0.0.1:0",  # loopback, a free port
                "host": "127.0.0.1",
                "config": worker_dask_config(),  # passed to each worker's Nanny
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
        At least 1: a single class that does not fit is still run; set ``memory_budget_mb`` in
        the engine config so that the engine splits its rows into batches that fit.
    """
    free = worker_memory_mb * 2**20 - reserve_mb * 2**20 - model_bytes
    per_class = max(1, row_bytes * max(1, rows_per_class))
    fit = int(free // per_class) if free > 0 else 0
    chunk = max(1, min(num_classes, fit))
    if max_chunk is not None:
        chunk = max(1, min(chunk, max_chunk))
    return chunk


def rows_per_class(config: Any) -> int:
    """Rows one target puts through the model at once: the larger of optimisation
    (``prototypes_per_class * transform_samples``) and isolation (``* max_isolate_classes``)."""
    isolation = config.max_isolate_classes if config.isolation else 1
    return config.prototypes_per_class * max(config.transform_samples, isolation)


def model_bytes(model: Any) -> int:
    """Bytes of a torch model's parameters and buffers (0 for anything else)."""
    try:
        tensors = list(model.parameters()) + list(model.buffers())
    except (AttributeError, TypeError):
        return 0
    return sum(t.numel() * t.element_size() for t in tensors)


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

    With several workers the chunk is also capped so that every worker gets work
    (``ceil(num_classes / n_workers)``).
    """
    import torch

    from leapcore.device import estimate_row_bytes

    row_bytes = estimate_row_bytes(model, input_shape, torch.device("cpu"))
    return classes_per_chunk(
        num_classes,
        row_bytes,
        rows_per_class(config),
        model_bytes(model),
        worker_memory_mb,
        reserve_mb,
        max_chunk=math.ceil(num_classes / max(1, n_workers)),
    )


@task(name="plan_class_chunks", retries=1, retry_delay_seconds=2)
def plan_class_chunks(
    model: Any, locator: Any, config: Any, num_targets: int, device: str | None = None
) -> int:
    """Run on a Dask worker: classes per chunk from that worker's memory limit (see
    :func:`classes_per_chunk`; at most ``HEADROOM`` of the limit)."""
    import psutil
    from distributed import get_client, get_worker

    from leapcore.device import estimate_row_bytes, pick_device
    from tasks.model import engine_model

    dev = pick_device(device)
    net, loaded = engine_model(model, locator, config, dev)
    limit = get_worker().memory_manager.memory_limit or 0
    n_workers = max(1, len(get_client().scheduler_info()["workers"]))
    if not limit:
        limit = psutil.virtual_memory().total / n_workers
    budget_mb = HEADROOM * limit / 2**20
    row_bytes = estimate_row_bytes(net, net.input_shape, dev)
    size = classes_per_chunk(
        num_targets,
        row_bytes,
        rows_per_class(config),
        model_bytes(loaded.model),
        budget_mb,
        max_chunk=math.ceil(num_targets / n_workers),
    )
    get_run_logger().info(
        "class chunks of %d target(s): %d worker(s) with %.0f MiB each (%.0f MiB usable), "
        "%.2f MiB per batch row, %d rows per target",
        size,
        n_workers,
        limit / 2**20,
        budget_mb - WORKER_RESERVE_MB,
        row_bytes / 2**20,
        rows_per_class(config),
    )
    return size


def planned_chunk_size(
    model: Any, locator: Any, config: Any, num_targets: int, device: str | None = None
) -> int | None:
    """Classes per chunk for the task runner of the current flow run.

    None (one chunk, as before) on threads; on a Dask runner, :func:`plan_class_chunks` sizes the
    chunks on a worker so that each fits the worker's memory limit and every worker gets work.
    A threaded run with the ``class_chunk_size`` logged here gives identical results.
    """
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    runner = getattr(context, "task_runner", None)
    if num_targets <= 1 or type(runner).__name__ != "DaskTaskRunner":
        return None
    return plan_class_chunks.submit(model, locator, config, num_targets, device).result()
