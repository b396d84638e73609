"""A real local MLflow store for tests (shared by tests/sources and tests/tf)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def local_mlflow_store(root: Path, experiment: str = "leapcore-tests") -> Iterator[str]:
    """A real MLflow tracking store and registry in ``root/mlflow.db``; the previous one restored."""
    import mlflow
    from mlflow.tracking import fluent

    previous = mlflow.get_tracking_uri()
    previous_experiment = fluent._active_experiment_id  # no public getter/setter for this
    uri = f"sqlite:///{root}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    experiment_id = mlflow.create_experiment(
        experiment, artifact_location=(root / "artifacts").as_uri()
    )
    mlflow.set_experiment(experiment_id=experiment_id)
    try:
        yield uri
    finally:
        mlflow.set_tracking_uri(previous)
        fluent._active_experiment_id = previous_experiment
