"""A row's sigmoid is the same bits in any batch (leapcore.rowwise), which torch.sigmoid is not on AVX-512."""

from __future__ import annotations

import pytest
import torch

from leapcore import rowwise


@pytest.mark.parametrize("row_shape", [(1, 4, 4), (1, 3, 3), (3, 7, 5), (3, 40, 40)])
def test_sigmoid_of_a_row_does_not_depend_on_its_batch(row_shape):
    x = torch.randn((37, *row_shape), generator=torch.Generator().manual_seed(0)) * 4
    whole = rowwise.sigmoid(x)
    for size in (1, 2, 3, 5, 16):
        parts = torch.cat([rowwise.sigmoid(x[i : i + size]) for i in range(0, len(x), size)])
        assert torch.equal(parts, whole), size
    # Still the sigmoid, to float32 rounding.
    torch.testing.assert_close(whole, torch.sigmoid(x), atol=0, rtol=2e-7)


def test_sigmoid_gradient_does_not_depend_on_the_batch():
    x = torch.randn(9, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    grads = []
    for size in (9, 1, 4):
        leaf = x.clone().requires_grad_(True)
        for i in range(0, len(x), size):
            rowwise.sigmoid(leaf[i : i + size]).pow(2).sum().backward()
        grads.append(leaf.grad)
    assert grads[0].dtype == torch.float32
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])
