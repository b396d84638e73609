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
    def step(
        self, grads: list[torch.Tensor], lr: float | torch.Tensor, rows: torch.Tensor | None = None
    ) -> None:
        """One update; with ``rows`` (indices into dim 0) only those rows and their moments move.

        Rows stepped only part of the time would need their own step counts; ``rows`` is meant
        for rows that leave for good (converged prototypes): the ones left were stepped every time.
        """
        self.t += 1
        if rows is not None:
            self._step_rows(grads, lr, rows)
            return
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

    def _step_rows(self, grads: list[torch.Tensor], lr: float | torch.Tensor, rows: torch.Tensor):
        b1, b2 = self.betas
        c1 = 1 - b1**self.t
        c2 = 1 - b2**self.t
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            g, mr, vr, pr = g[rows], m[rows], v[rows], p[rows]
            mr.mul_(b1).add_(g, alpha=1 - b1)
            vr.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = vr.sqrt().div_(c2**0.5).add_(self.eps)
            if isinstance(lr, torch.Tensor):
                pr.addcdiv_(mr * (lr / c1), denom, value=-1.0)
            else:
                pr.addcdiv_(mr, denom, value=-lr / c1)
            m[rows], v[rows], p[rows] = mr, vr, pr
