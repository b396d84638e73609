"""Task runners and memory-budget chunks; an audit on a real 2-worker Dask LocalCluster."""

from __future__ import annotations

import importlib
import math
import os
import resource
from pathlib import Path

import pytest
import torch
from deploy_support import TINY_CLASSES, TINY_SHAPE, log_tiny_model, tiny_classifier, tiny_config

from flows.scale import (
    WORKER_RESERVE_MB,
    chunk_plan,
    classes_per_chunk,
    make_task_runner,
    rows_per_class,
)
from leapcore.config import load_config

MiB = 2**20


# ---------------------------------------------------------------------------------------------- #
# Factory and arithmetic (no cluster)
# ---------------------------------------------------------------------------------------------- #
def test_threads_is_the_default_runner():
    from prefect.task_runners import ThreadPoolTaskRunner

    assert isinstance(make_task_runner(), ThreadPoolTaskRunner)
    assert isinstance(make_task_runner("threads"), ThreadPoolTaskRunner)
    runner = ThreadPoolTaskRunner(max_workers=3)
    assert make_task_runner(runner) is runner


def test_dask_local_cluster_and_address(monkeypatch):
    from prefect_dask import DaskTaskRunner

    local = make_task_runner("dask", n_workers=3, worker_memory_mb=1500)
    assert isinstance(local, DaskTaskRunner)
    assert str(local.cluster_class).endswith("LocalCluster")
    assert local.cluster_kwargs["n_workers"] == 3
    assert local.cluster_kwargs["memory_limit"] == "1500MiB"
    assert local.cluster_kwargs["host"] == "127.0.0.1"
    assert local.cluster_kwargs["dashboard_address"].startswith("127.0.0.1:")
    assert local.cluster_kwargs["config"]["distributed"]["worker"]["memory"]["pause"] is False

    monkeypatch.setenv("LEAP_DASK_WORKERS", "4")
    monkeypatch.setenv("LEAP_DASK_WORKER_MEMORY_MB", "2048")
    from_env = make_task_runner("dask")
    assert from_env.cluster_kwargs["n_workers"] == 4
    assert from_env.cluster_kwargs["memory_limit"] == "2048MiB"

    assert make_task_runner("tcp://127.0.0.1:8786").address == "tcp://127.0.0.1:8786"
    assert make_task_runner("dask://127.0.0.1:8786").address == "tcp://127.0.0.1:8786"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("spark", "unknown task runner 'spark'; use 'threads', 'dask'"),
        ("ray", "needs prefect-ray: pip install prefect-ray"),
    ],
)
def test_unknown_or_missing_runners_are_explained(spec, message):
    pytest.importorskip("prefect_dask")
    if spec == "ray":
        try:
            import prefect_ray  # noqa: F401

            pytest.skip("prefect-ray is installed")
        except ImportError:
            pass
    with pytest.raises(ValueError, match=message):
        make_task_runner(spec)


def test_classes_per_chunk_fits_the_budget():
    # 2048 MiB worker, 768 reserve, 100 MiB model, 1 MiB rows, 32 rows per class: 37 classes fit.
    fit = classes_per_chunk(1000, MiB, 32, 100 * MiB, 2048, reserve_mb=768)
    assert fit == (2048 - 768 - 100) // 32
    assert fit * 32 * MiB + 100 * MiB + 768 * MiB <= 2048 * MiB
    assert (fit + 1) * 32 * MiB + 100 * MiB + 768 * MiB > 2048 * MiB
    assert classes_per_chunk(10, MiB, 32, 100 * MiB, 2048, reserve_mb=768) == 10
    assert classes_per_chunk(1000, MiB, 32, 100 * MiB, 2048, 768, max_chunk=5) == 5
    # Not even one class fits: still 1 (the engine's memory_budget_mb splits its rows).
    assert classes_per_chunk(1000, 64 * MiB, 32, 100 * MiB, 1024, reserve_mb=768) == 1


def test_chunk_plan_measures_the_model():
    from leapcore.device import estimate_row_bytes

    model = tiny_classifier()
    config = load_config(tiny_config(prototypes_per_class=2, transform_samples=8))
    assert rows_per_class(config) == 16
    row = estimate_row_bytes(model, TINY_SHAPE, torch.device("cpu"))
    budget = WORKER_RESERVE_MB + 50 * row * 16 / MiB + 1  # room for 50 classes, plus the model
    assert chunk_plan(model, TINY_SHAPE, config, 500, budget) == 50
    assert chunk_plan(model, TINY_SHAPE, config, 500, budget, n_workers=20) == 25


# ---------------------------------------------------------------------------------------------- #
# Real Dask clusters
# ---------------------------------------------------------------------------------------------- #
@pytest.mark.services
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_local_cluster_from_the_factory_runs_tasks_in_worker_processes(services):
    from distributed import get_worker
    from prefect import flow, task

    @task
    def where() -> tuple[int, int, object]:
        manager = get_worker().memory_manager
        return os.getpid(), int(manager.memory_limit), manager.memory_pause_fraction

    @flow(task_runner=make_task_runner("dask", n_workers=2, worker_memory_mb=900))
    def probe() -> list[tuple[int, int, object]]:
        return [f.result() for f in [where.submit() for _ in range(4)]]

    results = probe()
    assert all(pid != os.getpid() for pid, _, _ in results)
    assert {limit for _, limit, _ in results} == {900 * MiB}
    # Workers never pause on torch's memory (a paused worker hangs the flow run).
    assert {pause for _, _, pause in results} == {False}


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := current RSS


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@pytest.fixture(scope="module")
def dask_cluster(services):
    """A real ``distributed.LocalCluster``: 2 worker processes, 1 thread and 1.5 GiB each."""
    from distributed import Client, LocalCluster

    from flows.scale import worker_dask_config

    cluster = LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        memory_limit="1536MiB",
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
        config=worker_dask_config(),  # as make_task_runner("dask"): never pause on torch's memory
    )
    client = Client(cluster)
    try:
        # Import the pipeline in both workers at once (about 20 s each on 2 cores), as a Dask
        # `--preload flows.audit` would, instead of one after the other on their first tasks.
        client.run(importlib.import_module, "flows.audit")
        yield cluster, client
    finally:
        client.close()
        cluster.close()


def _prototypes(result, store_root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from leapcore.results import prototypes_from_arrow
    from tasks import ArtifactStore
    from tasks.audit_io import merge_prototypes

    store = ArtifactStore(str(store_root))
    parts = sorted(result.outputs["optimise_prototypes"], key=lambda p: p.first_row)
    merged = merge_prototypes(
        [
            prototypes_from_arrow(
                store.get_table(p.refs["prototypes"]), store.get_table(p.refs["trajectories"])
            )
            for p in parts
        ]
    )
    return merged.images, merged.logits


@pytest.mark.services
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_dask_audit_gives_the_prototypes_of_the_threaded_run(dask_cluster, model_name, tmp_path):
    from prefect.settings import PREFECT_TASKS_REFRESH_CACHE, temporary_settings

    from flows.audit import audit_model

    cluster, client = dask_cluster
    ref = log_tiny_model(model_name)
    targets = list(range(len(TINY_CLASSES)))
    common = {"target_classes": targets, "config": tiny_config(), "skip": ["wandb", "mlflow"]}
    expected_chunk = math.ceil(len(targets) / 2)  # the tiny model fits; one chunk per worker

    # Each worker's peak memory is measured over the audit: reset the kernel's high-water mark now
    # (the imports are done; a transient peak while importing depends on what the machine ran
    # before and is not the audit's).
    client.run(_reset_peak_rss)
    with temporary_settings(updates={PREFECT_TASKS_REFRESH_CACHE: True}):  # compute, never reuse
        threaded = audit_model(
            ref.uri,
            task_runner="threads",
            class_chunk_size=expected_chunk,
            artifact_store=str(tmp_path / "threads-store"),
            output_dir=str(tmp_path / "threads-out"),
            **common,
        )
        distributed = audit_model(
            ref.uri,
            task_runner=cluster.scheduler_address,
            artifact_store=str(tmp_path / "dask-store"),
            output_dir=str(tmp_path / "dask-out"),
            **common,
        )

    for result in (threaded, distributed):
        assert result.stages["optimise_prototypes"] == "Completed"
        assert result.stages["isolate_features"] == "Completed"
    # Chunks sized on a worker from its memory limit; one task per chunk ran on the cluster.
    assert len(distributed.outputs["optimise_prototypes"]) == 2
    assert [p.first_row for p in distributed.outputs["optimise_prototypes"]] == [0, expected_chunk]
    prefixes = client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))
    assert {"optimise_prototypes", "isolate_features", "plan_class_chunks"} <= set(prefixes)

    images_t, logits_t = _prototypes(threaded, tmp_path / "threads-store")
    images_d, logits_d = _prototypes(distributed, tmp_path / "dask-store")
    assert images_t.shape == (len(targets), *TINY_SHAPE)
    assert torch.equal(images_t, images_d)
    assert torch.equal(logits_t, logits_d)

    # Each worker stayed within its 1.5 GiB memory limit (its peak RSS during the audit, the
    # pipeline's imports resident).
    peaks = client.run(_peak_rss)
    limit = 1536 * MiB
    for address, peak in peaks.items():
        assert peak < limit, f"worker {address} peaked at {peak / MiB:.0f} MiB"
    print(
        "dask audit:",
        f"{distributed.seconds:.1f} s vs threads {threaded.seconds:.1f} s;",
        "worker peak RSS MiB:",
        sorted(round(p / MiB) for p in peaks.values()),
    )
