"""Faithfulness metrics: cross-checked against Quantus on the same inputs, plus their own properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch

# Quantus imports TensorFlow; triton (pulled in by torchvision.ops) segfaults when it loads after
# TensorFlow in one process, so torchvision.ops must be imported first.
import torchvision.ops  # noqa: F401, E402
from torch import nn

from leapcore.faithfulness import (
    boxes_to_masks,
    curve_auc,
    deletion_insertion_auc,
    perturbation_curves,
    pointing_game,
    sparseness,
)

quantus = pytest.importorskip("quantus")

STEPS = 16
SIZE = 8  # 64 pixels, 4 per step


class _TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * SIZE * SIZE, 5)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) * 3.0  # sharper softmax, so the curves move


class _Complement(nn.Module):
    """``u -> f(x - u)``: Quantus' deletion towards 0 of ``u = x`` is our insertion from zero."""

    def __init__(self, model: nn.Module, images: torch.Tensor) -> None:
        super().__init__()
        self.model, self.images = model, images

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.model(self.images - u)


@pytest.fixture()
def case():
    torch.manual_seed(3)
    model = _TinyNet().eval()
    images = torch.rand(4, 3, SIZE, SIZE)
    maps = torch.randn(4, SIZE, SIZE)  # distinct values: no ties, one ranking
    targets = model(images).argmax(1).tolist()
    return model, images, maps, targets


def _quantus_curves(model, images, maps, targets) -> np.ndarray:
    """Quantus' curve at our step points.

    Quantus flips ``features_in_step`` of the ``C x H x W`` broadcast features per step and requires
    it to divide ``H x W``; with 4 per step, every third of its 48 points has flipped whole pixels
    (a pixel's three channel copies are tied, so they sit next to each other in its ranking), the
    same 4, 8, ... 64 pixels as our 16 steps.
    """
    per_step = SIZE * SIZE // STEPS
    metric = quantus.PixelFlipping(
        features_in_step=per_step, perturb_baseline=0.0, disable_warnings=True
    )
    curves = metric(
        model=model,
        x_batch=images.numpy(),
        y_batch=np.array(targets),
        a_batch=maps[:, None].numpy(),
        device="cpu",
        softmax=True,
    )
    return np.asarray(curves)[:, 2::3]


def test_deletion_matches_quantus_pixel_flipping(case) -> None:
    model, images, maps, targets = case
    ours = perturbation_curves(model, images, maps, targets, steps=STEPS, substrate="zero")
    theirs = _quantus_curves(model, images, maps, targets)
    # Quantus records the points after each step; ours also has the unperturbed point 0.
    np.testing.assert_allclose(ours[:, 1:].numpy(), theirs, atol=1e-5)
    full = torch.softmax(model(images), 1)[torch.arange(4), targets].detach().numpy()
    np.testing.assert_allclose(ours[:, 0].numpy(), full, atol=1e-6)
    # AUC: Quantus' un-normalised trapezoid over the same points, divided by the number of steps.
    quantus_auc = np.trapezoid(np.concatenate([full[:, None], theirs], 1), axis=1) / STEPS
    deletion, _ = deletion_insertion_auc(
        model, images, maps, targets, steps=STEPS, substrate="zero"
    )
    np.testing.assert_allclose(deletion.numpy(), quantus_auc, atol=1e-5)


def test_insertion_matches_quantus_on_the_complement_model(case) -> None:
    model, images, maps, targets = case
    ours = perturbation_curves(
        model, images, maps, targets, steps=STEPS, substrate="zero", mode="insertion"
    )
    theirs = _quantus_curves(_Complement(model, images).eval(), images, maps, targets)
    np.testing.assert_allclose(ours[:, 1:].numpy(), theirs, atol=1e-5)
    _, insertion = deletion_insertion_auc(
        model, images, maps, targets, steps=STEPS, substrate="zero"
    )
    np.testing.assert_allclose(insertion.numpy(), curve_auc(ours).numpy(), atol=1e-6)


def test_sparseness_matches_quantus(case) -> None:
    _, images, maps, _ = case
    maps = maps.clone()
    maps[1] = maps[1] ** 3  # a peakier map
    maps[2] = 1.0  # uniform: Gini 0
    theirs = quantus.Sparseness(disable_warnings=True)(
        model=None,
        x_batch=images.numpy(),
        y_batch=np.zeros(4, dtype=int),
        a_batch=maps[:, None].numpy(),
    )
    np.testing.assert_allclose(sparseness(maps).numpy(), np.asarray(theirs), atol=1e-5)
    assert sparseness(maps)[1] > sparseness(maps)[0]
    assert abs(float(sparseness(maps)[2])) < 1e-6


def test_pointing_game_matches_quantus(case) -> None:
    _, images, maps, _ = case
    boxes = torch.tensor([[0, 0, 4, 4], [2, 2, 8, 8], [0, 0, 8, 8], [5, 5, 6, 6]])
    peak = maps.reshape(4, -1).argmax(1)
    boxes[3] = torch.tensor(
        [peak[3] % SIZE, peak[3] // SIZE, peak[3] % SIZE + 1, peak[3] // SIZE + 1]
    )
    masks = boxes_to_masks(boxes, SIZE, SIZE)
    theirs = quantus.PointingGame(disable_warnings=True)(
        model=None,
        x_batch=images.numpy(),
        y_batch=np.zeros(4, dtype=int),
        a_batch=maps[:, None].numpy(),
        s_batch=masks[:, None].numpy().astype(float),
    )
    ours = pointing_game(maps, boxes)
    np.testing.assert_array_equal(ours.numpy(), np.asarray(theirs, dtype=float))
    assert ours[2] == 1.0 and ours[3] == 1.0
    assert torch.isnan(pointing_game(maps, torch.tensor([[0, 0, 0, 0]] * 4))).all()


def test_faithful_map_beats_its_reverse_on_every_substrate(case) -> None:
    """The gradient x input of a linear model ranks pixels by their true effect on the logit."""
    torch.manual_seed(0)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 3)).eval()
    images = torch.rand(4, 3, SIZE, SIZE)
    targets = [0, 1, 2, 0]
    weight = linear[1].weight.detach()
    contrib = torch.stack(
        [(weight[t] - weight.mean(0)).reshape(3, SIZE, SIZE) * x for t, x in zip(targets, images)]
    ).sum(1)
    for substrate in ("zero", "mean", "blur", torch.full((3, 1, 1), 0.5)):
        good = deletion_insertion_auc(linear, images, contrib, targets, substrate=substrate)
        bad = deletion_insertion_auc(linear, images, -contrib, targets, substrate=substrate)
        assert (good[0] < bad[0]).all() and (good[1] > bad[1]).all(), substrate
        assert all(((v >= 0) & (v <= 1)).all() for v in good + bad)


def test_batch_size_does_not_change_the_curves(case) -> None:
    model, images, maps, targets = case
    one = perturbation_curves(model, images, maps, targets, batch_size=7)
    many = perturbation_curves(model, images, maps, targets, batch_size=1000)
    torch.testing.assert_close(one, many, atol=1e-5, rtol=0)  # different batch kernels


def test_bad_input_is_refused(case) -> None:
    model, images, maps, targets = case
    with pytest.raises(ValueError, match=r"maps must be \[N, H, W\]"):
        deletion_insertion_auc(model, images, maps[:, :4], targets)
    with pytest.raises(ValueError, match="one per image"):
        deletion_insertion_auc(model, images, maps, targets[:2])
    with pytest.raises(ValueError, match="unknown substrate 'noise'"):
        deletion_insertion_auc(model, images, maps, targets, substrate="noise")
    with pytest.raises(ValueError, match="steps must be between 1"):
        deletion_insertion_auc(model, images, maps, targets, steps=0)
