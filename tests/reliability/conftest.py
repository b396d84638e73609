"""Real `leap audit` processes stopped by signals: an MLflow sqlite store with the digits model
registered, and no PREFECT_API_URL, so each process starts (and must stop) its own Prefect server."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pipeline.conftest import DIGITS, SHAPE, DigitsCNN, digits_images, tiny_config

MODEL = "reliability-digits"


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A folder with an MLflow store holding ``models:/reliability-digits@champion``."""
    import mlflow
    import torch

    from tasks.mlflow_models import log_model_with_metadata

    home = tmp_path_factory.mktemp("reliability")
    uri = f"sqlite:///{home / 'mlflow.db'}"
    torch.manual_seed(0)
    model = DigitsCNN().eval()  # untrained is enough: the audits are stopped or tiny
    images, _ = digits_images()
    with torch.no_grad():
        model(images[:2])
    # This store only, also when another suite's session has set MLFLOW_REGISTRY_URI (which
    # set_tracking_uri alone would not override for the registry).
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    os.environ.update(MLFLOW_TRACKING_URI=uri, MLFLOW_REGISTRY_URI=uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        mlflow.set_experiment("reliability-models")
        with mlflow.start_run(run_name="digits"):
            log_model_with_metadata(
                model, DIGITS, input_shape=SHAPE, registered_model_name=MODEL, alias="champion"
            )
    finally:
        mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"] or None)
        mlflow.set_registry_uri(saved["MLFLOW_REGISTRY_URI"] or "")  # also sets the variable
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    (home / "prefect").mkdir()
    yield home


def leap_env(home: Path) -> dict[str, str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).parents[2]),
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
        "MLFLOW_REGISTRY_URI": f"sqlite:///{home / 'mlflow.db'}",
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "WANDB_MODE": "offline",
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    env.pop("PREFECT_API_URL", None)
    return env


def write_config(path: Path, **overrides) -> Path:
    path.write_text(json.dumps(tiny_config(**overrides)))
    return path
