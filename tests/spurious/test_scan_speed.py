"""The scan's cheaper parts compute what the slower ones did (issue 15's overhead limit).

- :func:`leapcore.spurious_paste.connected_components` (union by minimum with pointer jumping)
  labels exactly as a plain flood fill does, on random masks, a long snake and edge cases;
- :func:`leapcore.spurious.scan_audit` asks the model about the prototypes' classes once for both
  rules (the image rule and the paint probe), and its numbers are those it gives when each rule
  computes its own.
"""

from __future__ import annotations

import math
from collections import deque

import torch
import torch.nn.functional as F

from leapcore.config import load_config
from leapcore.spurious import ScanSettings, scan_audit, scan_classes
from leapcore.spurious_paste import connected_components, model_probs, top_region


def flood_fill(mask: torch.Tensor) -> torch.Tensor:
    """Reference: 8-connected components by breadth-first search, labelled 1 + the smallest flat
    index of the component (0 = background)."""
    h, w = mask.shape
    m = mask.tolist()
    out = [[0] * w for _ in range(h)]
    for y0 in range(h):
        for x0 in range(w):
            if not m[y0][x0] or out[y0][x0]:
                continue
            label = y0 * w + x0 + 1  # raster order: the first pixel met is the smallest index
            out[y0][x0] = label
            queue = deque([(y0, x0)])
            while queue:
                y, x = queue.popleft()
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        v, u = y + dy, x + dx
                        if 0 <= v < h and 0 <= u < w and m[v][u] and not out[v][u]:
                            out[v][u] = label
                            queue.append((v, u))
    return torch.tensor(out, dtype=torch.long)


def snake(h: int, w: int) -> torch.Tensor:
    """One component whose only path runs back and forth over every row: longest possible."""
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[::4] = True
    for i, r in enumerate(range(0, h - 4, 4)):
        mask[r : r + 4, w - 1 if i % 2 == 0 else 0] = True
    return mask


def test_connected_components_equal_a_flood_fill() -> None:
    gen = torch.Generator().manual_seed(0)
    cases = [
        torch.zeros(6, 6, dtype=torch.bool),
        torch.ones(5, 7, dtype=torch.bool),
        torch.ones(1, 1, dtype=torch.bool),
        torch.rand(1, 40, generator=gen) > 0.5,
        torch.rand(40, 1, generator=gen) > 0.5,
        snake(48, 40),
        snake(48, 40).T.contiguous(),
    ]
    for h, w in ((9, 13), (32, 32), (64, 48)):
        for smooth in (1, 3, 7):
            for share in (0.05, 0.2, 0.5):
                k = min(smooth, h, w)
                noise = torch.rand(1, 1, h + k - 1, w + k - 1, generator=gen)
                m = F.avg_pool2d(noise, k, stride=1)[0, 0]
                cases.append(m >= m.flatten().quantile(1 - share))
    many = 0
    for mask in cases:
        expected = flood_fill(mask)
        assert torch.equal(connected_components(mask), expected), mask.shape
        many = max(many, len(expected.unique()) - 1)
    assert many > 20  # the random masks do fall apart into many components
    assert len(flood_fill(snake(48, 40)).unique()) == 2  # the snake is one component


def test_top_region_picks_the_heavier_blob_on_a_snake_and_a_dot() -> None:
    mask = snake(32, 32)
    saliency = mask.float() * 0.5
    saliency[20, 10] = 0.0  # the snake passes (the dot below is off it)
    saliency[30, 10] = 40.0  # a single heavy pixel, off the snake
    share = (int(mask.sum()) + 1) / mask.numel()
    region = top_region(saliency, share)  # the snake (mass ~ 150) outweighs the dot (40)
    assert region[0, 0] and region[8, 31] and not region[30, 10]


class Counting(torch.nn.Module):
    """Records every batch the model is asked about."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.batches: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.detach().clone())
        return self.model(x)


def _tiny_audit(classes: int = 4, size: int = 16):
    from leapcore.prototypes import PrototypeResult

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(32, classes),
    ).eval()
    images = torch.rand(classes, 3, size, size)
    with torch.no_grad():
        logits = net(images)
    protos = PrototypeResult(
        targets=[[c] for c in range(classes)],
        per_target=1,
        images=images,
        alphas=None,
        logits=logits,
        trajectory_steps=[],
        trajectory=torch.zeros(0, classes, classes),
        lr=0.1,
        steps=10,
        seconds=0.0,
    )
    config = load_config({"input_dim": [3, size, size], "seed": 0})
    return net, protos, config


def test_scan_asks_for_the_prototypes_classes_once() -> None:
    net, protos, config = _tiny_audit()
    counting = Counting(net)
    scans = scan_audit(counting, protos, protos.images[:1], 0.1, None, config, 64)
    assert len(scans) == 4
    whole = [b for b in counting.batches if b.shape == protos.images.shape]
    same = [b for b in whole if torch.equal(b, protos.images)]
    # Once for both rules' class predictions (it was twice), once as the evidence maps' unoccluded
    # logits (one prototype per class: each is its class's evidence image, on target or not).
    # Fewer would be fine (those logits could come from the first call); more is a recomputation.
    assert 1 <= len(same) <= 2, len(same)


def test_given_probabilities_give_the_same_scan() -> None:
    net, protos, config = _tiny_audit()
    owners = list(range(4))
    settings = ScanSettings(target_confidence=0.0)  # the tiny model is not confident
    samples = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    own = scan_classes(
        net, owners, list("abcd"), protos.images, owners, samples, config, 3, settings
    )
    given = scan_classes(
        net,
        owners,
        list("abcd"),
        protos.images,
        owners,
        samples,
        config,
        3,
        settings,
        model_probs(net, protos.images, 3),
    )
    assert sum(a.pastes for a in own) > 0
    for a, b in zip(own, given, strict=True):
        assert (a.verdict, a.flips, a.pastes, a.samples) == (
            b.verdict,
            b.flips,
            b.pastes,
            b.samples,
        )
        for x, y in ((a.flip_rate, b.flip_rate), (a.concentration, b.concentration)):
            assert math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-6) or (
                math.isnan(x) and math.isnan(y)
            )
