"""Models beyond the single-label classifier, trained in seconds: a multi-label digits CNN and a tiny
segmenter on synthetic shapes (issue 17)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .engine_support import DIGIT_NAMES, DigitsCNN, Normalise, fit, load_digit_images

MULTI_NAMES = [*DIGIT_NAMES, "even", "large"]  # digits one-hot, plus "even" and "large" (>= 5)
SHAPE_NAMES = ["background", "square", "disk"]
SEG_SIZE = 32


def multilabel_targets(y: torch.Tensor) -> torch.Tensor:
    """``[N, 12]`` 0/1: the digit, whether it is even, whether it is 5 or more."""
    out = F.one_hot(y, 10).float()
    return torch.cat([out, (y % 2 == 0).float()[:, None], (y >= 5).float()[:, None]], dim=1)


@dataclass
class MultiDigits:
    model: nn.Module
    preprocessing: nn.Module
    class_list: list[str]
    test_x: torch.Tensor
    test_y: torch.Tensor


def train_multilabel_digits(seed: int = 0, train_size: int = 600, epochs: int = 3) -> MultiDigits:
    """The digits CNN with 12 independent sigmoid outputs, trained with binary cross-entropy."""
    x, y = load_digit_images()
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=gen)
    x, y = x[order], y[order]
    torch.manual_seed(seed)
    model, pre = DigitsCNN(), Normalise()
    model.head = nn.Linear(16 * 8 * 8, len(MULTI_NAMES))
    targets = multilabel_targets(y)
    fit(
        model,
        pre,
        x[:train_size],
        targets[:train_size],
        epochs,
        gen,
        F.binary_cross_entropy_with_logits,
    )
    return MultiDigits(model, pre, MULTI_NAMES, x[train_size:], y[train_size:])


class Sigmoided(nn.Module):
    """A multi-label model that ends in its sigmoid: probabilities, which leapcore refuses."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(x))


class TinySegmenter(nn.Module):
    """Fully convolutional, receptive field 15 pixels: ``[B, 3, H, W]`` -> ``[B, 3, H, W]`` logits."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=2, dilation=2),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=4, dilation=4),
            nn.ReLU(),
            nn.Conv2d(16, len(SHAPE_NAMES), 1),
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.body(x)}  # torchvision's segmentation models return a dict with "out"


def synthetic_shapes(n: int, seed: int, size: int = SEG_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[n, 3, size, size]`` in [0, 1] with one square and one disk each (random reddish /
    bluish colours, sizes and places) on a dark noisy background, and their label maps ``[n, size, size]``."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand((n, 3, size, size), generator=gen) * 0.2
    labels = torch.zeros((n, size, size), dtype=torch.long)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for i in range(n):
        # Reddish squares, bluish disks: colour and shape both tell the classes apart.
        colours = 0.3 * torch.rand((2, 3), generator=gen)
        colours[0, 0] += 0.7
        colours[1, 2] += 0.7
        s = int(torch.randint(6, 12, (1,), generator=gen))
        x0, y0 = (int(v) for v in torch.randint(0, size - s, (2,), generator=gen))
        square = (xx >= x0) & (xx < x0 + s) & (yy >= y0) & (yy < y0 + s)
        r = float(torch.randint(3, 6, (1,), generator=gen))
        cx, cy = (float(v) for v in torch.randint(int(r), size - int(r), (2,), generator=gen))
        disk = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        images[i][:, square] = colours[0][:, None]
        labels[i][square] = 1
        images[i][:, disk] = colours[1][:, None]
        labels[i][disk] = 2
    return images, labels


def train_segmenter(seed: int = 0, steps: int = 80) -> TinySegmenter:
    """A few seconds of Adam on 512 synthetic images."""
    images, labels = synthetic_shapes(256, seed)
    torch.manual_seed(seed)
    model = TinySegmenter()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    weights = torch.tensor([0.2, 1.0, 1.0])  # shapes are a small share of the pixels
    gen = torch.Generator().manual_seed(seed + 1)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(images), (16,), generator=gen)
        loss = F.cross_entropy(model(images[idx])["out"], labels[idx], weight=weights)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()


def pixel_accuracy(model: nn.Module, seed: int = 99) -> float:
    images, labels = synthetic_shapes(64, seed)
    with torch.no_grad():
        pred = model(images)["out"].argmax(1)
    return float((pred == labels).float().mean())


def save_tiny_segformer(folder, **extra) -> None:
    """A random tiny SegFormer (3 classes, logits at 1/4 of a 32 px input) saved in ``folder``."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    torch.manual_seed(0)
    config = SegformerConfig(
        num_encoder_blocks=2,
        depths=[1, 1],
        sr_ratios=[2, 1],
        hidden_sizes=[8, 16],
        patch_sizes=[7, 3],
        strides=[4, 2],
        num_attention_heads=[1, 2],
        mlp_ratios=[2, 2],
        decoder_hidden_size=16,
        num_labels=3,
        id2label={0: "background", 1: "square", 2: "disk"},
        label2id={"background": 0, "square": 1, "disk": 2},
        image_size=32,
        **extra,
    )
    SegformerForSemanticSegmentation(config).eval().save_pretrained(folder)
