"""Spurious-feature scan: does a class's evidence sit in one small region that flips other images?

A spurious feature (a watermark, a ruler, a burnt-in timestamp, a border) has three signs, and the
scan measures each per class:

- **concentration**: the class's evidence map (hierarchical-perturbation occlusion saliency,
  :mod:`leapcore.hipe`, on every prototype of the class and on the user's samples that the model
  assigns to it) puts much of its mass in one small region: the connected blob of the map's top
  ``region_share`` pixels that holds the most mass. Reported: that blob's share of the map's mass,
  averaged over the class's images.
- **position stability**: the blob stays in place from image to image (prototypes from different
  random streams, samples): the mean pairwise IoU of the blobs, and the spread of their centroids.
- **logit dependence**: the blob alone carries the class. Each image's blob is pasted, in place,
  onto images of other classes (the other classes' prototypes and samples the model assigns to
  another class); the flip rate is the share of those pastes the model then assigns to the class.
  A digit's or an object's shape is spread out and needs its context, so a few per cent of its
  pixels rarely win; a marker that the training data tied to the class does. As a control the
  same blob shape is cut half an image away (wrapping round) from the same images and pasted there:
  ``control_flip_rate`` says how often any region of that size flips those targets.

Verdict (thresholds in :class:`ScanSettings`, chosen on the marker test bed,
``benchmarks/spurious_testbed.py``):

- ``likely spurious``: flip rate >= ``likely_flip`` (0.5) and blob IoU >= ``placed_iou`` (0.2);
- ``suspicious``: blob IoU >= ``stable_iou`` (0.4, in place) and flip rate >= ``suspicious_flip``
  (0.3), or in place with concentration >= ``concentrated`` (0.5: a small, fixed region that
  pasting alone does not prove). A blob that moves from image to image is not called spurious
  however often it flips: the short-run prototypes of other classes that it is pasted onto flip
  under many small changes;
- ``clean`` otherwise. Without images of other classes the flip rate cannot be measured and the
  verdict is at most ``suspicious``; without samples the scan runs on prototypes alone. Both are
  said in the verdict's reason text.

This module runs the algorithm on tensors; prototypes are made by :mod:`leapcore.prototypes`
(:func:`extra_prototypes`) and the pipeline stage is ``tasks/scan.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from leapcore.config import EngineConfig
from leapcore.outputs import model_probabilities
from leapcore.spurious_images import evidence_png, paste_png

CLEAN, SUSPICIOUS, LIKELY = "clean", "suspicious", "likely spurious"
VERDICTS = (CLEAN, SUSPICIOUS, LIKELY)  # in order of severity


@dataclass(frozen=True)
class ScanSettings:
    """How much extra work the scan does and where its verdicts change.

    Attributes:
        extra_prototypes: prototypes per class made for the scan (other random streams than the
            audit's) for the classes the screen passes; the audit's own prototypes of the class
            are used as well.
        extra_steps: their optimisation steps: at most this many...
        run_share: ...and at most this share of the steps the audit's own prototypes ran (an
            audit of short runs gets shorter extras)...
        min_steps: ...but at least this many (capped by ``max_steps``). Short runs are weak:
            on the test bed's digits CNN half of them are their class's top class at 32 steps,
            12 of 20 at 64, and at 32 steps the test bed's hits fell from 6 to 2 of its first 7
            pairs. So they are long enough, and only the screened classes get them.
        screen_flip, screen_concentration: the screen. A first pass scans every class on the
            audit's own prototypes and the samples; a class whose blob there flips at least
            ``screen_flip`` of its pastes, or holds at least ``screen_concentration`` of its
            evidence, or that cannot be measured (no paste targets), gets extra prototypes and
            is scanned again with them. The rest keep the first pass's result (its reason says
            so). Looser than the verdict's thresholds, so that, cap aside, it passes every class a
            verdict could flag on one image.
        screen_share: at most this share of the scanned classes (rounded up, at least one) get
            extra prototypes, the highest first-pass flip rates first: the cost cap.
        extra_targets: the screened classes' extra prototypes are also paste targets of the
            other screened classes (off by default: a class's flip rate would then depend on
            which other classes passed the screen). With ``screen_flip`` and
            ``screen_concentration`` 0 and ``screen_share`` 1 this is the scan before the screen.
        evidence_cell_share: the evidence maps' occlusion refines down to cells of this share
            of the image's shorter side (no finer than ``hipe_min_cell``): 28 px at 224 px.
        region_share: the blob is cut from the map's top ``region_share`` of pixels.
        max_sources: images of the class whose blob is pasted (per class).
        max_targets: images of other classes pasted onto (per class).
        target_confidence: paste targets are images the model assigns to their class with at
            least this probability.
        likely_flip, suspicious_flip: flip-rate thresholds of the two verdicts.
        stable_iou: mean pairwise blob IoU above which the blob counts as "in place".
        placed_iou: the lower IoU that suffices when the blob flips at least ``likely_flip``
            (with two to four images per class, one blob elsewhere halves the mean IoU).
        concentrated: blob mass share above which the evidence counts as concentrated.
    """

    extra_prototypes: int = 2
    extra_steps: int = 50
    run_share: float = 0.5
    min_steps: int = 32
    screen_flip: float = 0.15
    screen_concentration: float = 0.35
    screen_share: float = 0.25
    extra_targets: bool = False
    evidence_cell_share: float = 0.125
    region_share: float = 0.05
    max_sources: int = 4
    max_targets: int = 16
    target_confidence: float = 0.6
    likely_flip: float = 0.5
    suspicious_flip: float = 0.3
    stable_iou: float = 0.4
    placed_iou: float = 0.2
    concentrated: float = 0.5

    def steps(self, config: EngineConfig, audit_steps: int | None = None) -> int:
        """Optimisation steps of the scan's extra prototypes for an audit with ``config`` whose
        prototypes ran ``audit_steps`` steps (None: ``max_steps``)."""
        ran = config.max_steps if audit_steps is None else audit_steps
        share = min(self.extra_steps, math.ceil(self.run_share * ran))
        return min(config.max_steps, max(self.min_steps, share))


@dataclass
class ClassScan:
    """The scan's result for one class (one row of the ``spurious`` table)."""

    class_index: int
    class_name: str
    verdict: str
    reason: str
    concentration: float
    stability: float
    centroid_spread: float
    flip_rate: float
    control_flip_rate: float
    flips: int
    pastes: int
    region_share: float
    prototypes: int
    samples: int
    evidence_png: bytes = field(default=b"", repr=False)
    paste_png: bytes = field(default=b"", repr=False)


# ---------------------------------------------------------------------------------------------- #
# Prototypes and evidence
# ---------------------------------------------------------------------------------------------- #
def extra_prototypes(
    model: torch.nn.Module,
    targets: list[list[int]],
    start: torch.Tensor,
    config: EngineConfig,
    lr: float,
    chunk_size: int,
    settings: ScanSettings,
    audit_steps: int | None = None,
):
    """``settings.extra_prototypes`` short-run prototypes per target, on other random streams,
    all targets in one batch.

    The seed is shifted so that no row repeats one of the audit's prototypes; the budget is
    :meth:`ScanSettings.steps` for an audit whose prototypes ran ``audit_steps`` steps. Returns a
    :class:`~leapcore.prototypes.PrototypeResult`.
    """
    from leapcore.prototypes import optimise_prototypes

    scan_config = config.model_copy(
        update={
            "prototypes_per_class": settings.extra_prototypes,
            "max_steps": settings.steps(config, audit_steps),
            "seed": config.seed + 7919,
        }
    )
    return optimise_prototypes(model, targets, start[:1], scan_config, lr, chunk_size, robust=False)


def evidence_maps(
    model: torch.nn.Module,
    images: torch.Tensor,
    classes: list[int],
    config: EngineConfig,
    chunk_size: int,
    settings: ScanSettings | None = None,
) -> torch.Tensor:
    """Occlusion saliency ``[N, H, W]`` (>= 0, max 1 per map) of ``classes[i]`` in ``images[i]``.

    Hierarchical perturbation's occlusion, saliency only, refined down to
    ``settings.evidence_cell_share`` of the image side
    (:func:`leapcore.spurious_evidence.occlusion_saliency`).
    """
    from leapcore.spurious_evidence import finest_cell, occlusion_saliency

    settings = settings or ScanSettings()
    finest = finest_cell(tuple(images.shape[-2:]), config, settings.evidence_cell_share)
    return occlusion_saliency(model, images, classes, config, chunk_size, finest)


def connected_components(mask: torch.Tensor) -> torch.Tensor:
    """Labels ``[H, W]`` (0 = background, else 1 + the smallest flat index in the component) of
    the 8-connected components of a bool ``mask``: max-label propagation by 3x3 max pooling."""
    h, w = mask.shape
    ids = torch.arange(1, h * w + 1, dtype=torch.float32).view(1, 1, h, w)
    keep = mask.view(1, 1, h, w).float()
    labels = (h * w + 1 - ids) * keep  # propagate the max, i.e. the smallest index
    while True:
        grown = F.max_pool2d(labels, 3, stride=1, padding=1) * keep
        if torch.equal(grown, labels):
            break
        labels = grown
    return torch.where(keep > 0, h * w + 1 - labels, torch.zeros_like(labels)).long().view(h, w)


def top_region(saliency: torch.Tensor, share: float) -> torch.Tensor:
    """The connected blob (8-neighbourhood) of ``saliency``'s top ``share`` pixels holding the most
    mass, as a bool ``[H, W]``."""
    h, w = saliency.shape
    k = max(1, round(share * h * w))
    top = torch.zeros(h * w, dtype=torch.bool)
    top[saliency.flatten().topk(k).indices] = True
    labels = connected_components(top.view(h, w)).flatten()
    found = labels[labels > 0].unique()
    if len(found) <= 1:
        return top.view(h, w)
    masses = torch.stack([saliency.flatten()[labels == i].sum() for i in found])
    return (labels == found[masses.argmax()]).view(h, w)


def pairwise_iou(regions: torch.Tensor) -> float:
    """Mean IoU over distinct pairs of ``[N, H, W]`` bool regions (NaN for fewer than two)."""
    n = len(regions)
    if n < 2:
        return float("nan")
    flat = regions.flatten(1).float()
    inter = flat @ flat.T
    area = flat.sum(1)
    union = area[:, None] + area[None, :] - inter
    iou = inter / union.clamp_min(1)
    return float((iou.sum() - iou.diagonal().sum()) / (n * (n - 1)))


def centroid_spread(regions: torch.Tensor) -> float:
    """Root-mean-square distance of the regions' centroids from their mean, as a share of the
    image diagonal (0: every blob in the same place)."""
    n, h, w = regions.shape
    ys = torch.arange(h, dtype=torch.float32)[None, :, None]
    xs = torch.arange(w, dtype=torch.float32)[None, None, :]
    area = regions.flatten(1).sum(1).clamp_min(1).float()
    cy = (regions * ys).flatten(1).sum(1) / area
    cx = (regions * xs).flatten(1).sum(1) / area
    d2 = (cy - cy.mean()) ** 2 + (cx - cx.mean()) ** 2
    return float(d2.mean().sqrt() / math.hypot(h, w))


@torch.no_grad()
def paste_flips(
    model: torch.nn.Module,
    sources: torch.Tensor,
    regions: torch.Tensor,
    targets: torch.Tensor,
    cls: int,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste each source's region, in place, onto every target image.

    Returns:
        ``(pasted, flipped)``: ``[S * T, C, H, W]`` images (source-major) and ``[S * T]`` bool:
        the model assigns the pasted image to ``cls``.
    """
    s, t = len(sources), len(targets)
    device = targets.device
    keep = regions.to(device, sources.dtype)[:, None]  # [S, 1, H, W]
    pasted = (targets[None] * (1 - keep[:, None]) + (sources * keep)[:, None]).reshape(
        s * t, *targets.shape[1:]
    )
    top = torch.cat(
        [model(pasted[i : i + chunk_size]).argmax(1) for i in range(0, len(pasted), chunk_size)]
    )
    return pasted, (top == cls).cpu()


# ---------------------------------------------------------------------------------------------- #
# The scan
# ---------------------------------------------------------------------------------------------- #
@torch.no_grad()
def predicted_classes(
    model: torch.nn.Module, images: torch.Tensor, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's top class of each image and its probability, ``[N]`` each, on the CPU."""
    if len(images) == 0:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0)
    probs = torch.cat(
        [
            model_probabilities(model, model(images[i : i + chunk_size]))
            for i in range(0, len(images), chunk_size)
        ]
    ).cpu()
    top = probs.max(1)
    return top.indices, top.values


def scan_classes(
    model: torch.nn.Module,
    classes: list[int],
    names: list[str],
    prototypes: torch.Tensor,
    prototype_class: list[int],
    samples: torch.Tensor | None,
    config: EngineConfig,
    chunk_size: int,
    settings: ScanSettings | None = None,
) -> list[ClassScan]:
    """Scan each class of ``classes`` (see the module docstring).

    Args:
        model: pixel-space images -> logits (a :class:`~leapcore.adapter.LogitsModel`).
        classes: class indices to scan.
        names: every class's name.
        prototypes: ``[P, C, H, W]`` in [0, 1]: prototypes of the scanned classes (several each)
            and of any other class (paste targets).
        prototype_class: the target class of each prototype row.
        samples: the user's images ``[S, C, H, W]`` (any class), or None.
        config: the audit's options (seed, isolation background, hierarchical-perturbation cell).
        chunk_size: images per model call.
        settings: scan options; defaults to :class:`ScanSettings`.
    """
    settings = settings or ScanSettings()
    device = prototypes.device
    samples = samples.to(device) if samples is not None else prototypes[:0]
    sample_top, sample_conf = predicted_classes(model, samples, chunk_size)
    proto_top, proto_conf = predicted_classes(model, prototypes, chunk_size)
    # Evidence images: each class's prototypes that the model assigns to it (an off-target
    # prototype shows another class's evidence) and the samples it assigns to it.
    own: dict[int, list[tuple[torch.Tensor, str]]] = {}
    for c in classes:
        rows = [r for r, pc in enumerate(prototype_class) if pc == c]
        on_target = [r for r in rows if int(proto_top[r]) == c] or rows  # all off target: use all
        chosen = [(prototypes[r], "prototype") for r in on_target]
        chosen += [(samples[i], "sample") for i in range(len(samples)) if int(sample_top[i]) == c]
        own[c] = chosen
    flat = [(c, x) for c in classes for x, _ in own[c]]
    maps = (
        evidence_maps(
            model,
            torch.stack([x for _, x in flat]),
            [c for c, _ in flat],
            config,
            chunk_size,
            settings,
        )
        if flat
        else torch.zeros(0)
    ).cpu()
    pool = torch.cat([prototypes, samples])
    pool_top = torch.cat([proto_top, sample_top])
    # Paste targets must be confidently another class: a weak prototype flips under any change.
    pool_top = torch.where(
        torch.cat([proto_conf, sample_conf]) >= settings.target_confidence, pool_top, -1
    )
    results, start = [], 0
    for c in classes:
        n = len(own[c])
        class_maps = maps[start : start + n]
        start += n
        results.append(
            _scan_one(
                model,
                c,
                names,
                own[c],
                class_maps,
                pool,
                pool_top,
                samples is not None and len(samples) > 0,
                chunk_size,
                settings,
            )
        )
    return results


def _scan_one(
    model: torch.nn.Module,
    c: int,
    names: list[str],
    images: list[tuple[torch.Tensor, str]],
    maps: torch.Tensor,
    pool: torch.Tensor,
    pool_top: torch.Tensor,
    had_samples: bool,
    chunk_size: int,
    settings: ScanSettings,
) -> ClassScan:
    regions = torch.stack([top_region(m, settings.region_share) for m in maps])
    mass = (maps * regions).flatten(1).sum(1) / maps.flatten(1).sum(1).clamp_min(1e-12)
    concentration = float(mass.mean())
    iou = pairwise_iou(regions)
    spread = centroid_spread(regions) if len(regions) > 1 else float("nan")
    # The most concentrated maps' blobs are pasted.
    order = mass.argsort(descending=True)[: settings.max_sources]
    sources = torch.stack([images[int(i)][0] for i in order])
    src_regions = regions[order]
    others = ((pool_top != c) & (pool_top >= 0)).nonzero().flatten()[: settings.max_targets]
    flips, pastes, pasted, flipped = 0, 0, None, None
    if len(others):
        pasted, flipped = paste_flips(model, sources, src_regions, pool[others], c, chunk_size)
        flips, pastes = int(flipped.sum()), len(flipped)
    flip_rate = flips / pastes if pastes else float("nan")
    control = float("nan")
    if len(others):
        # Control: a blob of the same shape half an image away, from the same source images.
        h, w = src_regions.shape[-2:]
        moved = torch.roll(src_regions, (h // 2, w // 2), dims=(-2, -1))
        _, moved_flips = paste_flips(model, sources, moved, pool[others], c, chunk_size)
        control = float(moved_flips.float().mean())
    verdict, reason = judge(concentration, iou, flip_rate, settings)
    n_protos = sum(kind == "prototype" for _, kind in images)
    n_samples = len(images) - n_protos
    basis = f"{n_protos} prototypes" + (
        f" and {n_samples} samples" if had_samples else " alone (no samples given)"
    )
    reason = f"{reason}; evidence from {basis}"
    return ClassScan(
        class_index=c,
        class_name=names[c],
        verdict=verdict,
        reason=reason,
        concentration=concentration,
        stability=iou,
        centroid_spread=spread,
        flip_rate=flip_rate,
        control_flip_rate=control,
        flips=flips,
        pastes=pastes,
        region_share=float(regions.flatten(1).float().mean(1).mean()),
        prototypes=n_protos,
        samples=n_samples,
        evidence_png=evidence_png([x for x, _ in images][:6], regions[:6]),
        paste_png=paste_png(pasted, flipped, len(others)) if pasted is not None else b"",
    )


def judge(
    concentration: float, iou: float, flip_rate: float, settings: ScanSettings
) -> tuple[str, str]:
    """The verdict and a sentence saying why (see the module docstring for the rule)."""
    numbers = (
        f"{concentration:.0%} of the evidence in one blob, blob IoU across images "
        + ("n/a (one image)" if math.isnan(iou) else f"{iou:.2f}")
        + ", flip rate "
        + (
            "not measured (no images of other classes)"
            if math.isnan(flip_rate)
            else f"{flip_rate:.0%}"
        )
    )
    stable = not math.isnan(iou) and iou >= settings.stable_iou
    placed = not math.isnan(iou) and iou >= settings.placed_iou
    if not math.isnan(flip_rate):
        if flip_rate >= settings.likely_flip and placed:
            return LIKELY, f"a small region in a fixed place flips other classes' images: {numbers}"
        if flip_rate >= settings.suspicious_flip and stable:
            return (
                SUSPICIOUS,
                f"a small region in a fixed place flips some other classes' images: {numbers}",
            )
    if concentration >= settings.concentrated and stable:
        return SUSPICIOUS, f"the evidence sits in one small region in a fixed place: {numbers}"
    return CLEAN, numbers


def scan_audit(
    model: torch.nn.Module,
    prototypes,
    start: torch.Tensor,
    lr: float,
    samples: torch.Tensor | None,
    config: EngineConfig,
    chunk_size: int,
    settings: ScanSettings | None = None,
    classes: list[int] | None = None,
    names: list[str] | None = None,
) -> list[ClassScan]:
    """Scan an audit: its prototypes (a :class:`~leapcore.prototypes.PrototypeResult`) and the
    user's ``samples``; then, for the classes that pass the screen
    (:func:`leapcore.spurious_evidence.screen`), again with :func:`extra_prototypes` added.

    ``start`` is the audit's baseline image, ``lr`` its prototype step size. Hybrid targets (several
    classes) are not scanned; ``classes`` defaults to every single-class target.
    """
    settings = settings or ScanSettings()
    single = [t[0] for t in prototypes.targets if len(t) == 1]
    classes = single if classes is None else classes
    device = start.device
    own_rows = [
        r
        for r in range(len(prototypes.images))
        if len(prototypes.targets[prototypes.row_target(r)]) == 1
    ]
    images = prototypes.images[own_rows].to(device)
    owners = [prototypes.targets[prototypes.row_target(r)][0] for r in own_rows]
    names = names or [str(i) for i in range(int(prototypes.logits.shape[1]))]
    first = scan_classes(
        model, classes, names, images, owners, samples, config, chunk_size, settings
    )
    if settings.extra_prototypes <= 0 or not classes:
        return first
    from leapcore.spurious_evidence import screen, screened_out_reason

    chosen = screen(first, settings)
    again: dict[int, ClassScan] = {}
    if chosen:
        extra = extra_prototypes(
            model, [[c] for c in chosen], start, config, lr, chunk_size, settings, prototypes.steps
        )
        extra_owner = [extra.targets[extra.row_target(r)][0] for r in range(len(extra.images))]
        if settings.extra_targets:
            both = torch.cat([images, extra.images.to(device)])
            second = scan_classes(
                model,
                chosen,
                names,
                both,
                owners + extra_owner,
                samples,
                config,
                chunk_size,
                settings,
            )
            again = {s.class_index: s for s in second}
        for c in [] if settings.extra_targets else chosen:
            # Each class's extras join its own evidence only: paste targets stay the audit's
            # prototypes and the samples, whichever classes the screen passed.
            rows = [r for r, o in enumerate(extra_owner) if o == c]
            again[c] = scan_classes(
                model,
                [c],
                names,
                torch.cat([images, extra.images[rows].to(device)]),
                owners + [c] * len(rows),
                samples,
                config,
                chunk_size,
                settings,
            )[0]
    out = []
    for s in first:
        if s.class_index in again:
            out.append(again[s.class_index])
        else:
            s.reason = f"{s.reason}; {screened_out_reason(s, settings)}"
            out.append(s)
    return out
