"""Feature isolation: which pixels of an image carry the evidence for a class.

Mask optimisation (default): for every (image, class) pair at once, optimise a smooth mask so that
``x * m + noise * (1 - m)`` keeps the class's logit, clamped at its unmasked value so the mask cannot
invent evidence, while ``isolation_alpha_weight`` shrinks the mask and ``isolation_hf_weight`` keeps it
smooth. Masked-out pixels get fresh noise every step. ``use_hipe`` swaps this for hierarchical
perturbation (see :mod:`leapcore.hipe`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from leapcore import penalties, rowwise, stopping
from leapcore.config import EngineConfig
from leapcore.errors import InputError, NonFiniteError
from leapcore.optim import BatchedAdam
from leapcore.rng import RowKey, RowStreams

_MASK_DOWNSCALE = 8  # masks are optimised on a grid 8x coarser than the image, then upsampled
# Masks start at 0.5 everywhere: from a full mask (sigmoid(3) ~ 0.95) the coverage penalty needed
# hundreds of steps to shrink it; from 0.5 the logit term grows the evidence and the penalty shrinks
# the rest within ~100 steps on efficientnet_lite0 (coverage ~0.3 keeping >= 100 % of the logit).
_MASK_INIT = 0.0


@dataclass
class IsolationResult:
    """Masks and isolated images for ``pairs``: one row per (image index, class index).

    Attributes:
        pairs: ``[(image, class), ...]``.
        masks: ``[P, 1, H, W]`` in [0, 1].
        isolated: ``[P, C, H, W]`` = image * mask + background * (1 - mask).
        logits_full: ``[P]`` the class's logit on the whole image.
        logits_isolated: ``[P]`` the class's logit on the isolated image.
        method: ``"mask"`` or ``"hipe"``.
    """

    pairs: list[tuple[int, int]]
    masks: torch.Tensor
    isolated: torch.Tensor
    logits_full: torch.Tensor
    logits_isolated: torch.Tensor
    method: str
    seconds: float = 0.0

    @classmethod
    @torch.no_grad()
    def from_masks(
        cls,
        model: torch.nn.Module,
        pairs: list[tuple[int, int]],
        source: torch.Tensor,
        classes: torch.Tensor,
        masks: torch.Tensor,
        background: torch.Tensor,
        logits_full: torch.Tensor,
        method: str,
        began: float,
        chunk_size: int,
    ) -> IsolationResult:
        """Composite ``source`` on ``background`` through ``masks``, score it, move it to the CPU."""
        isolated = source * masks + background * (1 - masks)
        kept = _class_logits(model, isolated, classes, chunk_size)
        return cls(
            pairs,
            masks.cpu(),
            isolated.cpu(),
            logits_full.cpu(),
            kept.cpu(),
            method,
            time.perf_counter() - began,
        )

    @property
    def coverage(self) -> torch.Tensor:
        return self.masks.flatten(1).mean(1)

    @property
    def kept(self) -> torch.Tensor:
        """Share of the full logit that the isolated image keeps."""
        return self.logits_isolated / self.logits_full.abs().clamp_min(1e-6)


def choose_classes(
    logits: torch.Tensor,
    isolate_classes: list[list[int]] | list[int] | None,
    top: int,
    num_classes: int,
) -> list[list[int]]:
    """Per image: the given classes, else the ``top`` classes by logit."""
    n = logits.shape[0]
    if isolate_classes is None:
        k = min(top, num_classes)
        return logits.topk(k, dim=1).indices.tolist()
    if all(isinstance(c, int) for c in isolate_classes):
        chosen = [list(isolate_classes)] * n
    else:
        if len(isolate_classes) != n:
            raise InputError(
                f"isolate_classes has {len(isolate_classes)} lists but there are {n} images/targets; "
                "give one list per target (e.g. [[2, 7], [3]]) or one flat list for all."
            )
        chosen = [list(c) for c in isolate_classes]
    for classes in chosen:
        for c in classes:
            if not 0 <= int(c) < num_classes:
                raise InputError(f"isolate_classes names class {c}, outside 0..{num_classes - 1}.")
    return chosen


def pair_keys(pairs: list[tuple[int, int]], image_keys: list[RowKey] | None) -> list[RowKey]:
    """The random-stream key of each (image, class) pair: the image's key and the class."""
    return [(i if image_keys is None else image_keys[i], c) for i, c in pairs]


def background_noise(
    seed: int, keys: list[RowKey], shape: tuple[int, ...], device: torch.device
) -> torch.Tensor:
    """Uniform noise ``[len(keys), *shape]``, one row per key from its own stream."""
    return RowStreams(seed, keys, device).rand(shape)


def isolate_features(
    model: torch.nn.Module,
    images: torch.Tensor,
    classes: list[list[int]],
    config: EngineConfig,
    chunk_size: int,
    image_keys: list[RowKey] | None = None,
) -> IsolationResult:
    """Isolate the features of ``classes[i]`` in ``images[i]``, all pairs in one batch.

    ``image_keys`` name the images for the random streams (a prototype's ``row_keys`` entry), so a
    pair draws the same noise in any batch; default: the image's position.

    Raises:
        NonFiniteError: the mask objective became NaN/Inf; carries the last finite masks.
    """
    if config.use_hipe:
        from leapcore.hipe import hierarchical_perturbation

        return hierarchical_perturbation(model, images, classes, config, chunk_size, image_keys)
    began = time.perf_counter()
    pairs = [(i, c) for i, cs in enumerate(classes) for c in cs]
    device = images.device
    source = images[torch.tensor([p[0] for p in pairs], device=device)]
    cls = torch.tensor([p[1] for p in pairs], device=device)
    n, _, h, w = source.shape
    with torch.no_grad():
        full = _class_logits(model, source, cls, chunk_size)
    scale = full.abs().clamp_min(1.0)
    grid = (max(1, h // _MASK_DOWNSCALE), max(1, w // _MASK_DOWNSCALE))
    param = torch.full((n, 1, *grid), _MASK_INIT, device=device, requires_grad=True)
    optimiser = BatchedAdam([param])
    keys = pair_keys(pairs, image_keys)
    streams = RowStreams(config.seed + 4, keys, device)
    steps = config.steps_for_isolation
    bad_step = torch.full((), -1, dtype=torch.long, device=device)
    last_finite = param.detach().clone()
    for step in range(1, steps + 1):
        stopping.check()
        noise = streams.rand(source.shape[1:])
        loss_total = torch.zeros((), device=device)
        for start in range(0, n, chunk_size):
            rows = slice(start, min(start + chunk_size, n))
            mask = _upsample(param[rows], (h, w))
            view = source[rows] * mask + noise[rows] * (1 - mask)
            logit = model(view).gather(1, cls[rows, None]).squeeze(1)
            kept = torch.minimum(logit, full[rows]) / scale[rows]
            loss = (
                -kept
                + config.isolation_alpha_weight * penalties.coverage(mask)
                + config.isolation_hf_weight
                * penalties.high_frequency(rowwise.sigmoid(param[rows]))
            ).sum()
            loss.backward()
            loss_total = loss_total + loss.detach()
        finite = torch.isfinite(loss_total) & torch.isfinite(param.grad.sum())
        bad_step = torch.where((bad_step < 0) & ~finite, torch.full_like(bad_step, step), bad_step)
        optimiser.step([param.grad], config.isolation_lr)
        param.grad = None
        if step % config.log_freq == 0 or step == steps:
            first_bad = int(bad_step)
            if first_bad >= 0:
                raise NonFiniteError(
                    "feature isolation", first_bad, _upsample(last_finite, (h, w)).cpu()
                )
            last_finite = param.detach().clone()
    with torch.no_grad():
        masks = _upsample(param, (h, w))
    background = background_noise(config.seed + 5, keys, tuple(source.shape[1:]), device)
    return IsolationResult.from_masks(
        model, pairs, source, cls, masks, background, full, "mask", began, chunk_size
    )


def _upsample(param: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(rowwise.sigmoid(param), size=size, mode="bilinear", align_corners=False)


def _class_logits(
    model: torch.nn.Module, images: torch.Tensor, cls: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    out = [
        model(images[i : i + chunk_size]).gather(1, cls[i : i + chunk_size, None]).squeeze(1)
        for i in range(0, len(images), chunk_size)
    ]
    return torch.cat(out)
