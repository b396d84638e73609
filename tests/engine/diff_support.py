"""Two versions of one digits CNN for the diff tests: the second trained with two classes merged in
part of the data (a share of class ``b``'s images labelled ``a``), everything else identical."""

from __future__ import annotations

import functools

import torch

from .engine_support import DigitsCNN, Normalise, fit, load_digit_images


@functools.cache  # the engine and pipeline diff tests share the trained versions in one session
def train_version(merge: tuple[int, int] | None, share: float = 0.6, n: int = 900) -> DigitsCNN:
    """Seed 0, 3 epochs on ``n`` shuffled digits; ``merge=(a, b)`` labels ``share`` of the b's a.

    Cached: callers must not train or edit the model they get (the engine leaves it as it was)."""
    x, y = load_digit_images()
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(x), generator=gen)
    x, y = x[order][:n], y[order][:n].clone()
    if merge is not None:
        a, b = merge
        y[(y == b) & (torch.rand(n, generator=gen) < share)] = a
    torch.manual_seed(0)
    model = DigitsCNN()
    fit(model, Normalise(), x, y, 3, gen)
    return model
