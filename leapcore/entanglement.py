"""Entanglement of every class with each prototype's target (ALGORITHMS.md, 'Entanglement')."""

from __future__ import annotations

import torch


def entanglement(
    baseline_logits: torch.Tensor,
    prototype_logits: torch.Tensor,
    eps: float = 1e-6,
    output: str = "logits",
    targets: torch.Tensor | None = None,
) -> torch.Tensor:
    """``e_c = (z_c(P) - z_c(B)) / (max_k z_k(P) - z_c(B))`` per row and class.

    For ``output="multilabel_logits"`` classes are independent, so no max over classes couples
    them: ``e_c = (z_c(P) - z_c(B)) / (z_t(P) - z_t(B))``, each class's logit gain over the target's
    (``z_t``: the mean logit of the row's target classes, given by ``targets``); the target scores
    exactly 1, a class that did not move 0, a class that gained more than the target above 1.

    Args:
        baseline_logits: ``[B or 1, K]`` logits of the start image(s).
        prototype_logits: ``[B, K]`` logits of the finished prototypes.
        eps: the denominator's magnitude is kept at least ``eps`` (its sign kept), so a class whose
            baseline logit already equals the prototype's top logit scores a finite value.

    Returns:
        ``[B, K]``: about 1 for the target (exactly 1 for the top class), 0 for a class that did not move.
        output: the config option ``output``.
        targets: ``[B, K]`` bool, each row's target classes (needed for multi-label).
    """
    if output == "multilabel_logits":
        if targets is None:
            raise ValueError("multi-label entanglement needs each row's target classes")
        gain = prototype_logits - baseline_logits
        mask = targets.to(gain.dtype)
        target_gain = (gain * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp_min(1)
        sign = torch.where(
            target_gain < 0, -torch.ones_like(target_gain), torch.ones_like(target_gain)
        )
        return gain / (sign * target_gain.abs().clamp_min(eps))
    top = prototype_logits.max(dim=1, keepdim=True).values
    num = prototype_logits - baseline_logits
    den = top - baseline_logits
    sign = torch.where(den < 0, -torch.ones_like(den), torch.ones_like(den))
    den = sign * den.abs().clamp_min(eps)
    return num / den
