"""Feature isolation: which pixels of an image carry the evidence for a class.

:func:`isolate_features` runs the method that the ``isolation_method`` option names (registry:
:mod:`leapcore.isolation_methods`). Mask optimisation (``mask``, the default, defined here): for
every (image, class) pair at once, optimise a smooth mask (one value per ``isolation_cell`` pixels)
so that ``x * m + background * (1 - m)`` keeps the class's logit, clamped at its unmasked value so
the mask cannot invent evidence, while ``isolation_alpha_weight`` shrinks the mask and
``isolation_hf_weight`` keeps it smooth. With ``isolation_map: evidence`` (the default) the saliency
is that mask times each pixel's ``gradient . (image - background)`` (:func:`evidence_map`): the mask
finds the region in a few steps, the gradient ranks the pixels inside it. ``hipe`` is hierarchical
perturbation (:mod:`leapcore.hipe`; leap-ie's ``use_hipe: true`` selects it). The background is
``isolation_background``.

Either way the result is a saliency map; :func:`calibrate` turns it into the reported mask: the
smallest top share of the map (from :data:`LEVELS`) whose isolated image keeps ``isolation_keep`` of
the class logit. Every pair stores what it kept (logit and probability ratios), its coverage and the
RISE deletion / insertion AUC of its saliency map (:mod:`leapcore.faithfulness`).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from leapcore import hipe as _hipe  # noqa: F401  (registers "hipe")
from leapcore import penalties, rowwise, stopping
from leapcore.convergence import MetricPlateau, as_rows
from leapcore.errors import InputError, NonFiniteError
from leapcore.evidence_fill import fill_gaps
from leapcore.isolation_methods import (
    AUC_STEPS,
    ISOLATION_METHODS,
    ISOLATION_TITLES,
    LEVELS,
    PAIR_MEASURES,
    IsolationResult,
    background_noise,
    calibrate,
    get_isolation_method,
    isolation_method,
    logits_rows,
    make_background,
    no_grad_rows,
    pair_keys,
)
from leapcore.optim import BatchedAdam
from leapcore.progress import report, with_progress
from leapcore.rng import RowKey, RowStreams, Stream
from leapcore.stage_names import ISOLATION

if TYPE_CHECKING:
    from leapcore.config import EngineConfig

__all__ = [
    "AUC_STEPS",
    "ISOLATION_METHODS",
    "ISOLATION_TITLES",
    "LEVELS",
    "PAIR_MEASURES",
    "IsolationResult",
    "background_noise",
    "calibrate",
    "choose_classes",
    "evidence_gradient",
    "evidence_map",
    "isolate_features",
    "isolate_with_mask",
    "make_background",
    "mask_cell",
    "pair_keys",
]

log = logging.getLogger(__name__)

# Masks start at 0.5 everywhere: from a full mask (sigmoid(3) ~ 0.95) the coverage penalty needed
# hundreds of steps to shrink it; from 0.5 the logit term grows the evidence and the penalty shrinks
# the rest within ~100 steps on efficientnet_lite0 (coverage ~0.3 keeping >= 100 % of the logit).
_MASK_INIT = 0.0

# ``isolation_map: evidence``: the weight of the mask alone next to the per-pixel evidence (scaled to
# a peak of 1). Measured on 3 marker CNNs (6 images each) and Lite0 photos, 10-15 mask steps: 0 (ties
# at zero) deleted no better than the gradient alone (0.35-0.73 on markers); 0.003 put more of the
# map on the marker (0.40-0.49 at 15 steps, lr 0.1) but deleted worse (0.18-0.35); 0.03 deleted a
# little better (0.06-0.20) with less on the marker (0.33-0.41) and less photo insertion (0.27 vs
# 0.29 with 0.01, 4 views).
EVIDENCE_FLOOR = 0.01

# ``isolation_map: evidence``: the map is (mask ** 2 + EVIDENCE_SHARE * (1 - the pair's mask peak)) x
# the evidence weight. Measured (issue 19, benchmarks/fidelity.py: 4 Lite0 photo views, 3 marker CNNs
# x 6 images; log-probability evidence), photo deletion / insertion, marker mass A / B / C:
# - mask x evidence: 0.040 / 0.300, mass 0.42 / 0.45 / 0.51 (with the logit's gradient 0.043 / 0.291);
# - (mask + 1 - peak): 0.036 / 0.359, mass 0.40 / 0.41 / 0.47; share 2: 0.035 / 0.375, 0.38-0.45;
# - (mask ** 2 + 1 - peak), chosen: 0.036 / 0.371, mass 0.45 / 0.49 / 0.57, marker deletion
#   0.084 / 0.086 / 0.225 (mask x evidence 0.095 / 0.094 / 0.218);
# - (mask ** 2 + 1 - peak ** 2): 0.036 / 0.383, mass 0.42 / 0.45 / 0.52;
# - a share of the mask's mean instead of 1 - peak: 0.338 inserted, mass 0.37 / 0.37 / 0.43. Masks on
#   markers and photos have the same mean; their peak differs (0.92-0.95 on markers, 0.38-0.80 on
#   photos after 10 steps): a peak near 1 means the mask found a region that keeps the class;
# - adding the evidence alone (max or sum with it): photos 0.037-0.048 / 0.38-0.40, marker mass
#   0.22-0.39 and marker deletion up to 0.9.
# On four held-out scikit-image photos (mirrored, 8 views; chosen after the rest) the chosen map
# deleted / inserted 0.217 / 0.513, mask x logit evidence (the default before) 0.239 / 0.515, captum's
# IntegratedGradients read signed 0.108 / 0.425: there the mask costs deletion.
EVIDENCE_SHARE = 1.0
# Tried against those photos and rejected (issue 19, h19p; /work/notes/issue-19-photos.md): evidence
# integrated along the path from the background (2-16 points: 0.208-0.238 / 0.489-0.508), the mask
# steps' own view gradients (free: 0.247 / 0.465, with the image's 0.212 / 0.504 but sklearn insertion
# 0.334 < IG's 0.350), evidence at the blurred side, with the mask's region removed, of the logit,
# smoothed, rank mixes. What the mask changes on photos is the order of the half of the pixels whose
# evidence is <= 0: without the mask there, 0.126 / 0.449 (the evidence alone's trade); no map tried
# both deleted under IG's 0.108 and inserted over Occlusion's 0.553.

# Isolation early stop (``isolation_stop_early``): every 10 steps, a pair whose window means of kept
# logit share and coverage both moved by at most 0.01 since the previous check, twice in a row, stops.
ISOLATION_CHECK_EVERY = 10
ISOLATION_TOLERANCE = 0.01
ISOLATION_PATIENCE = 2


def mask_cell(config: EngineConfig, h: int, w: int) -> int:
    """Pixels per mask cell: ``isolation_cell``, else a sixteenth of the shorter side in 1..4."""
    if config.isolation_cell is not None:
        return config.isolation_cell
    return max(1, min(4, min(h, w) // 16))


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


@with_progress
def isolate_features(
    model: torch.nn.Module,
    images: torch.Tensor,
    classes: list[list[int]],
    config: EngineConfig,
    chunk_size: int,
    image_keys: list[RowKey] | None = None,
) -> IsolationResult:
    """Isolate the features of ``classes[i]`` in ``images[i]`` with the ``isolation_method``.

    ``image_keys`` name the images for the random streams (a prototype's ``row_keys`` entry), so a
    pair draws the same noise in any batch; default: the image's position. A keyword
    ``progress=callback`` gets this call's :class:`~leapcore.progress.ProgressEvent` s.

    Raises:
        InputError: no method of that name is registered.
        NonFiniteError: the mask objective became NaN/Inf; carries the last finite masks.
    """
    method = get_isolation_method(config.isolation_method)
    return method(model, images, classes, config, chunk_size, image_keys)


@isolation_method("mask", title="mask optimisation")
def isolate_with_mask(
    model: torch.nn.Module,
    images: torch.Tensor,
    classes: list[list[int]],
    config: EngineConfig,
    chunk_size: int,
    image_keys: list[RowKey] | None = None,
) -> IsolationResult:
    """Optimise one smooth mask per (image, class) pair, all pairs in one batch.

    Raises:
        NonFiniteError: the mask objective became NaN/Inf; carries the last finite masks.
    """
    began = time.perf_counter()
    pairs = [(i, c) for i, cs in enumerate(classes) for c in cs]
    device = images.device
    source = images[torch.tensor([p[0] for p in pairs], device=device)]
    cls = torch.tensor([p[1] for p in pairs], device=device)
    n, _, h, w = source.shape
    gradient = None
    if config.isolation_map == "evidence":
        # The evidence's gradient is taken at the image, so it comes with the full logits.
        full_rows, gradient = evidence_gradient(model, source, cls, chunk_size)
    else:
        with torch.no_grad():
            full_rows = logits_rows(model, source, chunk_size)
    full = full_rows.gather(1, cls[:, None]).squeeze(1)
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
    # What masked-out pixels show in the result; the steps show it too unless it is noise, which
    # they draw afresh every step.
    background = make_background(
        config.isolation_background, source, config.seed + Stream.ISOLATION_BACKGROUND, keys
    )
    fixed = None if config.isolation_background == "noise" else background
    if gradient is not None:
        # Kept as one value per pixel, not per channel, while the masks are optimised.
        gradient = (gradient * (source - background)).sum(1, keepdim=True)
    # A pair stops at a check after ``patience`` checks that follow a first one: with fewer steps
    # than that no pair can stop, and the plateau is not tracked.
    plateau = (
        MetricPlateau(n, ISOLATION_CHECK_EVERY, ISOLATION_TOLERANCE, ISOLATION_PATIENCE)
        if config.isolation_stop_early and steps >= ISOLATION_CHECK_EVERY * (ISOLATION_PATIENCE + 1)
        else None
    )
    active = list(range(n))
    for step in range(1, steps + 1):
        stopping.check()
        whole = len(active) == n
        # Noise is drawn for the pairs still running only (local positions); a fixed background
        # is indexed by pair.
        noise = (
            streams.rand(source.shape[1:], rows=None if whole else active)
            if fixed is None
            else fixed
        )
        loss_total = torch.zeros((), device=device)
        measured = []
        for start in range(0, len(active), chunk_size):
            local = slice(start, min(start + chunk_size, len(active)))
            rows = local if whole else as_rows(active[local], device)
            # One sigmoid for the mask and its smoothness penalty; the whole batch unsliced.
            soft = rowwise.sigmoid(param if whole and len(active) <= chunk_size else param[rows])
            mask = F.interpolate(soft, size=(h, w), mode="bilinear", align_corners=False)
            view = source[rows] * mask + noise[local if fixed is None else rows] * (1 - mask)
            logit = model(view).gather(1, cls[rows, None]).squeeze(1)
            kept = torch.minimum(logit, full[rows]) / scale[rows]
            coverage = penalties.coverage(mask)
            loss = (
                -kept
                + config.isolation_alpha_weight * coverage
                + config.isolation_hf_weight * penalties.high_frequency(soft)
            ).sum()
            loss.backward()
            loss_total = loss_total + loss.detach()
            if plateau is not None:
                measured.append(torch.stack([kept.detach(), coverage.detach()], 1))
        finite = torch.isfinite(loss_total) & torch.isfinite(param.grad.sum())
        bad_step = torch.where((bad_step < 0) & ~finite, torch.full_like(bad_step, step), bad_step)
        optimiser.step(
            [param.grad],
            config.isolation_lr,
            None if whole else torch.tensor(active, device=device),
        )
        param.grad = None
        if plateau is not None:
            # Pairs whose kept logit share and coverage stopped moving leave the batch.
            plateau.add(torch.cat(measured), active)
            if plateau.due(step):
                done = set(plateau.check(step, active))
                active = [r for r in active if r not in done]
        if step % config.log_freq == 0 or step == steps or not active:
            first_bad = int(bad_step)
            if first_bad >= 0:
                raise NonFiniteError(
                    "feature isolation", first_bad, _upsample(last_finite, (h, w)).cpu()
                )
            last_finite = param.detach().clone()
            report(ISOLATION, step, steps)
            log.info(
                "isolation step %d/%d, %d of %d pairs still running", step, steps, len(active), n
            )
        if not active:
            break
    steps_run = [steps if plateau is None else plateau.stopped_at.get(r, step) for r in range(n)]
    with torch.no_grad():
        masks = _upsample(param, (h, w))
    ranking = None
    if config.isolation_map == "evidence":
        masks = evidence_map(model, source, cls, masks, background, chunk_size, evidence=gradient)
        # The reported mask is a top share of the map averaged over cells: regions, not speckle.
        ranking = F.avg_pool2d(masks, 2 * cell + 1, 1, cell, count_include_pad=False)
    result = IsolationResult.from_saliency(
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
        ranking,
        full_rows=full_rows,
        rows=no_grad_rows(config, chunk_size),
    )
    result.steps_run = steps_run
    return result


def evidence_gradient(
    model: torch.nn.Module, source: torch.Tensor, cls: torch.Tensor, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``([P, K] logits, [P, C, H, W] gradient)`` of each pair's class log-probability at its image
    (log-softmax; log-sigmoid for ``multilabel_logits``): one forward and backward pass per pair."""
    logits, grads = [], []
    for start in range(0, len(source), chunk_size):
        rows = slice(start, start + chunk_size)
        x = source[rows].detach().clone().requires_grad_(True)
        with torch.enable_grad():
            out = model(x)
            (grad,) = torch.autograd.grad(_log_probability(model, out, cls[rows]).sum(), x)
        logits.append(out.detach())
        grads.append(grad)
    return torch.cat(logits), torch.cat(grads)


def evidence_map(
    model: torch.nn.Module,
    source: torch.Tensor,
    cls: torch.Tensor,
    masks: torch.Tensor,
    background: torch.Tensor,
    chunk_size: int,
    *,
    evidence: torch.Tensor | None = None,
) -> torch.Tensor:
    """``isolation_map: evidence``: the soft mask times each pixel's first-order evidence.

    A pixel's evidence ``e`` is ``gradient . (image - background)`` of the class's log-probability
    at the image (log-softmax; log-sigmoid for ``multilabel_logits``), scaled by its largest
    absolute value per pair to [-1, 1]: what replacing the pixel by the background costs the class
    probability that deletion / insertion read, to first order. The weight is ``e + f`` where
    ``e > 0`` and ``f * (1 + e)`` elsewhere (``f`` = :data:`EVIDENCE_FLOOR`), so pixels that speak
    against the class come last. The map is ``(mask ** 2 + 1 - peak) * weight``, ``peak`` the
    pair's largest mask value: a mask that reached ~1 somewhere (it found a region that keeps the
    class) orders the pixels, and a mask that stayed soft admits the evidence outside it at
    ``1 - peak`` (:data:`EVIDENCE_SHARE`). Gaps inside a region of evidence (the inside of a uniform
    patch, whose one-pixel gradient is small) are then filled from their neighbours when the mask is
    confident (:func:`leapcore.evidence_fill.fill_gaps`). One forward and backward pass per pair
    (:func:`evidence_gradient`), none when ``evidence`` (``[P, 1, H, W]``, the pixels'
    ``gradient . (image - background)`` before scaling) is given.

    Returns:
        ``[P, 1, H, W]`` in [0, 1], each pair's map scaled to a maximum of 1.
    """
    if evidence is None:
        _, gradient = evidence_gradient(model, source, cls, chunk_size)
        evidence = (gradient * (source - background)).sum(1, keepdim=True)
    evidence = evidence / _peak(evidence.abs())
    weight = torch.where(
        evidence > 0, evidence + EVIDENCE_FLOOR, EVIDENCE_FLOOR * (1 + evidence.clamp_max(0))
    )
    saliency = fill_gaps((masks**2 + EVIDENCE_SHARE * (1 - _peak(masks))) * weight, masks)
    return saliency / _peak(saliency)


def _log_probability(
    model: torch.nn.Module, logits: torch.Tensor, cls: torch.Tensor
) -> torch.Tensor:
    """``[P]`` log of the class probability as :func:`leapcore.outputs.probabilities` defines it for
    the model's ``output`` (log-sigmoid for ``multilabel_logits``, else log-softmax), computed
    stably: a class whose probability underflows still has a gradient."""
    if getattr(model, "output", "logits") == "multilabel_logits":
        return F.logsigmoid(logits.gather(1, cls[:, None])).squeeze(1)
    return logits.log_softmax(1).gather(1, cls[:, None]).squeeze(1)


def _peak(maps: torch.Tensor) -> torch.Tensor:
    return maps.flatten(1).amax(1).clamp_min(1e-12)[:, None, None, None]


def _upsample(param: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(rowwise.sigmoid(param), size=size, mode="bilinear", align_corners=False)
