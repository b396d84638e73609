"""Entanglement of every class with each prototype's target (ALGORITHMS.md, 'Entanglement')."""

from __future__ import annotations

import torch


def entanglement(
    baseline_logits: torch.Tensor, prototype_logits: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """``e_c = (z_c(P) - z_c(B)) / (max_k z_k(P) - z_c(B))`` per row and class.

    Args:
        baseline_logits: ``[B or 1, K]`` logits of the start image(s).
        prototype_logits: ``[B, K]`` logits of the finished prototypes.
        eps: the denominator's magnitude is kept at least ``eps`` (its sign kept), so a class whose
            baseline logit already equals the prototype's top logit scores a finite value.

    Returns:
        ``[B, K]``: about 1 for the target (exactly 1 for the top class), 0 for a class that did not move.
    """
    top = prototype_logits.max(dim=1, keepdim=True).values
    num = prototype_logits - baseline_logits
    den = top - baseline_logits
    sign = torch.where(den < 0, -torch.ones_like(den), torch.ones_like(den))
    den = sign * den.abs().clamp_min(eps)
    return num / den
