"""``BatchedAdam`` against ``torch.optim.Adam``, step by step, on the same parameters and gradients."""

from __future__ import annotations

import pytest
import torch

from leapcore.optim import BatchedAdam


def _gradients(steps: int, shapes: list[tuple[int, ...]]) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    return [[torch.randn(s, generator=gen) * (1 + t) for s in shapes] for t in range(steps)]


@pytest.mark.parametrize("lr_as_tensor", [False, True])
def test_batched_adam_follows_torch_adam(lr_as_tensor):
    shapes = [(4, 3, 8, 8), (4, 5)]
    ours = [torch.randn(s, generator=torch.Generator().manual_seed(1)) for s in shapes]
    theirs = [p.clone().requires_grad_(True) for p in ours]
    reference = torch.optim.Adam(theirs, lr=0.05, betas=(0.8, 0.99), eps=1e-6)
    adam = BatchedAdam(ours, betas=(0.8, 0.99), eps=1e-6)
    for grads in _gradients(12, shapes):
        for p, g in zip(theirs, grads):
            p.grad = g.clone()
        reference.step()
        adam.step(grads, torch.tensor(0.05) if lr_as_tensor else 0.05)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)


def test_a_rate_per_step_matches_torch_adam_with_its_rate_changed_between_steps():
    shape = [(2, 6)]
    ours = [torch.zeros(2, 6)]
    theirs = [torch.zeros(2, 6, requires_grad=True)]
    reference = torch.optim.Adam(theirs, lr=1.0)
    adam = BatchedAdam(ours)
    for t, grads in enumerate(_gradients(8, shape)):
        rate = 10 ** (-3 + 0.5 * t)
        reference.param_groups[0]["lr"] = rate
        theirs[0].grad = grads[0].clone()
        reference.step()
        adam.step(grads, rate)
        torch.testing.assert_close(ours[0], theirs[0].detach(), rtol=1e-5, atol=1e-6)


def test_rows_stay_independent():
    """A row's trajectory does not depend on the other rows of the batch (element-wise update)."""
    grads = _gradients(5, [(3, 4)])
    full = [torch.zeros(3, 4)]
    alone = [torch.zeros(1, 4)]
    a, b = BatchedAdam(full), BatchedAdam(alone)
    for g in grads:
        a.step(g, 0.1)
        b.step([g[0][1:2]], 0.1)
    assert torch.equal(full[0][1:2], alone[0])
