"""Feature isolation: which pixels of an image carry the evidence for a class.

Mask optimisation (default): for every (image, class) pair at once, optimise a smooth mask (one
value per ``isolation_cell`` pixels) so that ``x * m + background * (1 - m)`` keeps the class's logit,
clamped at its unmasked value so the mask cannot invent evidence, while ``isolation_alpha_weight``
shrinks the mask and ``isolation_hf_weight`` keeps it smooth. ``use_hipe`` swaps this for
hierarchical perturbation (see :mod:`leapcore.hipe`). The background is ``isolation_background``.

Either way the result is a saliency map; :func:`calibrate` turns it into the reported mask: the
smallest top share of the map (from :data:`LEVELS`) whose isolated image keeps ``isolation_keep`` of
the class logit. Every pair stores what it kept (logit and probability ratios), its coverage and the
RISE deletion / insertion AUC of its saliency map (:mod:`leapcore.faithfulness`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from leapcore import penalties, rowwise, stopping
from leapcore.config import EngineConfig
from leapcore.errors import InputError, NonFiniteError
from leapcore.optim import BatchedAdam
from leapcore.outputs import model_probabilities
from leapcore.rng import RowKey, RowStreams, Stream

LEVELS = (
    0.01,
    0.02,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.25,
    0.3,
    0.4,
    0.5,
    0.6,
    0.7,
    0.8,
    0.9,
    1.0,
)
AUC_STEPS = 16
log = logging.getLogger(__name__)

# Masks start at 0.5 everywhere: from a full mask (sigmoid(3) ~ 0.95) the coverage penalty needed
# hundreds of steps to shrink it; from 0.5 the logit term grows the evidence and the penalty shrinks
# the rest within ~100 steps on efficientnet_lite0 (coverage ~0.3 keeping >= 100 % of the logit).
_MASK_INIT = 0.0


# Optional per-pair measures of an IsolationResult (None when not measured), in table order.
PAIR_MEASURES = ("kept_prob", "prob_full", "prob_isolated", "deletion_auc", "insertion_auc")


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
        kept_prob: ``[P]`` the class probability on the isolated image ÷ on the whole image.
        prob_full, prob_isolated: ``[P]`` the class probability on the whole / isolated image (the
            two sides of ``kept_prob``: a tiny ``prob_full`` makes any ratio look large).
        deletion_auc, insertion_auc: ``[P]`` RISE AUCs of the pair's saliency map (blurred
            substrate, :data:`AUC_STEPS` budgets); None when not measured.
    """

    pairs: list[tuple[int, int]]
    masks: torch.Tensor
    isolated: torch.Tensor
    logits_full: torch.Tensor
    logits_isolated: torch.Tensor
    method: str
    seconds: float = 0.0
    kept_prob: torch.Tensor | None = None
    prob_full: torch.Tensor | None = None
    prob_isolated: torch.Tensor | None = None
    deletion_auc: torch.Tensor | None = None
    insertion_auc: torch.Tensor | None = None

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

    @classmethod
    @torch.no_grad()
    def from_saliency(
        cls,
        model: torch.nn.Module,
        pairs: list[tuple[int, int]],
        source: torch.Tensor,
        classes: torch.Tensor,
        saliency: torch.Tensor,
        background: torch.Tensor,
        logits_full: torch.Tensor,
        method: str,
        began: float,
        chunk_size: int,
        keep: float,
    ) -> IsolationResult:
        """The reported result of a saliency map: calibrated mask, kept ratios and RISE AUCs."""
        from leapcore.faithfulness import deletion_insertion_auc

        masks = calibrate(
            model, source, classes, saliency, background, logits_full, keep, chunk_size
        )
        result = cls.from_masks(
            model, pairs, source, classes, masks, background, logits_full, method, began, chunk_size
        )
        isolated = result.isolated.to(source.device)
        p_full = _class_probs(model, source, classes, chunk_size)
        p_iso = _class_probs(model, isolated, classes, chunk_size)
        result.kept_prob = (p_iso / p_full.clamp_min(1e-12)).cpu()
        result.prob_full, result.prob_isolated = p_full.cpu(), p_iso.cpu()
        deletion, insertion = deletion_insertion_auc(
            model,
            source,
            saliency[:, 0],
            classes.tolist(),
            steps=AUC_STEPS,
            substrate="blur",
            batch_size=chunk_size,
        )
        result.deletion_auc, result.insertion_auc = deletion.float(), insertion.float()
        result.seconds = time.perf_counter() - began
        return result

    @property
    def coverage(self) -> torch.Tensor:
        return self.masks.flatten(1).mean(1)

    @property
    def kept(self) -> torch.Tensor:
        """Share of the full logit that the isolated image keeps."""
        return self.logits_isolated / self.logits_full.abs().clamp_min(1e-6)


def mask_cell(config: EngineConfig, h: int, w: int) -> int:
    """Pixels per mask cell: ``isolation_cell``, else a sixteenth of the shorter side in 1..4."""
    if config.isolation_cell is not None:
        return config.isolation_cell
    return max(1, min(4, min(h, w) // 16))


def make_background(kind: str, source: torch.Tensor, seed: int, keys: list[RowKey]) -> torch.Tensor:
    """What masked-out pixels show: a heavy blur of each image, its mean colour, or seeded noise."""
    if kind == "blur":
        from leapcore.hipe import blurred_substrate

        return blurred_substrate(source)
    if kind == "mean":
        return source.mean((2, 3), keepdim=True).expand_as(source).contiguous()
    return background_noise(seed, keys, tuple(source.shape[1:]), source.device)


@torch.no_grad()
def calibrate(
    model: torch.nn.Module,
    source: torch.Tensor,
    classes: torch.Tensor,
    saliency: torch.Tensor,
    background: torch.Tensor,
    full: torch.Tensor,
    keep: float,
    chunk_size: int,
) -> torch.Tensor:
    """Binary masks ``[P, 1, H, W]``: per pair the top pixels of ``saliency`` at the smallest share of
    :data:`LEVELS` whose isolated image keeps ``keep`` of the full logit (for a negative logit: does
    not fall further than ``1 - keep`` of its size). ``keep == 0`` returns the saliency itself."""
    if keep <= 0:
        return saliency
    n, _, h, w = saliency.shape
    flat = saliency.flatten(1)
    ranks = flat.argsort(1, descending=True).argsort(1).view(n, 1, h, w)
    chosen = torch.full((n,), LEVELS[-1], device=source.device)
    done = torch.zeros(n, dtype=torch.bool, device=source.device)
    need = full - (1 - keep) * full.abs()
    for level in LEVELS[:-1]:
        todo = (~done).nonzero().flatten()
        if len(todo) == 0:
            break
        top = (ranks[todo] < round(level * h * w)).to(source.dtype)
        view = source[todo] * top + background[todo] * (1 - top)
        ok = _class_logits(model, view, classes[todo], chunk_size) >= need[todo]
        chosen[todo[ok]] = level
        done[todo[ok]] = True
    return (ranks < (chosen * h * w).round().view(n, 1, 1, 1)).to(source.dtype)


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
    cell = mask_cell(config, h, w)
    grid = (max(1, h // cell), max(1, w // cell))
    param = torch.full((n, 1, *grid), _MASK_INIT, device=device, requires_grad=True)
    optimiser = BatchedAdam([param])
    keys = pair_keys(pairs, image_keys)
    streams = RowStreams(config.seed + Stream.ISOLATION_STEPS, keys, device)
    steps = config.steps_for_isolation
    bad_step = torch.full((), -1, dtype=torch.long, device=device)
    last_finite = param.detach().clone()
    fixed = None
    if config.isolation_background != "noise":
        fixed = make_background(
            config.isolation_background, source, config.seed + Stream.ISOLATION_BACKGROUND, keys
        )
    for step in range(1, steps + 1):
        stopping.check()
        noise = streams.rand(source.shape[1:]) if fixed is None else fixed
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
            log.info("isolation step %d/%d", step, steps)
    with torch.no_grad():
        masks = _upsample(param, (h, w))
    background = make_background(
        config.isolation_background, source, config.seed + Stream.ISOLATION_BACKGROUND, keys
    )
    return IsolationResult.from_saliency(
        model,
        pairs,
        source,
        cls,
        masks,
        background,
        full,
        "mask",
        began,
        chunk_size,
        config.isolation_keep,
    )


def _upsample(param: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(rowwise.sigmoid(param), size=size, mode="bilinear", align_corners=False)


def _class_probs(
    model: torch.nn.Module, images: torch.Tensor, cls: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    out = [
        model_probabilities(model, model(images[i : i + chunk_size])).gather(
            1, cls[i : i + chunk_size, None]
        )
        for i in range(0, len(images), chunk_size)
    ]
    return torch.cat(out).squeeze(1)


def _class_logits(
    model: torch.nn.Module, images: torch.Tensor, cls: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    out = [
        model(images[i : i + chunk_size]).gather(1, cls[i : i + chunk_size, None]).squeeze(1)
        for i in range(0, len(images), chunk_size)
    ]
    return torch.cat(out)
