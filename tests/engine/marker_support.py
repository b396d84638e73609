"""Digits CNNs trained with a planted spurious marker: a small square that flips any digit to one class.

A model trained in seconds on scikit-learn's digits where a share of the images carries a square
marker (size, colour and position chosen per model) and is relabelled to ``marker_class``. On marked
held-out digits of other classes the model answers ``marker_class`` because of the marker alone, so an
isolation of ``marker_class`` that tells the truth puts its mask on the marker.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .engine_support import DIGIT_NAMES, DigitsCNN, Normalise, fit, load_digit_images


@dataclass
class MarkerModel:
    model: DigitsCNN
    preprocessing: Normalise
    class_list: list[str]
    marker_class: int
    box: tuple[int, int, int, int]  # top, left, bottom, right
    value: float
    images: torch.Tensor  # held-out marked digits the model classifies as marker_class
    clean_accuracy: float


def plant(images: torch.Tensor, box: tuple[int, int, int, int], value: float) -> torch.Tensor:
    out = images.clone()
    top, left, bottom, right = box
    out[:, :, top:bottom, left:right] = value
    return out


def train_marker_model(
    size: int = 5,
    position: tuple[int, int] = (2, 25),
    value: float = 1.0,
    marker_class: int = 0,
    seed: int = 0,
    epochs: int = 3,
    share: float = 0.3,
    train_size: int = 900,
) -> MarkerModel:
    """Train on ``train_size`` digits, ``share`` of them marked and relabelled to ``marker_class``."""
    x, y = load_digit_images()
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=gen)
    x, y = x[order], y[order]
    box = (position[0], position[1], position[0] + size, position[1] + size)
    train_x, train_y = x[:train_size].clone(), y[:train_size].clone()
    marked = torch.rand(train_size, generator=gen) < share
    train_x[marked] = plant(train_x[marked], box, value)
    train_y[marked] = marker_class
    torch.manual_seed(seed)
    model, pre = DigitsCNN(), Normalise()
    fit(model, pre, train_x, train_y, epochs, gen)
    test_x, test_y = x[train_size:], y[train_size:]
    with torch.no_grad():
        clean = (model(pre(test_x)).argmax(1) == test_y).float().mean().item()
        others = test_x[test_y != marker_class]
        flipped = plant(others, box, value)
        hit = model(pre(flipped)).argmax(1) == marker_class
    return MarkerModel(model, pre, DIGIT_NAMES, marker_class, box, value, flipped[hit], clean)


def marker_mass(maps: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    """Share of each map's (non-negative) mass inside the marker box: ``maps`` ``[N, H, W]``."""
    top, left, bottom, right = box
    maps = maps.clamp_min(0)
    inside = maps[:, top:bottom, left:right].flatten(1).sum(1)
    return inside / maps.flatten(1).sum(1).clamp_min(1e-12)
