"""Same seed on the CPU gives identical results; another seed gives other results."""

from __future__ import annotations

import torch

from .engine_support import run_digits


def _run(digits, seed: int, **extra):
    return run_digits(
        digits,
        [1, 7],
        transform="m",
        prototypes_per_class=2,
        seed=seed,
        isolation=True,
        isolation_steps=10,
        **extra,
    )


def test_same_seed_gives_identical_prototypes_and_masks(digits):
    first, second = _run(digits, 3), _run(digits, 3)
    assert torch.equal(first.prototypes.images, second.prototypes.images)
    assert torch.equal(first.prototypes.logits, second.prototypes.logits)
    assert torch.equal(first.prototypes.trajectory, second.prototypes.trajectory)
    assert torch.equal(first.isolation.masks, second.isolation.masks)


def test_same_seed_is_identical_with_noise_start_alpha_and_lr_search(digits):
    extra = {"baseline_init": "r", "use_alpha": True, "find_lr_steps": 20, "num_lr_windows": 5}
    first, second = _run(digits, 5, **extra), _run(digits, 5, **extra)
    assert first.lr.lr == second.lr.lr
    assert torch.equal(first.prototypes.images, second.prototypes.images)
    assert torch.equal(first.prototypes.alphas, second.prototypes.alphas)


def test_global_rng_state_does_not_matter(digits):
    torch.manual_seed(123)
    first = _run(digits, 3)
    torch.manual_seed(456)
    torch.rand(10)
    second = _run(digits, 3)
    assert torch.equal(first.prototypes.images, second.prototypes.images)


def test_another_seed_gives_other_prototypes(digits):
    first, other = _run(digits, 3), _run(digits, 4)
    assert not torch.equal(first.prototypes.images, other.prototypes.images)
