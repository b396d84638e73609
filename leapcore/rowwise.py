"""Element-wise functions whose value for one element does not depend on the rest of the tensor.

On the CPU, ATen runs an element-wise kernel as a vectorised body plus a scalar tail (and splits large
tensors between threads), so which code path computes an element depends on the tensor's size. For
arithmetic both paths agree bit for bit; for transcendental functions they do not: on an AVX-512 CPU
(16 floats per vector, 32 per loop step) ``torch.sigmoid`` of a 4x4 mask row differs by one ulp
between a batch of one row (scalar tail) and a batch of two (vector body). Adam normalises every
gradient element, so such one-ulp differences in near-zero gradients become full-size steps and a
chunk of classes ended with masks ~1e-2 away from the single batch. AVX2 (8 floats, 16 per step)
happened to cover those rows with the vector body alone.

Here the CPU computes in float64 and rounds to float32: the two float64 paths differ by at most an
ulp of float64, which rounds to the same float32 unless the exact value lies within 2**-29 of a
float32 rounding boundary, so a row gets the same bits in any batch. Other devices run one device
function per element and keep their own dtype.
"""

from __future__ import annotations

import torch


def sigmoid(x: torch.Tensor) -> torch.Tensor:
    """``torch.sigmoid(x)`` whose value per element is independent of ``x``'s size (see module doc)."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.sigmoid(x.double()).to(x.dtype)
    return torch.sigmoid(x)
