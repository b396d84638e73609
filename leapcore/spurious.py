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

The numbers behind the verdict (reappearance of the blob, consistency of its content, excess flip
rate over the control) and the verdict rule are in :mod:`leapcore.spurious_verdict`. A paste
"flips" an image when the model's own decision rule then gives the class: the top class for
``logits`` models, a sigmoid probability >= 0.5 for ``multilabel_logits`` models (other classes may
stay present). The image rule's paste targets are the user's samples first, then other classes'
prototypes; the paint probe's are prototypes only.

Most classes have one image of their own (one prototype, no samples), so no position can be
compared there. The **paint probe** (:mod:`leapcore.spurious_probe`) therefore paints each class
briefly onto several images of other classes and judges where that paint lands and whether it
alone flips other images; a class's verdict is the more severe of the two rules
(``ClassScan.decided_by`` says which set it).

This module runs the algorithm on tensors; prototypes are made by :mod:`leapcore.prototypes`
(:func:`extra_prototypes`) and the pipeline stage is ``tasks/scan.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from leapcore.config import EngineConfig
from leapcore.prototypes import PrototypeResult
from leapcore.spurious_images import evidence_png, paste_png
from leapcore.spurious_paste import (  # noqa: F401  (re-exported: the scan's public names)
    connected_components,
    decides,
    model_probs,
    output_kind,
    paste_flips,
    top_region,
)
from leapcore.spurious_probe import combine, probe_classes
from leapcore.spurious_verdict import (  # noqa: F401  (re-exported: the scan's public names)
    CLEAN,
    LIKELY,
    SUSPICIOUS,
    VERDICTS,
    Evidence,
    centroid_spread,
    consistency,
    elsewhere_ratio,
    iou_matrix,
    judge,
    pairwise_iou,
    reappearance,
)


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
        likely_flip, suspicious_flip: thresholds of the two verdicts on the *excess* flip rate
            (flip rate less the control flip rate).
        reappear_iou: a blob reappears when its IoU with the class's modal blob is at least this.
        placed_share: the share of images whose blob reappears that suffices for ``likely
            spurious`` (with two to four images per class one stray blob costs a third to a half).
        stable_share: the share that counts as "in place" for ``suspicious`` (1.0: every blob).
        position_images: position (reappearance) is judged from at least this many images of
            the class, else not at all (n/a). With two, the modal blob always reappears in half
            of them, so two blobs in different places counted as "in place": with 16 own
            held-out images on the test bed, 4 of the image rule's 6 alarms on clean classes
            were such two-image classes.
        elsewhere_ratio: where the image rule would flag a class, its blob's content is compared
            with other classes' images (:func:`~leapcore.spurious_verdict.elsewhere_ratio`):
            under this ratio it is common there, only elsewhere (a genuine stroke), and the image
            rule says ``clean``. Chosen on the test bed's eight seen sets with own samples:
            flagged markers 0.26 and up, the genuine strokes flagged before 0.06-0.20.
        probe_starts, probe_steps, probe_step: the paint probe (:mod:`leapcore.spurious_probe`):
            at most this many starts per class (other classes' prototypes), normalised gradient
            steps, the largest pixel move per step.
        probe_targets: the probe pastes each start's blob onto at most this many images of other
            classes (``max_targets`` is the image rule's): 8 starts x 8 targets, about 56 pastes
            per class, where 8 x 16 made the probe's pastes grow with the class count up to 16
            classes (on Lite0 they were half of a 16-class scan). No test-bed model has more than
            9 confident prototypes of other classes: the cap changed 1 of 1944 class rows' paste
            count on nine sets, and no verdict.
        probe_early_starts, probe_early_stop: a class's first this many starts are painted and
            pasted first; under this flip rate its probe stops there (``clean``: every class the
            probe flagged on nine test-bed sets had 0.22 or more on its first 4 starts; 90 % of
            all classes had under 0.1). The paint was half of a Lite0 scan.
        probe_likely_flip, probe_suspicious_flip: its verdicts' thresholds on the excess flip rate
            (with reappearance >= ``probe_placed_share`` over its starts).
        probe_placed_share: the share of the probe's starts whose blob must reappear.
        probe_moving_flip: the probe's moving-blob branch: ``suspicious`` at this excess flip
            rate whatever the reappearance.

    The paint probe replaced the screen's extra prototypes as the default (``extra_prototypes``
    0): on the test bed's tuning pairs it found 11 of 12 markers, the screen 5.
    """

    extra_prototypes: int = 0
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
    target_confidence: float = 0.95
    likely_flip: float = 0.3
    suspicious_flip: float = 0.2
    reappear_iou: float = 0.2
    placed_share: float = 0.5
    stable_share: float = 1.0
    position_images: int = 3
    elsewhere_ratio: float = 0.23
    probe_starts: int = 8
    probe_targets: int = 8
    probe_early_starts: int = 4
    probe_early_stop: float = 0.1
    probe_steps: int = 5
    probe_step: float = 0.1
    probe_likely_flip: float = 0.5
    probe_suspicious_flip: float = 0.3
    probe_placed_share: float = 0.4
    probe_moving_flip: float = 0.75

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
    stability: float  # mean pairwise blob IoU (reported; the verdict uses reappearance)
    centroid_spread: float
    flip_rate: float
    control_flip_rate: float
    flips: int
    pastes: int
    region_share: float
    prototypes: int
    samples: int
    reappearance: float = float("nan")  # share of images whose blob overlaps the modal blob
    consistency: float = float("nan")  # 1 - mean pixel difference inside the modal blob
    elsewhere_ratio: float = float("nan")  # content matched elsewhere / in place (flagged only)
    probe_flip_rate: float = float("nan")  # the paint probe (leapcore.spurious_probe)
    probe_control_flip_rate: float = float("nan")
    probe_reappearance: float = float("nan")
    probe_pastes: int = 0
    decided_by: str = "images"  # which rule set it: "images", "paint probe" or "... (moving blob)"
    evidence_png: bytes = field(default=b"", repr=False)
    paste_png: bytes = field(default=b"", repr=False)
    details: dict = field(default_factory=dict, repr=False)  # per-image numbers (not in the table)


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


# ---------------------------------------------------------------------------------------------- #
# The scan
# ---------------------------------------------------------------------------------------------- #
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
    prototype_probs: torch.Tensor | None = None,
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
        prototype_probs: ``model_probs`` of ``prototypes``, when the caller has them.
    """
    settings = settings or ScanSettings()
    device = prototypes.device
    samples = samples.to(device) if samples is not None else prototypes[:0]
    kind = output_kind(model)
    # Paste targets: the user's samples first (real images), then other classes' prototypes.
    pool = torch.cat([samples, prototypes])
    parts = [model_probs(model, samples, chunk_size)] if len(samples) else []
    if len(prototypes):
        known = prototype_probs is not None
        parts.append(prototype_probs if known else model_probs(model, prototypes, chunk_size))
    probs = torch.cat(parts) if parts else torch.zeros(0, 0)
    sample_probs, proto_probs = probs[: len(samples)], probs[len(samples) :]
    # Evidence images: each class's prototypes that the model decides for it (an off-target
    # prototype shows another class's evidence) and the samples it decides for it.
    own: dict[int, list[tuple[torch.Tensor, str]]] = {}
    for c in classes:
        rows = [r for r, pc in enumerate(prototype_class) if pc == c]
        said = decides(proto_probs, c, kind) if len(proto_probs) else torch.zeros(0, dtype=bool)
        on_target = [r for r in rows if bool(said[r])] or rows  # all off target: use all
        chosen = [(prototypes[r], "prototype") for r in on_target]
        if len(samples):
            chosen += [
                (samples[i], "sample") for i in decides(sample_probs, c, kind).nonzero()[:, 0]
            ]
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
    # Paste targets must be confidently another class: a weak prototype flips under any change.
    confident = (
        probs.max(1).values >= settings.target_confidence
        if len(pool)
        else torch.zeros(0, dtype=torch.bool)
    )
    results, start = [], 0
    for c in classes:
        n = len(own[c])
        class_maps = maps[start : start + n]
        start += n
        targets = (confident & ~decides(probs, c, kind)).nonzero().flatten() if len(pool) else None
        results.append(
            _scan_one(
                model,
                c,
                names,
                own[c],
                class_maps,
                pool[targets[: settings.max_targets]] if targets is not None else pool[:0],
                probs[targets[: settings.max_targets]].max(1).values
                if targets is not None
                else torch.zeros(0),
                len(samples) > 0,
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
    targets: torch.Tensor,
    target_conf: torch.Tensor,
    had_samples: bool,
    chunk_size: int,
    settings: ScanSettings,
) -> ClassScan:
    regions = torch.stack([top_region(m, settings.region_share) for m in maps])
    mass = (maps * regions).flatten(1).sum(1) / maps.flatten(1).sum(1).clamp_min(1e-12)
    concentration = float(mass.mean())
    iou = pairwise_iou(regions)
    spread = centroid_spread(regions) if len(regions) > 1 else float("nan")
    # Position is judged on the prototypes (the model's own view of the class) when there are
    # ``position_images`` or more: a user's samples of the class mostly show its genuine shape,
    # and a marker sits in only some of them, so their blobs would dilute a fixed marker's
    # reappearance.
    is_proto = torch.tensor([kind == "prototype" for _, kind in images])
    judged = (
        is_proto if int(is_proto.sum()) >= settings.position_images else torch.ones_like(is_proto)
    )
    share, modal_at, reappears = reappearance(regions[judged], settings.reappear_iou)
    if int(judged.sum()) < settings.position_images:
        share = float("nan")  # two blobs always "reappear" in half of them: not judged
    modal = int(judged.nonzero()[modal_at]) if len(regions) else 0
    stack = torch.stack([x for x, _ in images]).cpu()
    content = consistency(stack[judged][reappears], regions[modal])
    # The most concentrated maps' blobs are pasted.
    order = mass.argsort(descending=True)[: settings.max_sources]
    sources = stack[order].to(targets.device)
    src_regions = regions[order]
    flips, pastes, pasted, flipped = 0, 0, None, None
    flip_rate = control = float("nan")
    lift = (flip_rate, flip_rate)
    by_target: tuple[list, list] = ([], [])
    if len(targets):
        pasted, flipped, prob = paste_flips(model, sources, src_regions, targets, c, chunk_size)
        flips, pastes = int(flipped.sum()), len(flipped)
        flip_rate = flips / pastes
        # Control: a blob of the same shape half an image away, from the same source images.
        h, w = src_regions.shape[-2:]
        moved = torch.roll(src_regions, (h // 2, w // 2), dims=(-2, -1))
        _, moved_flips, moved_prob = paste_flips(model, sources, moved, targets, c, chunk_size)
        control = float(moved_flips.float().mean())
        lift = (float(prob.mean()), float(moved_prob.mean()))
        t = len(targets)
        by_target = (
            flipped.view(-1, t).float().mean(0).tolist(),
            moved_flips.view(-1, t).float().mean(0).tolist(),
        )
    evidence = Evidence(concentration, share, content, flip_rate, control)
    verdict, reason = judge(evidence, settings)
    if verdict != CLEAN:  # only a flagged class pays for the content check
        placed = set(judged.nonzero().flatten()[reappears].tolist())
        mine = [i for i in mass.argsort(descending=True).tolist() if i in placed] or [modal]
        ratio = elsewhere_ratio(stack[mine[: settings.max_sources]], regions[modal], targets.cpu())
        evidence = replace(evidence, elsewhere=ratio)
        verdict, reason = judge(evidence, settings)
    n_protos = sum(kind == "prototype" for _, kind in images)
    n_samples = len(images) - n_protos
    basis = f"{n_protos} prototypes" + (
        f" and {n_samples} samples" if had_samples else " alone (no samples given)"
    )
    reason = f"{reason}; evidence from {basis}"
    modal_iou = iou_matrix(regions[judged])[modal_at] if len(regions) else torch.zeros(0)
    return ClassScan(
        class_index=c,
        class_name=names[c],
        verdict=verdict,
        reason=reason,
        concentration=concentration,
        stability=iou,
        reappearance=share,
        consistency=content,
        elsewhere_ratio=evidence.elsewhere,
        centroid_spread=spread,
        flip_rate=flip_rate,
        control_flip_rate=control,
        flips=flips,
        pastes=pastes,
        region_share=float(regions.flatten(1).float().mean(1).mean()),
        prototypes=n_protos,
        samples=n_samples,
        evidence_png=evidence_png([x for x, _ in images][:6], regions[:6]),
        paste_png=paste_png(pasted, flipped, len(targets)) if pasted is not None else b"",
        details={
            "modal_iou": [round(float(v), 4) for v in modal_iou],
            "mass": [round(float(v), 4) for v in mass],
            "consistency_all": consistency(stack, regions[modal]),
            "reappearance_all": reappearance(regions, settings.reappear_iou)[0],
            "p_paste": lift[0],  # mean probability of the class after the pastes
            "p_control": lift[1],  # ... after the control pastes
            "target_conf": [round(float(v), 4) for v in target_conf],
            "flip_by_target": by_target[0],  # share of sources that flip each target
            "control_by_target": by_target[1],
        },
    )


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
    user's ``samples``; with ``settings.extra_prototypes`` > 0 (off by default), again with
    :func:`extra_prototypes` for the classes that pass the screen
    (:func:`_with_extras`); then every class's paint probe
    (:mod:`leapcore.spurious_probe`), whose verdict wins where it is more severe.

    ``start`` is the audit's baseline image, ``lr`` its prototype step size. Hybrid targets (several
    classes) are not scanned (:func:`hybrid_targets` names them for the table and report);
    ``classes`` defaults to every single-class target.
    """
    settings = settings or ScanSettings()
    single = [t[0] for t in prototypes.targets if len(t) == 1]
    classes = single if classes is None else classes
    device = start.device
    images, owners = _single_target_rows(prototypes, device)
    names = names or [str(i) for i in range(int(prototypes.logits.shape[1]))]
    # One forward of the prototypes serves both rules.
    probs = model_probs(model, images, chunk_size) if len(images) else torch.zeros(0, 0)
    first = scan_classes(
        model, classes, names, images, owners, samples, config, chunk_size, settings, probs
    )
    if settings.extra_prototypes > 0 and classes:
        first = _with_extras(
            model, prototypes, first, start, lr, samples, config, chunk_size, settings, names
        )
    # The probe starts from and pastes onto prototypes only, with or without samples: the user's
    # real images, as paste targets, flip under a genuine class's paint far more often than
    # prototypes do (on the test bed, with 32 of each model's own held-out images, 8 of the 10
    # clean classes flagged were the probe's; their excess rose from 0.02-0.33 to 0.35-0.49),
    # and the samples already enter the image rule above.
    probes = probe_classes(model, classes, images, probs, settings, chunk_size)
    return [combine(s, probes[s.class_index], settings) for s in first]


def _single_target_rows(
    prototypes: PrototypeResult, device: torch.device
) -> tuple[torch.Tensor, list[int]]:
    """The images of the prototypes of one class (hybrids left out) on ``device``, and their class."""
    rows = [
        r
        for r in range(len(prototypes.images))
        if len(prototypes.targets[prototypes.row_target(r)]) == 1
    ]
    owners = [prototypes.targets[prototypes.row_target(r)][0] for r in rows]
    return prototypes.images[rows].to(device), owners


def _with_extras(model, prototypes, first, start, lr, samples, config, chunk_size, settings, names):
    """The screen's second pass (when ``settings.extra_prototypes`` > 0; off by default since the
    paint probe): the classes :func:`screen` passes are scanned again with
    :func:`extra_prototypes` added to their own images; the rest keep the
    first pass ``first`` with a reason saying so."""
    from leapcore.spurious_evidence import screen, screened_out_reason

    device = start.device
    images, owners = _single_target_rows(prototypes, device)
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


def hybrid_targets(targets: list[list[int]], names: list[str]) -> list[str]:
    """The names (classes joined by ``+``) of the hybrid targets, which the scan leaves out."""
    return ["+".join(names[c] for c in t) for t in targets if len(t) > 1]
