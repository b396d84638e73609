"""Tiny seeded torch models, reference computations and a real local MLflow store (sqlite)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

CLASSES = ["cat", "dog", "fox"]
MEAN = (0.5, 0.4, 0.3)
STD = (0.25, 0.2, 0.3)
SHAPE = (3, 16, 16)


class TinyNet(nn.Module):
    """3x16x16 -> 3 logits; BatchNorm and Dropout so that eval mode matters."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4 * 8 * 8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        x = nn.functional.max_pool2d(x, 2)
        return self.fc(self.drop(x.flatten(1)))


def tiny_net(seed: int = 0, num_classes: int = 3) -> TinyNet:
    torch.manual_seed(seed)
    model = TinyNet(num_classes)
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.1, 0.1)
        model.bn.running_var.uniform_(0.5, 1.5)
    return model.eval()


def reference_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What a loaded adapter must reproduce: Normalize(MEAN, STD) then the model, in eval mode."""
    mean = torch.tensor(MEAN).view(1, -1, 1, 1)
    std = torch.tensor(STD).view(1, -1, 1, 1)
    with torch.no_grad():
        return model.eval()((x - mean) / std)


def adapter_logits(loaded, x: torch.Tensor) -> torch.Tensor:
    """The loaded adapter's logits: its preprocessing, then its model."""
    for step in loaded.preprocessing:
        x = step(x)
    with torch.no_grad():
        return loaded.model(x)


@contextlib.contextmanager
def local_mlflow_store(root: Path) -> Iterator[str]:
    """A real MLflow tracking store and registry in ``root/mlflow.db``; the previous one restored."""
    import mlflow
    from mlflow.tracking import fluent

    previous = mlflow.get_tracking_uri()
    previous_experiment = fluent._active_experiment_id  # no public getter/setter for this
    uri = f"sqlite:///{root}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment(
        "leapcore-sources", artifact_location=(root / "artifacts").as_uri()
    )
    mlflow.set_experiment(experiment_id=experiment)
    try:
        yield uri
    finally:
        mlflow.set_tracking_uri(previous)
        fluent._active_experiment_id = previous_experiment
