"""The audit diff's pair measure: how much more (or less) the model confuses two classes than before.

A pair's number is the **pair probability** ``sigmoid(z_c(x) - z_t(x))`` of class ``c`` against the
target ``t`` alone, averaged over a set of images ``x`` of the target: 0 when the model leaves no
doubt, 0.5 when it cannot tell the two apart. Which images, and which model sees them, is the
*pair measure* (:data:`PAIR_MEASURES`):

- ``samples`` (default): on the user's images (``--samples``): ``t``'s images are those either
  model assigns to ``t``; both models see the same images. Targets with no sample, hybrids, and
  diffs without samples use ``fixed`` (the row's ``detail`` says which it is).
- ``fixed``: the model's change with the inputs held fixed. Both versions' prototypes of
  ``t`` are fed to both models; the change is the mean over the two prototype sets ``S`` of
  ``pp_current(S) - pp_previous(S)``. Each version's own prototypes carry the draw of its own
  optimisation: a clean retrain with another seed moves them around, and comparing each model on
  its own prototypes (the ``own`` measure) mixes that draw into the change.
- ``own``: each model on its own prototypes, read from the audits' ``entanglement`` tables (no
  model needed; the only measure when the models are not loaded).

The benchmark ``benchmarks/diff_testbed.py`` measured the three on planted merges and seed-only
retrains (``docs/diff.md`` has the table). Prototypes are optimised against their own model, and
the other version reads them its own way: a retrain with only another seed moved some pair by
0.23-0.83 under ``own`` and ``fixed`` (as much as a planted merge), and by at most 0.13 on 100
held-out digits. ``fixed`` named the merged pair first more often than ``own`` (4 of 6 merges vs
none with the default objective) but did not quiet the seed-only retrains.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from leapcore.errors import InputError

#: The pair measures (see the module docstring); the first is the default.
PAIR_MEASURES = ("samples", "fixed", "own")
#: What a diff without samples says about its pairs (measured: ``benchmarks/diff_testbed.py``).
PROTOTYPES_NOTE = (
    "pairs measured on prototypes ({how}). On the test bed a retrain with only another seed "
    "moved some pair by 0.23-0.83 this way (on 100 held-out images: at most 0.13), so a flagged "
    "pair is a prompt to look; pass samples (--samples) to measure pairs on them"
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
    previous: Any, current: Any, targets: Sequence[str], classes: Sequence[str]
) -> tuple[Pairs, Pairs]:
    """(before, after): each model's pair probabilities on both versions' prototypes, the mean over
    the two prototype sets (each set's own mean over its prototypes of a target)."""
    before: list[Pairs] = []
    after: list[Pairs] = []
    for images_of in (previous, current):
        images, owners = _prototype_sets(images_of, targets)
        before.append(
            _pairs_on(model_logits(previous, images), owners, previous.class_list, classes)
        )
        after.append(_pairs_on(model_logits(current, images), owners, current.class_list, classes))
    keys = set.intersection(*(set(p) for p in (*before, *after)))
    return (
        {k: (before[0][k] + before[1][k]) / 2 for k in keys},
        {k: (after[0][k] + after[1][k]) / 2 for k in keys},
    )


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

    ``fixed`` and ``samples`` need both models; without them the ``own`` measure is used and a
    note says so. ``samples`` without images is ``fixed``. A note says when pairs are measured
    on prototypes (and how noisy that is).
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
    a, b = fixed_pair_probabilities(previous, current, targets, classes)
    basis = dict.fromkeys(a, "both versions' prototypes")
    if measure == "samples" and (samples is None or not len(samples)):
        notes.append("no samples: " + PROTOTYPES_NOTE.format(how="both versions', both models"))
    elif measure == "fixed":
        notes.append(PROTOTYPES_NOTE.format(how="both versions', both models"))
    if measure == "samples" and samples is not None and len(samples):
        sa, sb, counts = sample_pair_probabilities(previous, current, samples, targets, classes)
        for key in set(sa) & set(sb):
            a[key], b[key] = sa[key], sb[key]
            basis[key] = f"{counts[key[0]]} samples"
        missing = [t for t in targets if t not in counts]
        if missing:
            notes.append(
                "no sample is assigned to "
                + ", ".join(missing)
                + ": their pairs are measured on both versions' prototypes"
            )
    return a, b, basis, notes


def pair_rows(
    before: Mapping[tuple[str, str], float],
    after: Mapping[tuple[str, str], float],
    basis: Mapping[tuple[str, str], str],
    targets: Sequence[str],
    classes: Sequence[str],
    threshold: float,
    off_target: Mapping[str, set[str]],
    row: Any,
) -> list[dict[str, Any]]:
    """A row per unordered pair (``row`` makes it); its numbers are those of the direction
    (``t -> c``: on ``t``'s images) whose value changed most, the other direction is in
    ``detail``. Sorted by the size of the change, largest first."""
    pairs: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for t in targets:
        for c in classes:
            if c == t or (t, c) not in before or (t, c) not in after:
                continue
            key = (t, c) if (c not in targets or targets.index(t) < targets.index(c)) else (c, t)
            pairs.setdefault(key, []).append((t, c))
    rows = []
    for (t, c), directions in pairs.items():
        main = max(directions, key=lambda d: abs(after[d] - before[d]))
        change = after[main] - before[main]
        flag = ""
        if change >= threshold:
            flag = "entangled"
        elif change <= -threshold:
            flag = "disentangled"
        detail = "; ".join(
            f"{x} -> {y}: {before[(x, y)]:.3f} -> {after[(x, y)]:.3f}" for x, y in directions
        )
        detail += f" (on {basis.get(main, 'prototypes')})"
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
    rows.sort(key=lambda r: (-abs(r["change"]), r["target"], r["other"]))
    return rows
