"""Random streams keyed by what a batch row *is*, not by where it sits in the batch.

A prototype row is keyed by its target classes and its index among that target's prototypes; an
isolation pair by its image's key and the class isolated. Each key seeds its own generator, so a row
draws the same transforms, fill and noise whether it is optimised alone, with other classes, or in a
chunk of classes on another machine (``flows.audit_model`` with a Dask task runner).
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Sequence
from enum import IntEnum

import torch

RowKey = Hashable


class Stream(IntEnum):
    """Offsets added to the user's seed, one per random stream, so no two streams share draws.

    The values are fixed: changing one changes every result that draws from that stream.
    """

    TRANSFORMS = 1  # evaluation transforms of the prototype step; the backdrop of alpha prototypes
    PROTOTYPE_JITTER = 2  # start offsets of several prototypes per target
    BASELINE = 3  # equidistant-baseline transforms and fill
    ISOLATION_STEPS = 4  # mask optimisation's per-step noise
    ISOLATION_BACKGROUND = 5  # what masked-out pixels show
    HIPE_SUBSTRATE = 6  # what HiPE's occluded cells show
    NOISE_BANK = 7  # the bank of fill-noise images
    ROBUST_VIEWS = 11  # random resized crops of the quality measure


def stream_seed(seed: int, key: RowKey) -> int:
    """A 63-bit seed from ``(seed, key)``, stable across processes and Python versions."""
    digest = hashlib.blake2b(repr((int(seed), key)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def unique_keys(keys: Sequence[RowKey]) -> list[RowKey]:
    """``keys`` with repeats told apart by their occurrence (two rows for one target differ)."""
    seen: dict[RowKey, int] = {}
    out = []
    for key in keys:
        count = seen.get(key, 0)
        seen[key] = count + 1
        out.append(key if count == 0 else (key, "repeat", count))
    return out


class RowStreams:
    """One generator per row; ``rand``/``randn`` return ``[rows, *shape]``, row ``i`` from stream ``i``."""

    def __init__(self, seed: int, keys: Sequence[RowKey], device: torch.device | str):
        self.keys = unique_keys(keys)
        self.device = torch.device(device)
        self.generators = [
            torch.Generator(device=self.device).manual_seed(stream_seed(seed, key))
            for key in self.keys
        ]

    def __len__(self) -> int:
        return len(self.generators)

    def rand(
        self,
        shape: Sequence[int],
        dtype: torch.dtype = torch.float32,
        rows: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Uniform draws of every row's stream (or of the streams ``rows``; the others do not move)."""
        return self._draw(torch.rand, shape, dtype, rows)

    def randn(
        self,
        shape: Sequence[int],
        dtype: torch.dtype = torch.float32,
        rows: Sequence[int] | None = None,
    ) -> torch.Tensor:
        return self._draw(torch.randn, shape, dtype, rows)

    def _draw(
        self, fn, shape: Sequence[int], dtype: torch.dtype, rows: Sequence[int] | None = None
    ) -> torch.Tensor:
        shape = tuple(shape)
        generators = self.generators if rows is None else [self.generators[r] for r in rows]
        if not generators:
            return torch.empty((0, *shape), device=self.device, dtype=dtype)
        return torch.stack(
            [fn(shape, generator=g, device=self.device, dtype=dtype) for g in generators]
        )


def positional_keys(n: int) -> list[RowKey]:
    """Keys for rows that have no identity beyond their position (user samples)."""
    return list(range(n))
