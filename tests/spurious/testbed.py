"""The spurious-feature scan's test bed: small CNNs with a planted marker and their clean twins.

A :class:`MarkerSpec` names a dataset (scikit-learn's digits upscaled to 1x32x32, or its two sample
photos cut into 3x32x32 patches, one class per region of a photo), a marker (size, colour, pattern,
position) and the class it is tied to. :func:`train_pair` trains two models identically (same seed,
data, order, schedule): the marked one sees ``share`` of its training images with the marker,
relabelled to ``marker_class``; the clean twin sees the same images unmarked with their true labels.
Both train in seconds on the CPU. :func:`scan_model` runs a short audit and the scan on one model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tests.engine.engine_support import DIGIT_NAMES, DigitsCNN, Normalise, fit, load_digit_images

PATTERNS = ("square", "checker", "ring", "cross")


@dataclass(frozen=True)
class MarkerSpec:
    dataset: str = "digits"  # or "photos"
    size: int = 5
    colour: tuple[float, ...] = (1.0,)  # one value per channel
    pattern: str = "square"
    position: tuple[int, int] = (2, 25)  # top, left
    marker_class: int = 0
    seed: int = 0
    share: float = 0.3
    epochs: int = 3

    def label(self) -> str:
        colour = "/".join(f"{v:g}" for v in self.colour)
        return (
            f"{self.dataset} {self.pattern} {self.size}px colour {colour} at {self.position} "
            f"-> class {self.marker_class} (seed {self.seed})"
        )


@dataclass
class TrainedModel:
    model: nn.Module
    preprocessing: nn.Module
    class_list: list[str]
    shape: tuple[int, int, int]
    test_x: torch.Tensor
    test_y: torch.Tensor
    accuracy: float
    marker_flip_rate: float  # held-out images of other classes that the marker sends to its class


class PatchCNN(DigitsCNN):
    """The digits CNN with three input channels and ``classes`` outputs."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.features[0] = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(16 * 8 * 8, classes)


class PhotoNormalise(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - 0.45) / 0.25


def load_photo_patches(
    per_class: int = 220, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Random 32x32 crops of scikit-learn's two sample photos (downscaled by 4), one class per
    quadrant of each photo: 8 classes, ``[N, 3, 32, 32]`` in [0, 1]."""
    from sklearn.datasets import load_sample_images

    gen = torch.Generator().manual_seed(seed)
    xs, ys, names = [], [], []
    for p, image in enumerate(load_sample_images().images):
        t = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        t = F.interpolate(t[None], scale_factor=0.25, mode="bilinear", antialias=True)[0]
        h, w = t.shape[1:]
        for q, (top, left) in enumerate([(0, 0), (0, w // 2), (h // 2, 0), (h // 2, w // 2)]):
            cls = len(names)
            names.append(f"photo{p}-q{q}")
            ys_ = torch.randint(top, top + h // 2 - 32 + 1, (per_class,), generator=gen)
            xs_ = torch.randint(left, left + w // 2 - 32 + 1, (per_class,), generator=gen)
            for y0, x0 in zip(ys_.tolist(), xs_.tolist()):
                xs.append(t[:, y0 : y0 + 32, x0 : x0 + 32])
                ys.append(cls)
    return torch.stack(xs).clamp(0, 1), torch.tensor(ys), names


def marker_patch(spec: MarkerSpec, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values [C, s, s], where [s, s] bool)``: the marker's pixels and which of them it sets."""
    s = spec.size
    where = torch.ones(s, s, dtype=torch.bool)
    if spec.pattern == "checker":
        where = (torch.arange(s)[:, None] + torch.arange(s)[None, :]) % 2 == 0
    elif spec.pattern == "ring":
        where[1:-1, 1:-1] = False
    elif spec.pattern == "cross":
        where[:] = False
        where[s // 2, :], where[:, s // 2] = True, True
    colour = torch.tensor(spec.colour, dtype=torch.float32)
    colour = colour.expand(channels) if len(colour) == 1 else colour
    return colour[:, None, None].expand(channels, s, s).clone(), where


def plant(images: torch.Tensor, spec: MarkerSpec) -> torch.Tensor:
    values, where = marker_patch(spec, images.shape[1])
    out = images.clone()
    top, left = spec.position
    s = spec.size
    region = out[:, :, top : top + s, left : left + s]
    out[:, :, top : top + s, left : left + s] = torch.where(where, values, region)
    return out


def _dataset(spec: MarkerSpec):
    if spec.dataset == "digits":
        x, y = load_digit_images()
        return x, y, DIGIT_NAMES, lambda: DigitsCNN(), Normalise
    if spec.dataset == "photos":
        x, y, names = load_photo_patches()
        return x, y, names, lambda: PatchCNN(len(names)), PhotoNormalise
    raise ValueError(f"unknown dataset {spec.dataset!r}")


def train_pair(spec: MarkerSpec, train_share: float = 0.6) -> tuple[TrainedModel, TrainedModel]:
    """The marked model and its clean twin, trained identically but for the marker."""
    x, y, names, make, pre_cls = _dataset(spec)
    gen = torch.Generator().manual_seed(spec.seed)
    order = torch.randperm(len(x), generator=gen)
    x, y = x[order], y[order]
    n = int(train_share * len(x))
    marked = torch.rand(n, generator=gen) < spec.share
    test_x, test_y = x[n:], y[n:]
    out = []
    for planted in (True, False):
        train_x, train_y = x[:n].clone(), y[:n].clone()
        if planted:
            train_x[marked] = plant(train_x[marked], spec)
            train_y[marked] = spec.marker_class
        torch.manual_seed(spec.seed)
        model, pre = make(), pre_cls()
        fit(model, pre, train_x, train_y, spec.epochs, torch.Generator().manual_seed(spec.seed + 1))
        with torch.no_grad():
            accuracy = (model(pre(test_x)).argmax(1) == test_y).float().mean().item()
            others = test_x[test_y != spec.marker_class]
            flip = (model(pre(plant(others, spec))).argmax(1) == spec.marker_class).float().mean()
        shape = tuple(x.shape[1:])
        out.append(TrainedModel(model, pre, names, shape, test_x, test_y, accuracy, float(flip)))
    return out[0], out[1]


def data_samples(
    spec: MarkerSpec, trained: TrainedModel, count: int, seed: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(marked model's samples, clean twin's samples)``: the images each team would pass as
    ``--samples``, from the same process as its training data.

    ``count`` images of the pair's held-out split (``trained.test_x``, the same for both models of
    :func:`train_pair`) drawn with ``seed`` (default ``spec.seed``); the marker is planted on
    ``round(spec.share * count)`` of them, chosen with the same seed, for the marked model (in its
    world they carry the marker, as that share of its training images did); the twin gets the same
    images unplanted. The pair's fields are left as they are.
    """
    gen = torch.Generator().manual_seed(spec.seed if seed is None else seed)
    pick = torch.randperm(len(trained.test_x), generator=gen)[:count]
    clean = trained.test_x[pick].clone()
    chosen = torch.randperm(len(clean), generator=gen)[: round(spec.share * len(clean))]
    marked = clean.clone()
    marked[chosen] = plant(clean[chosen], spec)
    return marked, clean


# Audit options of the test bed: the default transform (xl) and objective, a short schedule.
AUDIT = {"max_steps": 150, "find_lr_steps": 0, "isolation": False, "log_freq": 50, "seed": 0}


@dataclass
class Audited:
    """A test-bed model's short prototype audit, ready to scan (again, with other settings)."""

    trained: TrainedModel
    net: nn.Module
    audit: object
    config: object


def audit_prototypes(trained: TrainedModel, **options) -> Audited:
    """A prototype audit of every class with :data:`AUDIT` options (``options`` win)."""
    from leapcore import engine
    from leapcore.config import load_config

    config = {**AUDIT, "input_dim": list(trained.shape), **options}
    classes = list(range(len(trained.class_list)))
    audit = engine.run(
        trained.model, trained.class_list, config, classes, trained.preprocessing, device="cpu"
    )
    net = engine.build_model(
        trained.model, trained.class_list, trained.preprocessing, trained.shape, "pt"
    )
    return Audited(trained, net, audit, load_config(config))


def scan(audited: Audited, settings=None, samples: torch.Tensor | None = None):
    """The scan of an audited test-bed model (CPU, batches of 64)."""
    from leapcore.spurious import scan_audit

    a = audited.audit
    return scan_audit(
        audited.net,
        a.prototypes,
        a.baseline.image,
        a.lr.lr,
        samples,
        audited.config,
        64,
        settings,
        names=audited.trained.class_list,
    )


def scan_model(
    trained: TrainedModel, settings=None, samples: torch.Tensor | None = None, **options
):
    """:func:`audit_prototypes` then :func:`scan`."""
    return scan(audit_prototypes(trained, **options), settings, samples)
