"""The audit diff's pair measure: how much more (or less) the model confuses two classes than before.

A pair's number is the **pair probability** ``sigmoid(z_c(x) - z_t(x))`` of class ``c`` against the
target ``t`` alone, averaged over a set of images ``x`` of the target: 0 when the model leaves no
doubt, 0.5 when it cannot tell the two apart. Which images, and which model sees them, is the
*pair measure* (:data:`PAIR_MEASURES`):

- ``samples`` (default): on the user's images (``--samples``): ``t``'s images are those either
  model assigns to ``t``; both models see the same images. Targets with no sample, hybrids, and
  diffs without samples use ``crossed`` (the row's ``detail`` says which it is).
- ``crossed``: both versions' prototypes fed to both models, and a shift of ``y`` into ``x``
  counted only as far as both sides show it: the current model reads the previous version's
  ``y`` prototypes as ``x``, and the previous model reads the current version's ``x``
  prototypes as ``y`` (:func:`crossed_pair_probabilities`). Judged on the smaller of the two
  changes, and only upwards.
- ``fixed``: the model's change with the inputs held fixed. Both versions' prototypes of
  ``t`` are fed to both models; the change is the mean over the two prototype sets ``S`` of
  ``pp_current(S) - pp_previous(S)``.
- ``own``: each model on its own prototypes, read from the audits' ``entanglement`` tables (no
  model needed; the only measure when the models are not loaded).

Prototypes are optimised against their own model, and the other version reads them its own way:
on the test bed (``benchmarks/diff_testbed.py``, ``docs/diff.md``) a retrain with only another
seed moved some pair by 0.23-0.83 under ``own`` and ``fixed`` (as much as a planted merge),
because one version's prototype of a class looked like some other class to the other model. Such
a misreading shows on one side only; a merge shows on both (the current model calls the old ``y``
prototype ``x`` and the old model calls the new ``x`` prototype ``y``), which is what ``crossed``
asks for.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from leapcore.errors import InputError

#: The pair measures (see the module docstring); the first is the default.
PAIR_MEASURES = ("samples", "crossed", "fixed", "own")
#: The basis of a ``fixed`` pair, of a cross-checked one, and of one ``crossed`` cannot check.
FIXED_BASIS = "both versions' prototypes"
CROSSED_BASIS = "both versions' prototypes, cross-checked"
UNCHECKED_BASIS = "both versions' prototypes, not cross-checked (never flagged)"
#: What a diff without samples says about its pairs (measured: ``benchmarks/diff_testbed.py``).
PROTOTYPES_NOTE = (
    "pairs measured on prototypes ({how}). On the test bed a retrain with only another seed "
    "moved some pair by 0.23-0.83 this way (on 100 held-out images: at most 0.13), so a flagged "
    "pair is a prompt to look; pass samples (--samples) to measure pairs on them"
)
CROSSED_NOTE = (
    "pairs measured on both versions' prototypes, cross-checked: a pair is judged on the smaller "
    "of its two sides' changes (the current model reading the previous prototypes of one class "
    "as the other, the previous model reading the current prototypes of the other as the one) "
    "and flagged from the noise bound on prototypes. On the test bed seed-only retrains moved a "
    "cross-checked pair by up to 0.43 (averaged over both sides: 0.83), planted merges by "
    "0.35-0.98, and some merges showed on one side only: pass samples (--samples) to confirm "
    "and not to miss one"
)
Pairs = dict[tuple[str, str], float]


def _sigmoid_gap(z_other: float, z_target: float) -> float:
    return 1.0 / (1.0 + math.exp(min(50.0, z_target - z_other)))


def own_pair_probabilities(side: Any) -> Pairs:
    """(target name, class name) -> the pair probability on the target's own prototypes, from the
    audit's ``entanglement`` table (the prototype's logits in the audit's own model), averaged over
    the target's prototypes (``z_t``: the mean logit of a hybrid's classes).

    The report's entanglement (leap-ie's ``(z_c(P) - z_c(B)) / (max_k z_k(P) - z_c(B))``) is
    measured from the baseline image and blows up (thousands) when a class's baseline logit is
    close to the prototype's top logit; the difference of two such numbers says nothing, so the
    diff compares this bounded measure.
    """
    table, protos = side.tables.get("entanglement"), side.tables.get("prototypes")
    if table is None or protos is None:
        return {}
    own = dict(zip(protos.column("row").to_pylist(), protos.column("target_classes").to_pylist()))
    logits: dict[int, dict[int, float]] = {}
    names: dict[int, str] = {}
    for r, t, c, z in zip(
        table.column("row").to_pylist(),
        table.column("target_name").to_pylist(),
        table.column("class_index").to_pylist(),
        table.column("logit").to_pylist(),
    ):
        logits.setdefault(r, {})[c] = float(z)
        names[r] = t
    sums: dict[tuple[str, str], list[float]] = {}
    for r, by_class in logits.items():
        classes = own.get(r) or []
        if not classes:
            continue
        target = float(np.mean([by_class[c] for c in classes]))
        for c, z in by_class.items():
            if c in classes or not math.isfinite(z - target):
                continue
            sums.setdefault((names[r], side.class_list[c]), []).append(_sigmoid_gap(z, target))
    return {k: float(np.mean(v)) for k, v in sums.items()}


def model_logits(side: Any, images: torch.Tensor) -> torch.Tensor:
    """``side.model``'s ``[N, K]`` logits of ``images`` (pixels in [0, 1]), through the engine's
    model view (its preprocessing, segmentation maps pooled), in eval mode, without gradients."""
    from leapcore.adapter import LogitsModel

    view = LogitsModel(
        side.model,
        len(side.class_list),
        side.preprocessing,
        tuple(images.shape[1:]),
        channels_last=False,
        fold_batchnorm=False,
    )
    param = next(iter(side.model.parameters()), None) if hasattr(side.model, "parameters") else None
    device = param.device if param is not None else torch.device("cpu")
    with torch.no_grad():
        return torch.cat(
            [view(images[i : i + 64].to(device)).float().cpu() for i in range(0, len(images), 64)]
        )


def _prototype_sets(side: Any, targets: Sequence[str]) -> tuple[torch.Tensor, list[list[str]]]:
    """All prototypes of ``targets`` in ``side`` and each one's target class names."""
    from leapcore.results import column_tensor

    table = side.tables["prototypes"]
    names = table.column("target_name").to_pylist()
    keep = [i for i, n in enumerate(names) if n in set(targets)]
    classes = table.column("target_classes").to_pylist()
    images = column_tensor(table.column("image"))[keep]
    return images, [[side.class_list[c] for c in classes[i]] for i in keep]


def _pairs_on(
    logits: torch.Tensor,
    owners: Sequence[Sequence[str]],
    model_classes: Sequence[str],
    classes: Sequence[str],
) -> Pairs:
    """Mean pair probability per (target, class) over the images (rows of ``logits``), each image
    an image of the target whose class names ``owners`` gives."""
    index = {n: i for i, n in enumerate(model_classes)}
    sums: dict[tuple[str, str], list[float]] = {}
    for z, names in zip(logits.tolist(), owners):
        if not names or any(n not in index for n in names):
            continue
        target = float(np.mean([z[index[n]] for n in names]))
        for c in classes:
            if c in names or c not in index:
                continue
            sums.setdefault(("+".join(names), c), []).append(_sigmoid_gap(z[index[c]], target))
    return {k: float(np.mean(v)) for k, v in sums.items()}


def fixed_pair_probabilities(
    previous: Any, current: Any, targets: Sequence[str], classes: Sequence[str], reads: Any = None
) -> tuple[Pairs, Pairs]:
    """(before, after): each model's pair probabilities on both versions' prototypes, the mean over
    the two prototype sets (each set's own mean over its prototypes of a target)."""
    (pp_a, pc_a), (pp_b, pc_b) = reads or _sides(previous, current, targets, classes)
    keys = set(pp_a) & set(pc_a) & set(pp_b) & set(pc_b)
    return (
        {k: (pp_a[k] + pp_b[k]) / 2 for k in keys},
        {k: (pc_a[k] + pc_b[k]) / 2 for k in keys},
    )


def _sides(previous: Any, current: Any, targets: Sequence[str], classes: Sequence[str]) -> list:
    """The four reads ``[[prev model, cur model] on previous prototypes, [...] on current ones]``,
    each (target, class) -> mean pair probability over the target's prototypes of that set."""
    out = []
    for images_of in (previous, current):
        images, owners = _prototype_sets(images_of, targets)
        out.append(
            [
                _pairs_on(model_logits(m, images), owners, m.class_list, classes)
                for m in (previous, current)
            ]
        )
    return out


def crossed_pair_probabilities(
    previous: Any, current: Any, targets: Sequence[str], classes: Sequence[str], reads: Any = None
) -> tuple[Pairs, Pairs, dict[tuple[str, str], str]]:
    """(before, after, basis) of the ``crossed`` measure, for the directions it can cross-check.

    ``y -> x`` is the shift of ``y`` into ``x``: the current model reads the previous version's
    ``y`` prototypes as ``x`` (side 1: ``sigmoid(z_x - z_y)`` on them, previous model -> current
    model) **and** the previous model reads the current version's ``x`` prototypes as ``y`` (side
    2: ``sigmoid(z_x - z_y)`` on them, previous -> current: the current model calls ``x`` what the
    previous called ``y``). A retrain with another seed makes one version's prototypes look like
    some other class to the other model on one side only; a real merge shows on both. The
    direction's before and after are those of the side that changed less (its change is the
    smaller of the two); ``basis`` names that side and gives the other. Only pairs of two audited
    single-class targets can be cross-checked (both need prototypes in both versions).
    """
    (pp_a, pc_a), (pp_b, pc_b) = reads or _sides(previous, current, targets, classes)
    before: Pairs = {}
    after: Pairs = {}
    basis: dict[tuple[str, str], str] = {}
    for y in targets:
        for x in targets:
            one, two = (y, x), (x, y)
            if x == y or not all(k in d for k in (one, two) for d in (pp_a, pc_a, pp_b, pc_b)):
                continue
            side1 = (pp_a[one], pc_a[one])  # previous y prototypes, read as x rather than y
            side2 = (1 - pp_b[two], 1 - pc_b[two])  # current x prototypes, read as x rather than y
            (b1, a1), (b2, a2) = side1, side2
            text1 = f"previous {y} prototypes {b1:.2f} -> {a1:.2f}"
            text2 = f"current {x} prototypes {b2:.2f} -> {a2:.2f}"
            if a1 - b1 <= a2 - b2:
                before[one], after[one] = b1, a1
                basis[one] = f"{CROSSED_BASIS}: the smaller of {text1}; {text2}"
            else:
                before[one], after[one] = b2, a2
                basis[one] = f"{CROSSED_BASIS}: the smaller of {text2}; {text1}"
    return before, after, basis


def sample_pair_probabilities(
    previous: Any,
    current: Any,
    samples: torch.Tensor,
    targets: Sequence[str],
    classes: Sequence[str],
) -> tuple[Pairs, Pairs, dict[str, int]]:
    """(before, after, images per target) on the user's images: a target's images are those either
    model assigns to it (top class), the same images for both models."""
    za, zb = model_logits(previous, samples), model_logits(current, samples)
    top_a = [previous.class_list[i] for i in za.argmax(1).tolist()]
    top_b = [current.class_list[i] for i in zb.argmax(1).tolist()]
    before: Pairs = {}
    after: Pairs = {}
    counts: dict[str, int] = {}
    for t in targets:
        rows = [i for i in range(len(samples)) if t in (top_a[i], top_b[i])]
        if not rows:
            continue
        counts[t] = len(rows)
        owners = [[t]] * len(rows)
        before.update(_pairs_on(za[rows], owners, previous.class_list, classes))
        after.update(_pairs_on(zb[rows], owners, current.class_list, classes))
    return before, after, counts


def pair_probabilities(
    previous: Any,
    current: Any,
    targets: Sequence[str],
    classes: Sequence[str],
    measure: str = "samples",
    samples: torch.Tensor | None = None,
) -> tuple[Pairs, Pairs, dict[tuple[str, str], str], list[str]]:
    """(before, after, basis per pair, notes) for the chosen pair measure.

    ``crossed``, ``fixed`` and ``samples`` need both models; without them the ``own`` measure is
    used and a note says so. ``samples`` without images (and for targets no sample is assigned
    to) is ``crossed``. In ``crossed``, pairs it cannot cross-check get the ``fixed`` numbers with
    the basis :data:`UNCHECKED_BASIS` (reported, never flagged). A note says when pairs are
    measured on prototypes and how noisy that was on the test bed.
    """
    if measure not in PAIR_MEASURES:
        raise InputError(f"unknown pair measure {measure!r}; use one of {list(PAIR_MEASURES)}.")
    notes: list[str] = []
    have_models = previous.model is not None and current.model is not None
    if measure != "own" and not have_models:
        notes.append(
            f"pair measure 'own' (each model on its own prototypes) instead of {measure!r}: the "
            "models were not given"
        )
        measure = "own"
    if not targets:
        return {}, {}, {}, notes
    if measure == "own":
        a, b = own_pair_probabilities(previous), own_pair_probabilities(current)
        notes.append(PROTOTYPES_NOTE.format(how="each model on its own"))
        return a, b, dict.fromkeys(a, "own prototypes"), notes
    reads = _sides(previous, current, targets, classes)
    a, b = fixed_pair_probabilities(previous, current, targets, classes, reads)
    have_samples = samples is not None and len(samples) > 0
    if measure == "fixed":
        notes.append(PROTOTYPES_NOTE.format(how="both versions', both models"))
        return a, b, dict.fromkeys(a, FIXED_BASIS), notes
    basis = dict.fromkeys(a, UNCHECKED_BASIS)
    ca, cb, cbasis = crossed_pair_probabilities(previous, current, targets, classes, reads)
    a.update(ca)
    b.update(cb)
    basis.update(cbasis)
    if measure == "crossed" or not have_samples:
        notes.append(("no samples: " if measure == "samples" else "") + CROSSED_NOTE)
    if measure == "samples" and have_samples:
        sa, sb, counts = sample_pair_probabilities(previous, current, samples, targets, classes)
        for key in set(sa) & set(sb):
            a[key], b[key] = sa[key], sb[key]
            basis[key] = f"{counts[key[0]]} samples"
        missing = [t for t in targets if t not in counts]
        if missing:
            notes.append(
                "no sample is assigned to "
                + ", ".join(missing)
                + ": their pairs are measured on both versions' prototypes, cross-checked"
            )
    if any(v == UNCHECKED_BASIS for v in basis.values()):
        notes.append(
            "pairs with a class that is not an audited target in both versions (or a hybrid) "
            "cannot be cross-checked: their numbers are on both versions' prototypes and they "
            "are never flagged; audit both classes to judge such a pair"
        )
    return a, b, basis, notes


def judged_on(
    basis: Mapping[tuple[str, str], str], threshold: float = 0.2, noise: float = 0.0
) -> str:
    """What the entanglement threshold was judged against, in words (for the table's metadata,
    the report, ``leap diff`` and the drift event)."""
    kinds = []
    values = set(basis.values())
    if any(v.endswith(" samples") for v in values):
        kinds.append("the change on your samples")
    if any(v.startswith(CROSSED_BASIS) for v in values):
        kinds.append(
            "the smaller of the changes on the two versions' prototypes (cross-checked), flagged "
            f"from {max(threshold, noise):g}: the larger of the threshold and the noise bound on "
            f"prototypes ({noise:g}; seed-only retrains on the test bed reached 0.43)"
        )
    if FIXED_BASIS in values:
        kinds.append(
            "the mean change on both versions' prototypes (not cross-checked: on the test bed "
            "seed-only retrains moved it by up to 0.83)"
        )
    if "own prototypes" in values:
        kinds.append(
            "each model on its own prototypes (not cross-checked: on the test bed seed-only "
            "retrains moved it by up to 0.80)"
        )
    if UNCHECKED_BASIS in values:
        kinds.append("pairs that could not be cross-checked are never flagged")
    return "; ".join(kinds) or "none"


def judged_change(change: float, basis: str) -> float:
    """The size a pair's change is judged (flagged, sorted) by: ``|change|``; a cross-checked
    shift only when positive (a negative one is no shift both sides show); 0 when the pair
    could not be cross-checked (never flagged)."""
    if basis == UNCHECKED_BASIS:
        return 0.0
    if basis.startswith(CROSSED_BASIS):
        return max(change, 0.0)
    return abs(change)


def pair_rows(
    before: Mapping[tuple[str, str], float],
    after: Mapping[tuple[str, str], float],
    basis: Mapping[tuple[str, str], str],
    targets: Sequence[str],
    classes: Sequence[str],
    threshold: float,
    off_target: Mapping[str, set[str]],
    row: Any,
    noise: float = 0.0,
) -> list[dict[str, Any]]:
    """A row per unordered pair (``row`` makes it); its numbers are those of the direction
    (``t -> c``) whose change is judged largest (:func:`judged_change`), the other direction is
    in ``detail``. Flagged when that judged change reaches ``threshold`` (a cross-checked one:
    ``max(threshold, noise)``, the noise bound on prototypes); sorted by it, largest first."""
    pairs: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for t in targets:
        for c in classes:
            if c == t or (t, c) not in before or (t, c) not in after:
                continue
            key = (t, c) if (c not in targets or targets.index(t) < targets.index(c)) else (c, t)
            pairs.setdefault(key, []).append((t, c))
    rows = []
    for (t, c), directions in pairs.items():

        def judged(d: tuple[str, str]) -> tuple[float, float]:
            change = after[d] - before[d]
            return judged_change(change, basis.get(d, "")), abs(change)

        main = max(directions, key=judged)
        change = after[main] - before[main]
        size = judged(main)[0]
        crossed = basis.get(main, "").startswith(CROSSED_BASIS)
        flag = ""
        if size >= (max(threshold, noise) if crossed else threshold):
            flag = "entangled" if change > 0 else "disentangled"
        detail = "; ".join(
            f"{x} -> {y}: {before[(x, y)]:.3f} -> {after[(x, y)]:.3f}" for x, y in directions
        )
        detail += f" (on {basis.get(main, 'prototypes')})"
        if crossed:
            detail += f" (judged on the smaller change, flagged from {max(threshold, noise):g})"
        doubtful = [
            f"{main[0]} in {label}" for label, names in off_target.items() if main[0] in names
        ]
        if doubtful:  # the prototype is not one of its class: its pair numbers are doubtful
            detail += f" (off-target prototype of {', '.join(doubtful)})"
        rows.append(
            row(
                "entanglement",
                t,
                c,
                "pair_prob",
                before[main],
                after[main],
                flag=flag,
                detail=detail,
            )
        )
        rows[-1]["_judged"] = size
    rows.sort(key=lambda r: (-r["_judged"], -abs(r["change"]), r["target"], r["other"]))
    for r in rows:
        del r["_judged"]
    return rows
