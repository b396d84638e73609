"""A batched Adam whose step size may differ per step (range tests) and that never syncs with the host."""

from __future__ import annotations

import torch


class BatchedAdam:
    """Adam over a list of tensors; ``step`` takes the rate as a float or a 0-d tensor.

    Rows of a batch stay independent because Adam acts element-wise.
    """

    def __init__(
        self,
        params: list[torch.Tensor],
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ):
        self.params = params
        self.betas = betas
        self.eps = eps
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0

    @torch.no_grad()
    def step(self, grads: list[torch.Tensor], lr: float | torch.Tensor) -> None:
        self.t += 1
        b1, b2 = self.betas
        c1 = 1 - b1**self.t
        c2 = 1 - b2**self.t
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = v.sqrt().div_(c2**0.5).add_(self.eps)
            if isinstance(lr, torch.Tensor):
                p.addcdiv_(m * (lr / c1), denom, value=-1.0)
            else:
                p.addcdiv_(m, denom, value=-lr / c1)
