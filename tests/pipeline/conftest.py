"""Real local services for the pipeline tests, started once per test session.

- Prefect: ``prefect_test_harness`` (a temporary server on loopback) with this session's own
  ``PREFECT_HOME`` and result storage, so no cached result of another session comes back.
- MLflow: a SQLite store (tracking and registry) in the session's tmp folder.
- W&B: offline, every folder it writes (runs, staging, cache, config) in the session's tmp folder.
- A small CNN trained on scikit-learn's digits (upscaled to 32x32) in a few seconds, registered in
  the MLflow registry as ``models:/digits-cnn@champion``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

DIGITS = [f"digit-{i}" for i in range(10)]
SHAPE = (1, 32, 32)
MODEL_NAME = "digits-cnn"


def tiny_config(**overrides: Any) -> dict[str, Any]:
    """An audit that takes seconds on the tiny model."""
    config = {
        "input_dim": list(SHAPE),
        "max_steps": 12,
        "find_lr_steps": 6,
        "num_lr_windows": 3,
        "transform": "s",
        "isolation_steps": 4,
        "max_isolate_classes": 2,
        "log_freq": 4,
        "project_name": "pipeline-tests",
    }
    config.update(overrides)
    return config


class DigitsCNN(nn.Module):
    """Two strided convolutions and a linear head: trains on digits in seconds on 2 cores."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
        )
        self.head = nn.Linear(16 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def digits_images() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits as ``[N, 1, 32, 32]`` pixels in [0, 1], and their labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.from_numpy(data.images.astype(np.float32) / 16.0)[:, None]
    images = torch.nn.functional.interpolate(images, size=SHAPE[1:], mode="bilinear")
    return images.clamp(0, 1), torch.from_numpy(data.target)


@pytest.fixture(scope="session")
def pipeline_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """This session's folders and environment (restored afterwards)."""
    home = tmp_path_factory.mktemp("pipeline")
    env = {
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
        "MLFLOW_REGISTRY_URI": f"sqlite:///{home / 'mlflow.db'}",
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DIR": str(home / "wandb"),
        "WANDB_DATA_DIR": str(home / "wandb-data"),
        "WANDB_CACHE_DIR": str(home / "wandb-cache"),
        "WANDB_CONFIG_DIR": str(home / "wandb-config"),
        "WANDB_ARTIFACT_DIR": str(home / "wandb-artifacts"),
        "LEAP_ARTIFACT_STORE": str(home / "store"),
        "LEAP_TASK_RETRY_DELAY": "0.1",
    }
    for folder in ("prefect", "wandb", "wandb-data", "wandb-cache", "wandb-config"):
        (home / folder).mkdir()
    for name in ("WANDB_API_KEY", "WANDB_ENTITY", "LEAP_API_KEY"):
        env.setdefault(name, "")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            if value == "":
                mp.delenv(key, raising=False)
            else:
                mp.setenv(key, value)
        mp.chdir(home)  # mlruns/ and leap_results/ land here too
        yield home


@pytest.fixture(scope="session")
def prefect_server(pipeline_home: Path) -> Iterator[str]:
    """Prefect's temporary local server, with results stored under this session's home."""
    from prefect.settings import (
        PREFECT_HOME,
        PREFECT_LOCAL_STORAGE_PATH,
        PREFECT_LOGGING_TO_API_BATCH_INTERVAL,
        temporary_settings,
    )
    from prefect.testing.utilities import prefect_test_harness

    updates = {
        PREFECT_HOME: str(pipeline_home / "prefect"),
        PREFECT_LOCAL_STORAGE_PATH: str(pipeline_home / "prefect" / "storage"),
        PREFECT_LOGGING_TO_API_BATCH_INTERVAL: 0.3,
    }
    with temporary_settings(updates=updates), prefect_test_harness(server_startup_timeout=180):
        from prefect.settings import PREFECT_API_URL

        yield str(PREFECT_API_URL.value())


@pytest.fixture(scope="session")
def digits_model() -> DigitsCNN:
    """A small CNN trained on digits for a few epochs (over 90 % training accuracy)."""
    torch.manual_seed(0)
    images, labels = digits_images()
    model = DigitsCNN()
    optimiser = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(4):
        order = torch.randperm(len(images))
        for start in range(0, len(images), 64):
            batch = order[start : start + 64]
            loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(images).argmax(1) == labels).float().mean())
    assert accuracy > 0.85, f"the digits model trained to only {accuracy:.2f}"
    return model


@pytest.fixture(scope="session")
def registered_model(pipeline_home: Path, digits_model: DigitsCNN) -> Any:
    """The digits model in the real local MLflow registry, alias ``champion`` (pt2 format)."""
    import mlflow

    from tasks.mlflow_models import log_model_with_metadata

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    mlflow.set_experiment("pipeline-test-models")
    with mlflow.start_run(run_name="digits-cnn"):
        ref = log_model_with_metadata(
            digits_model,
            DIGITS,
            input_shape=SHAPE,
            registered_model_name=MODEL_NAME,
            alias="champion",
        )
    assert ref.uri == f"models:/{MODEL_NAME}@champion"
    return ref


@pytest.fixture
def fresh_store(tmp_path: Path) -> str:
    """An artifact store of this test alone (cache keys include the store)."""
    return str(tmp_path / "store")
