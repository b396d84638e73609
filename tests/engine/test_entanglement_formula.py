"""Entanglement against a plain reference implementation of ALGORITHMS.md's formula."""

from __future__ import annotations

import torch

from leapcore.entanglement import entanglement


def reference(baseline: list[list[float]], prototype: list[list[float]], eps: float = 1e-6):
    """``e_c = (z_c(P) - z_c(B)) / (max_k z_k(P) - z_c(B))``, one scalar at a time.

    The denominator's magnitude is kept at least ``eps`` with its sign (zero counts as positive).
    """
    out = []
    for r, row in enumerate(prototype):
        base = baseline[r] if len(baseline) > 1 else baseline[0]
        top = max(row)
        scores = []
        for c, z in enumerate(row):
            den = top - base[c]
            if abs(den) < eps:
                den = -eps if den < 0 else eps
            scores.append((z - base[c]) / den)
        out.append(scores)
    return torch.tensor(out, dtype=torch.float64)


def test_matches_the_reference_on_random_logits():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(1, 7, generator=gen, dtype=torch.float64)
    protos = torch.randn(4, 7, generator=gen, dtype=torch.float64) * 3
    got = entanglement(base, protos, measure="leap")
    torch.testing.assert_close(
        got, reference(base.tolist(), protos.tolist()), rtol=1e-12, atol=1e-12
    )


def test_matches_the_reference_with_one_baseline_per_row():
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    protos = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    got = entanglement(base, protos, measure="leap")
    torch.testing.assert_close(
        got, reference(base.tolist(), protos.tolist()), rtol=1e-12, atol=1e-12
    )


def test_top_class_scores_exactly_one_and_an_unmoved_class_zero():
    base = torch.tensor([[0.0, 1.0, 2.0]])
    proto = torch.tensor([[5.0, 1.0, 3.5]])
    scores = entanglement(base, proto, measure="leap")[0]
    assert scores[0] == 1.0  # the top class
    assert scores[1] == 0.0  # did not move
    assert scores[2] == (3.5 - 2.0) / (5.0 - 2.0)  # rose half as far as it could


def test_guarded_denominator():
    # Class 1's baseline logit equals the prototype's top logit: the denominator is zero.
    base = torch.tensor([[0.0, 4.0, 9.0]], dtype=torch.float64)
    proto = torch.tensor([[4.0, 3.0, 1.0]], dtype=torch.float64)
    scores = entanglement(base, proto, eps=1e-6, measure="leap")
    assert torch.isfinite(scores).all()
    torch.testing.assert_close(scores, reference(base.tolist(), proto.tolist()), rtol=1e-12, atol=0)
    assert scores[0, 1] == (3.0 - 4.0) / 1e-6
    # A baseline logit above the top (negative denominator) keeps its sign.
    assert scores[0, 2] == (1.0 - 9.0) / (4.0 - 9.0)
    # Tiny negative denominators are pushed to -eps, not to +eps.
    tiny = entanglement(
        torch.tensor([[0.0, 4.0 + 1e-9]], dtype=torch.float64),
        torch.tensor([[4.0, 0.0]], dtype=torch.float64),
        measure="leap",
    )
    assert tiny[0, 1] == (0.0 - (4.0 + 1e-9)) / -1e-6
