"""Fixtures for model sources: tiny seeded torch models and a real local MLflow store (sqlite)."""

from __future__ import annotations

import os

import pytest
import torch
from mlflow_support import local_mlflow_store
from sources_support import SHAPE, TinyNet, tiny_net

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture
def tiny() -> TinyNet:
    return tiny_net()


@pytest.fixture
def pixels() -> torch.Tensor:
    return torch.rand(4, *SHAPE, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory: pytest.TempPathFactory):
    """A real MLflow store for the whole session (sqlite + local artifacts in a temp dir)."""
    with local_mlflow_store(tmp_path_factory.mktemp("mlflow"), "leapcore-sources") as uri:
        yield uri
