"""NormLIME over captum's Lime: global weights per class where the evidence for the class sits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from leapcore.attribution.normlime import normalised_importance, normlime
from leapcore.errors import InputError

pytest.importorskip("captum")
SIZE, PATCH = 16, 4


class Corners(nn.Module):
    """Class 0 reads the top-left patch, class 1 the bottom-right one, class 2 the image's centre
    column; nothing else moves a logit."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top_left = x[:, :, :PATCH, :PATCH].mean((1, 2, 3))
        bottom_right = x[:, :, -PATCH:, -PATCH:].mean((1, 2, 3))
        centre = x[:, :, :, 8:12].mean((1, 2, 3))
        return torch.stack([top_left, bottom_right, centre], 1) * 10


def test_normlime_finds_each_class_region_across_images() -> None:
    torch.manual_seed(0)
    images = torch.rand(6, 3, SIZE, SIZE)
    targets = [0, 1, 0, 1, 2, 2]
    result = normlime(Corners(), images, targets, patch=PATCH, n_samples=96, alpha=0.01)
    assert result.classes == [0, 1, 2] and result.counts.tolist() == [2, 2, 2]
    assert result.weights.shape == (3, 4, 4) and (result.weights >= 0).all()
    # Each class's weight sits where its logit reads the image (row-major patch index).
    assert int(result.weights[0].argmax()) == 0
    assert int(result.weights[1].argmax()) == 15
    centre = result.weights[2][:, 2]  # patch column 2 = pixels 8..11
    assert centre.min() > 5 * result.weights[2][:, [0, 1, 3]].max()
    # Local LIME weights of a linear model: each patch's own contribution to the logit (10 x its
    # mean pixel; a quarter of that for the centre column's patches), up to the ridge's shrinkage.
    torch.testing.assert_close(
        result.local[0, 0, 0], 10 * images[0, :, :PATCH, :PATCH].mean(), rtol=0.01, atol=0
    )
    column = torch.stack([images[4, :, 4 * i : 4 * i + 4, 8:12].mean() for i in range(4)])
    torch.testing.assert_close(result.local[4, :, 2], 10 * column / 4, rtol=0.01, atol=0)
    # The global weights are the class means of each image's w^2 / ||w||_1.
    own = normalised_importance(result.local)
    torch.testing.assert_close(result.weights[1], own[[1, 3]].mean(0))
    torch.testing.assert_close(result.map(1, (SIZE, SIZE))[-1, -1], result.weights[1, -1, -1])
    with pytest.raises(KeyError, match="no image was explained for class 5"):
        result.map(5, (SIZE, SIZE))


def test_normlime_default_targets_and_bad_input() -> None:
    torch.manual_seed(1)
    images = torch.rand(3, 3, SIZE, SIZE)
    result = normlime(Corners(), images, patch=8, n_samples=32)
    assert result.targets.tolist() == Corners()(images).argmax(1).tolist()
    assert result.weights.shape[1:] == (2, 2)
    with pytest.raises(InputError, match="patch must be between 1 and 16"):
        normlime(Corners(), images, patch=32)
    with pytest.raises(InputError, match="one target per image"):
        normlime(Corners(), images, [[0, 1], [0], [1]], patch=8, n_samples=16)


def test_glime_moves_from_plain_lime_to_the_global_prior_with_the_regularisation() -> None:
    """reg_force -> 0: the local weights are an unregularised LIME fit (a linear model's exact
    patch contributions); reg_force -> infinity: the NormLIME prior of the explained class."""
    from leapcore.attribution.normlime import glime

    torch.manual_seed(3)
    pool = torch.rand(6, 3, SIZE, SIZE)
    prior = normlime(Corners(), pool, [0, 1, 0, 1, 2, 2], patch=PATCH, n_samples=64)
    images = torch.rand(2, 3, SIZE, SIZE)
    strong = glime(Corners(), images, [0, 2], prior, reg_force=1e9, n_samples=48)
    torch.testing.assert_close(strong, prior.weights[[0, 2]], rtol=1e-4, atol=1e-6)
    free = glime(Corners(), images, [0, 2], prior, reg_force=1e-9, n_samples=48)
    exact = torch.zeros(2, 4, 4)
    exact[0, 0, 0] = 10 * images[0, :, :PATCH, :PATCH].mean()
    exact[1, :, 2] = torch.stack(
        [10 * images[1, :, 4 * i : 4 * i + 4, 8:12].mean() / 4 for i in range(4)]
    )
    torch.testing.assert_close(free, exact, rtol=1e-3, atol=1e-3)
    with pytest.raises(InputError, match=r"no weights for class \[3\]"):
        glime(Corners(), images, [0, 3], prior)
