"""Quality on a small CNN trained on scikit-learn's digits (issue 2): prototypes and entanglement."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from leapcore.entanglement import pair_entanglement

from .engine_support import Digits, run_digits


@pytest.fixture(scope="module")
def digit_prototypes(digits: Digits):
    """One prototype per digit, all ten in one batch."""
    return run_digits(
        digits,
        list(range(10)),
        max_steps=100,
        transform="s",
        parameterisation="fourier",
        log_freq=50,
    )


def test_digits_model_is_good_but_not_perfect(digits: Digits):
    accuracy = np.diag(digits.confusion()).mean()
    assert 0.8 <= accuracy < 0.99  # confusion left to correlate with


def test_each_digit_prototype_is_classified_as_that_digit(digit_prototypes):
    probs = digit_prototypes.prototypes.probs
    assert probs.argmax(1).tolist() == list(range(10))
    assert probs.diagonal().min() >= 0.8, probs.diagonal()


def test_entanglement_correlates_with_held_out_confusion(digits: Digits, digit_prototypes):
    """Over the 45 digit pairs, pair entanglement and confusion have Spearman rho > 0.3."""
    scores = pair_entanglement(digit_prototypes.entanglement).numpy()
    confusion = digits.confusion()
    upper = np.triu_indices(10, 1)
    entangled = scores[upper]
    confused = ((confusion + confusion.T) / 2)[upper]
    rho = spearmanr(entangled, confused).statistic
    assert rho > 0.3, rho


def test_each_digit_is_fully_entangled_with_itself(digit_prototypes):
    own = digit_prototypes.entanglement.diagonal()
    torch.testing.assert_close(own, torch.ones(10), atol=1e-5, rtol=0)
