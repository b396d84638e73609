"""Versions of one digits CNN for the diff tests and benchmark: the same data and schedule, the
second trained with two classes merged in part of the data (a share of class ``b``'s images
labelled ``a``) and/or with another seed (initial weights and batch order)."""

from __future__ import annotations

import functools

import torch

from .engine_support import DigitsCNN, Normalise, fit, load_digit_images


def _split(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Generator]:
    x, y = load_digit_images()
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(x), generator=gen)
    return x[order], y[order], gen


@functools.cache  # the engine and pipeline diff tests share the trained versions in one session
def train_version(
    merge: tuple[int, int] | None, share: float = 0.6, n: int = 900, seed: int = 0
) -> DigitsCNN:
    """3 epochs on the first ``n`` shuffled digits (the same ``n`` for every seed);
    ``merge=(a, b)`` labels ``share`` of the b's a; ``seed`` sets the initial weights and the batch
    order (seed 0: the data's own generator, as before seeds were added).

    Cached: callers must not train or edit the model they get (the engine leaves it as it was)."""
    x, y, gen = _split(n)
    x, y = x[:n], y[:n].clone()
    if merge is not None:
        a, b = merge
        y[(y == b) & (torch.rand(n, generator=gen) < share)] = a
    if seed:
        gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitsCNN()
    fit(model, Normalise(), x, y, 3, gen)
    return model


def held_out_digits(per_class: int = 10, n: int = 900) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` digits of each class that no version trained on (after the first ``n``)."""
    x, y, _ = _split(n)
    x, y = x[n:], y[n:]
    keep = torch.cat([torch.nonzero(y == c).flatten()[:per_class] for c in range(10)])
    return x[keep], y[keep]
