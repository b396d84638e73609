"""Tiny seeded torch models, reference computations and a real local MLflow store (sqlite)."""

from __future__ import annotations

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
