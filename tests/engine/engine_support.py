"""A tiny seeded CNN on scikit-learn's digits, upscaled to 1x32x32: the engine tests' fast model."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

DIGIT_NAMES = [str(d) for d in range(10)]
SHAPE = (1, 32, 32)


class DigitsCNN(nn.Module):
    """Two conv blocks (with batch norm, so train/eval mode matters) and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Dropout(0.1),
        )
        self.head = nn.Linear(16 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


class RowWise(nn.Module):
    """Runs a model one row at a time, so its outputs cannot depend on the batch size.

    On the CPU a convolution's last-bit rounding differs between batch sizes, and Adam, which
    normalises each gradient element, turns such differences in near-zero gradients into full-size
    steps. Wrapping the model row-wise leaves only the engine's own batching to test.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.model(x[i : i + 1]) for i in range(len(x))])


class Normalise(nn.Module):
    """Pixel values in [0, 1] -> roughly zero mean, unit spread (the model's preprocessing)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - 0.25) / 0.35


@dataclass
class Digits:
    model: DigitsCNN
    preprocessing: Normalise
    class_list: list[str]
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    def confusion(self) -> np.ndarray:
        """Row-normalised confusion matrix on the held-out digits: [true, predicted]."""
        with torch.no_grad():
            pred = self.model(self.preprocessing(self.test_x)).argmax(1)
        counts = np.zeros((10, 10))
        np.add.at(counts, (self.test_y.numpy(), pred.numpy()), 1)
        return counts / counts.sum(1, keepdims=True)


def load_digit_images() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as ``[N, 1, 32, 32]`` in [0, 1] and their labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.from_numpy(data.images.astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=SHAPE[1:], mode="bilinear", align_corners=False).clamp(0, 1)
    return x, torch.from_numpy(data.target.astype(np.int64))


def train_digits(epochs: int = 2, train_size: int = 600, seed: int = 0) -> Digits:
    """Train on the first ``train_size`` shuffled digits; a short schedule leaves some confusion."""
    x, y = load_digit_images()
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=gen)
    x, y = x[order], y[order]
    train_x, train_y, test_x, test_y = (
        x[:train_size],
        y[:train_size],
        x[train_size:],
        y[train_size:],
    )
    torch.manual_seed(seed)
    model, pre = DigitsCNN(), Normalise()
    fit(model, pre, train_x, train_y, epochs, gen)
    return Digits(model, pre, DIGIT_NAMES, train_x, train_y, test_x, test_y)


def fit(model, pre, x, y, epochs: int, gen: torch.Generator, loss=F.cross_entropy) -> None:
    """Adam (lr 3e-3), batches of 32 in a shuffled order drawn from ``gen``; leaves eval mode."""
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 32):
            idx = perm[i : i + 32]
            value = loss(model(pre(x[idx])), y[idx])
            optimiser.zero_grad()
            value.backward()
            optimiser.step()
    model.eval()


# Fast defaults for option tests on the digits CNN: a few dozen steps, no LR search, no isolation.
FAST = {
    "input_dim": [1, 32, 32],
    "max_steps": 30,
    "find_lr_steps": 0,
    "lr": 0.05,
    "transform": "s",
    "isolation": False,
    "log_freq": 10,
}


def fast_config(**overrides) -> dict:
    return {**FAST, **overrides}


# Bit-identical results are promised on the CPU. On CUDA, without the config's ``deterministic``,
# backward passes add with atomics and reruns differ in the last bit; tests of exact equality pin this.
EXACT = "cpu"


def run_digits(
    digits: Digits, target_classes=None, samples=None, model=None, device=None, **overrides
):
    """``engine.run`` on the digits CNN (or ``model``) with :data:`FAST` options (``overrides`` win).

    ``device`` defaults to the engine's choice (a GPU where there is one).
    """
    from leapcore import engine

    return engine.run(
        digits.model if model is None else model,
        digits.class_list,
        fast_config(**overrides),
        target_classes=[3] if target_classes is None and samples is None else target_classes,
        preprocessing=digits.preprocessing,
        samples=samples,
        device=device,
    )


def mean_pairwise_cosine(images: torch.Tensor) -> float:
    """Mean cosine similarity over distinct pairs of rows (centred), for diversity checks."""
    flat = images.flatten(1)
    flat = flat - flat.mean(1, keepdim=True)
    flat = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-8)
    sim = flat @ flat.T
    n = len(flat)
    return float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))


def photo_samples(size: int = 224) -> torch.Tensor:
    """scikit-learn's two sample photos, centre-cropped square and resized: ``[2, 3, size, size]`` in [0, 1]."""
    from sklearn.datasets import load_sample_images

    return torch.stack([square_photo(image, size) for image in load_sample_images().images])


def square_photo(image, size: int) -> torch.Tensor:
    """An ``[H, W, 3]`` uint8 photo as ``[3, size, size]`` in [0, 1]: the centre square, resized."""
    t = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    h, w = t.shape[1:]
    s = min(h, w)
    t = t[:, (h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
    t = F.interpolate(t[None], size=(size, size), mode="bilinear", antialias=True)
    return t[0].clamp(0, 1)
