"""Entanglement of every class with each prototype's target.

Three measures (config option ``entanglement_measure``):

- ``relaxed`` (default): ``share`` read on the prototype after a short relaxation, ``relax_steps``
  signed-gradient steps of size ``relax_step`` (pixels in [0, 1]) that raise the target logit(s)
  (:func:`relaxed_logits`). The default ``margin`` objective pushes the runner-up logits down,
  which flattens exactly the non-target structure ``share`` reads; a few steps on the raw target
  logit let the classes that share the target's features rise with it again. With
  ``probe_steps > 0`` (the default) it is the geometric mean of that share and the share read on a
  *probe*: the audit's start image after ``probe_steps`` signed steps of ``probe_step`` raising the
  same target logit(s) (:func:`probed`), a second, short path to the class from a neutral start,
  on the rows where the probe reached the prototype's target logit (:func:`probe_reached`); a
  probe that fell short is not used (the row keeps the relaxed share). Costs ``relax_steps +
  probe_steps`` forward and backward passes per prototype row (one optimisation step's worth
  each), whatever the number of classes.
- ``share``: the share of the probability a prototype leaves to the classes other than
  its target(s) that goes to class ``c``, ``e_c = p_c / sum_{k not a target} p_k`` (a softmax over
  the non-target logits); the targets score exactly 1. It ignores how far the target itself rose,
  which with the default ``margin`` objective says more about the optimiser than about the classes,
  and compares classes by the logits the prototype still gives them. Pairs are compared with
  :func:`pair_entanglement` (geometric mean of both directions).
- ``leap`` (leap-ie's, ALGORITHMS.md 'Entanglement'): ``e_c = (z_c(P) - z_c(B)) / (max_k z_k(P) -
  z_c(B))``, each class's logit gain over the baseline against the top logit's.

Measured against held-out soft confusion (the mean predicted probability; Spearman over the 45
digit pairs, twelve digit CNNs of 55-97 % accuracy, ``margin`` objective), mean (worst), with the
engine's full defaults: ``relaxed`` with the guarded probe 0.71 (0.58; every probe reached its
target), without it 0.67 (0.53); ``share`` 0.52 (0.37); ``leap`` 0.27 (0.02). The split-half ceiling any score can reach is 0.95-1.00. No
prototype-based measure tried reached 0.7 on every model (``benchmarks/entanglement.py``).
"""

from __future__ import annotations

import difflib
import logging
from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:
    from leapcore.config import EngineConfig

logger = logging.getLogger(__name__)
Measure = Literal["relaxed", "share", "leap"]
MEASURES: tuple[str, ...] = ("relaxed", "share", "leap")
RELAX_STEPS = 10
RELAX_STEP = 0.02
PROBE_STEPS = 20
PROBE_STEP = 0.05


def unknown_measure_message(name: object) -> str:
    """The error for an entanglement measure that does not exist, naming the closest valid one."""
    close = difflib.get_close_matches(str(name), list(MEASURES), n=1, cutoff=0.0)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown entanglement measure {name!r}{hint}; valid measures: {', '.join(MEASURES)}."


def relaxed_logits(
    model: torch.nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    steps: int = RELAX_STEPS,
    step: float = RELAX_STEP,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Logits ``[B, K]`` (on the CPU) after ``steps`` signed-gradient steps raising the target logits.

    Each row moves every pixel by ``step`` per step in the direction that raises the sum of its
    target classes' logits (leap-ie's ``logit`` objective), clamped to [0, 1]; the model's
    parameters are left untouched (no gradient is kept for them).

    Args:
        model: pixel-input model returning ``[B, K]`` logits (the engine's ``LogitsModel``).
        images: ``[B, C, H, W]`` prototypes as the model sees them, in [0, 1].
        targets: ``[B, K]`` bool, each row's target classes.
        steps: number of steps; 0 returns the prototypes' own logits.
        step: the step size in pixel units.
        chunk_size: rows per forward/backward pass (all at once when None).
    """
    weights = targets.to(images.device, torch.float32)
    size = chunk_size or len(images)
    out = []
    for start in range(0, len(images), size):
        x = images[start : start + size].detach().clone()
        w = weights[start : start + size]
        for _ in range(steps):
            with torch.enable_grad():
                x.requires_grad_(True)
                value = (model(x).float() * w).sum()
                (grad,) = torch.autograd.grad(value, x)
            x = (x.detach() + step * grad.sign()).clamp_(0, 1)
        with torch.no_grad():
            out.append(model(x).float().cpu())
    return torch.cat(out)


def probed(
    model: torch.nn.Module,
    start: torch.Tensor,
    targets: torch.Tensor,
    steps: int = PROBE_STEPS,
    step: float = PROBE_STEP,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Logits ``[B, K]`` of each row's probe: the start image after ``steps`` signed steps up its targets.

    The same steps as :func:`relaxed_logits`, from the audit's start image (``[1 or B, C, H, W]``,
    repeated for every row) instead of the prototype: a short, coarse path to each row's target
    classes from a neutral image, independent of the prototype optimisation's objective.
    """
    rows = len(targets)
    images = start.expand(rows, *start.shape[1:]) if len(start) == 1 else start
    if len(images) != rows:
        raise ValueError(f"the probe needs 1 or {rows} start images, got {len(start)}")
    return relaxed_logits(model, images.contiguous(), targets, steps, step, chunk_size)


def relaxed_entanglement(
    model: torch.nn.Module,
    shown: torch.Tensor,
    prototype_logits: torch.Tensor,
    targets: torch.Tensor,
    config: EngineConfig,
    start: torch.Tensor | None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``([B, K] scores, [B] probed or None)``: ``relaxed`` entanglement of prototypes as the model
    sees them (``shown``), and which rows used the probe (None with the probe off).

    The relaxed share (:func:`relaxed_logits`, ``entanglement_relax_steps`` of
    ``entanglement_relax_step``) and, with ``entanglement_probe_steps > 0``, the probe from the
    start image ``start`` (:func:`probed`), used only on the rows where it reached its target
    (:func:`probe_reached`, against the prototype before and after the relaxation).

    Args:
        model: pixel-input model returning ``[B, K]`` logits.
        shown: ``[B, C, H, W]`` prototypes as the model sees them (alpha on its background).
        prototype_logits: ``[B, K]`` the prototypes' own logits.
        targets: ``[B, K]`` bool, each row's target classes.
        config: the engine config (the ``entanglement_*`` options).
        start: ``[1 or B, C, H, W]`` the audit's start image (needed when the probe is on).
        chunk_size: rows per forward/backward pass.

    Returns:
        The ``[B, K]`` scores, and ``[B]`` bool: the rows whose probe reached its target and so
        entered the score (None when ``entanglement_probe_steps`` is 0).
    """
    relaxed = relaxed_logits(
        model,
        shown,
        targets,
        config.entanglement_relax_steps,
        config.entanglement_relax_step,
        chunk_size,
    )
    probe = reached = None
    if config.entanglement_probe_steps:
        if start is None:
            raise ValueError("the 'relaxed' entanglement's probe needs the audit's start image")
        probe = probed(
            model,
            start.to(shown.device),
            targets,
            config.entanglement_probe_steps,
            config.entanglement_probe_step,
            chunk_size,
        )
        reached = probe_reached(probe, [relaxed, prototype_logits], targets)
        logger.info(
            "entanglement: the probe reached its target on %d of %d prototypes; the others use "
            "the relaxed share alone",
            int(reached.sum()),
            len(reached),
        )
    scores = entanglement(
        torch.zeros_like(relaxed[:1]),
        relaxed,
        targets=targets,
        measure="relaxed",
        probe_logits=probe,
        probe_used=reached,
    )
    return scores, None if reached is None else reached.cpu()


def target_logit(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[B]`` mean logit of each row's target classes."""
    mask = targets.to(logits.device, logits.dtype)
    return (logits * mask).sum(1) / mask.sum(1).clamp_min(1)


def probe_reached(
    probe_logits: torch.Tensor, references: list[torch.Tensor], targets: torch.Tensor
) -> torch.Tensor:
    """``[B]`` bool: whether each row's probe reached its target as strongly as the prototype did.

    The probe's (mean) target logit must be at least every reference's (the prototype's before
    and after the relaxation). A probe that falls short is an image on its way to the class, whose
    non-target probability goes to whatever the start image and the steps' noise look like, not
    to the target's neighbours: on the pretrained EfficientNet-Lite0 (224 px, 1000 classes) 20
    steps of 0.05 from grey end short of tabby's prototype and give tabby's non-target
    probability to sock and swimming trunks; on the digit CNNs every probe passes its
    prototype's target logit within 20 steps, by 1.6-70 logits.

    Args:
        probe_logits: ``[B, K]`` logits of each row's probe (:func:`probed`).
        references: ``[B, K]`` logits the probe must reach, each.
        targets: ``[B, K]`` bool, each row's target classes.
    """
    reached = target_logit(probe_logits, targets)
    floor = torch.stack([target_logit(r.to(probe_logits.device), targets) for r in references])
    return reached >= floor.max(0).values


def entanglement(
    baseline_logits: torch.Tensor,
    prototype_logits: torch.Tensor,
    eps: float = 1e-6,
    output: str = "logits",
    targets: torch.Tensor | None = None,
    measure: Measure = "share",
    probe_logits: torch.Tensor | None = None,
    probe_used: torch.Tensor | None = None,
) -> torch.Tensor:
    """Entanglement of every class with each row's target, ``[B, K]``.

    For ``output="multilabel_logits"`` classes are independent, so whatever ``measure``, no softmax
    or max over classes couples them: ``e_c = (z_c(P) - z_c(B)) / (z_t(P) - z_t(B))``, each class's
    logit gain over the target's (``z_t``: the mean logit of the row's target classes, given by
    ``targets``); the target scores exactly 1, a class that did not move 0, a class that gained more
    than the target above 1.

    Args:
        baseline_logits: ``[B or 1, K]`` logits of the start image(s) (``leap`` and multi-label).
        prototype_logits: ``[B, K]`` logits of the finished prototypes.
        eps: ``leap``: the denominator's magnitude is kept at least ``eps`` (its sign kept), so a
            class whose baseline logit already equals the prototype's top logit scores a finite value.
        output: the config option ``output``.
        targets: ``[B, K]`` bool, each row's target classes (needed for multi-label; for ``share``
            the row's top class when omitted).
        measure: ``share`` or ``relaxed`` (in [0, 1], the targets exactly 1; for ``relaxed`` pass
            the :func:`relaxed_logits` as ``prototype_logits``) or ``leap`` (about 1 for the
            target, exactly 1 for the top class, 0 for a class that did not move).
        probe_logits: ``relaxed`` only: ``[B, K]`` logits of each row's probe (:func:`probed`).
            Where the probe reached its target (:func:`probe_reached`) the score is the geometric
            mean ``sqrt(e_c(relaxed) * e_c(probe))`` of the two shares; elsewhere the relaxed
            share alone (targets exactly 1 either way).
        probe_used: ``[B]`` bool, the rows whose probe reached its target, when the caller has
            them (:func:`relaxed_entanglement` checks against the prototypes before and after the
            relaxation); default: :func:`probe_reached` against ``prototype_logits``.

    Returns:
        ``[B, K]`` entanglement scores.
    """
    if output == "multilabel_logits":
        if targets is None:
            raise ValueError("multi-label entanglement needs each row's target classes")
        gain = prototype_logits - baseline_logits
        mask = targets.to(gain.dtype)
        target_gain = (gain * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp_min(1)
        sign = torch.where(
            target_gain < 0, -torch.ones_like(target_gain), torch.ones_like(target_gain)
        )
        return gain / (sign * target_gain.abs().clamp_min(eps))
    if measure in ("share", "relaxed"):
        scores = share(prototype_logits, targets)
        if probe_logits is not None and measure == "relaxed":
            if targets is None:
                raise ValueError("the probed entanglement needs each row's target classes")
            if probe_used is None:
                probe_used = probe_reached(probe_logits, [prototype_logits], targets)
            probed_scores = (scores * share(probe_logits, targets)).sqrt()
            scores = torch.where(probe_used.to(scores.device)[:, None], probed_scores, scores)
        return scores
    if measure != "leap":
        raise ValueError(unknown_measure_message(measure))
    top = prototype_logits.max(dim=1, keepdim=True).values
    num = prototype_logits - baseline_logits
    den = top - baseline_logits
    sign = torch.where(den < 0, -torch.ones_like(den), torch.ones_like(den))
    den = sign * den.abs().clamp_min(eps)
    return num / den


def share(prototype_logits: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
    """``p_c / sum_{k not a target} p_k`` per row (a softmax over the non-target logits); targets 1.

    Args:
        prototype_logits: ``[B, K]``.
        targets: ``[B, K]`` bool; None takes each row's top class as its target.
    """
    if targets is None:
        top = prototype_logits.argmax(1, keepdim=True)
        targets = torch.zeros_like(prototype_logits, dtype=torch.bool).scatter_(1, top, True)
    targets = targets.to(torch.bool)
    if bool(targets.all(1).any()):
        raise ValueError("entanglement needs at least one class that is not a target")
    others = prototype_logits.masked_fill(targets, float("-inf")).softmax(1)
    return torch.where(targets, torch.ones_like(others), others)


def pair_entanglement(scores: torch.Tensor, per_target: int = 1) -> torch.Tensor:
    """Symmetric ``[T, T]`` entanglement between single-class targets: ``sqrt(e_ab * e_ba)``.

    Rows of the same target (``per_target`` prototypes each, target-major) are averaged first;
    the scores' columns must be the targets' classes in row order (all classes audited). Meant for
    ``share`` scores (non-negative); the geometric mean makes a pair entangled only when each
    class takes a share of the other's prototype.

    Args:
        scores: ``[T * per_target, T]`` entanglement of each prototype row with every class.
        per_target: prototypes per target.
    """
    rows = scores.reshape(-1, per_target, scores.shape[1]).mean(1)
    if rows.shape[0] != rows.shape[1]:
        raise ValueError(f"pair entanglement needs one target per class, got {tuple(rows.shape)}")
    return (rows.clamp_min(0) * rows.T.clamp_min(0)).sqrt()
