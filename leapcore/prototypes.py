"""Prototype optimisation: every target and every prototype per target in one batch."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from leapcore import stopping
from leapcore.config import EngineConfig
from leapcore.convergence import PlateauStop, as_rows
from leapcore.errors import InputError, NonFiniteError
from leapcore.outputs import probabilities
from leapcore.problem import PrototypeProblem, TargetSet, row_keys, target_weights
from leapcore.progress import report, with_progress
from leapcore.quality import prototype_flags, robust_target_probs
from leapcore.rng import RowStreams, Stream
from leapcore.stage_names import PROTOTYPES

log = logging.getLogger(__name__)


@dataclass
class PrototypeResult:
    """Finished prototypes, one row per (target, prototype index), target-major.

    Attributes:
        targets: the target class sets, one per target (hybrids have several classes).
        images: ``[B, C, H, W]`` in [0, 1] (after ``equalise``).
        alphas: ``[B, 1, H, W]`` when ``use_alpha``/``alpha_only``, else None.
        logits: ``[B, K]`` of the images as the model sees them (alpha on a fixed background).
        trajectory_steps: the steps at which probabilities were recorded.
        trajectory: ``[len(trajectory_steps), B, K]`` probabilities.
        lr: the step size used.
        steps: steps run.
        seconds: wall time of the optimisation loop.
        robust_probs: ``[B]`` mean target probability under random resized crops and flips
            (:func:`leapcore.quality.robust_target_probs`), or None when not measured.
        transfer_probs: ``[B, R]`` target probability on each of ``reference_models``, or None.
        reference_models: the names (URIs) of the reference models, in column order.
    """

    targets: list[TargetSet]
    per_target: int
    images: torch.Tensor
    alphas: torch.Tensor | None
    logits: torch.Tensor
    trajectory_steps: list[int]
    trajectory: torch.Tensor
    lr: float
    steps: int
    seconds: float
    extras: dict = field(default_factory=dict)
    robust_probs: torch.Tensor | None = None
    transfer_probs: torch.Tensor | None = None
    reference_models: list[str] = field(default_factory=list)
    objective_weight: float = 1.0
    output: str = "logits"
    region: str | None = None  # a segmentation model's region label (logits pooled there)

    @property
    def probs(self) -> torch.Tensor:
        """Class probabilities: softmax, or per-class sigmoid for multi-label models."""
        return probabilities(self.logits, self.output)

    def target_mask(self) -> torch.Tensor:
        """``[B, K]`` bool: each row's target classes."""
        mask = torch.zeros(self.logits.shape, dtype=torch.bool)
        for row in range(len(mask)):
            mask[row, self.targets[self.row_target(row)]] = True
        return mask

    def flags(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(top_class, off_target, target_prob)`` per row (see :func:`leapcore.quality.prototype_flags`)."""
        return prototype_flags(
            self.logits, self.targets, self.per_target, self.objective_weight, self.output
        )

    def row_target(self, row: int) -> int:
        return row // self.per_target

    def row_index(self, row: int) -> int:
        return row % self.per_target


def equalise(images: torch.Tensor, amount: float) -> torch.Tensor:
    """Blend each channel with its histogram-equalised version (rank / count) by ``amount``."""
    if amount <= 0:
        return images
    flat = images.flatten(2)
    ranks = flat.argsort(dim=2).argsort(dim=2).to(images.dtype) / max(flat.shape[2] - 1, 1)
    return (1 - amount) * images + amount * ranks.view_as(images)


def check_gradient_moves(grad_max: torch.Tensor) -> None:
    """The start image must give a non-zero gradient; a saturated network would never move."""
    if float(grad_max) == 0.0:
        raise InputError(
            "the gradient of the objective is exactly zero at the start image: the model saturates "
            "there and the prototype would never move. Use baseline_init 0.5 (mid-grey) or 'r' (noise)."
        )


@with_progress
def optimise_prototypes(
    model: torch.nn.Module,
    targets: list[TargetSet],
    start: torch.Tensor,
    config: EngineConfig,
    lr: float,
    chunk_size: int,
    robust: bool = True,
) -> PrototypeResult:
    """Optimise ``config.prototypes_per_class`` prototypes for every target set, all in one batch.

    Args:
        model: pixel-space images -> logits (a :class:`~leapcore.adapter.LogitsModel`).
        targets: class index sets; one set of several classes makes one hybrid prototype.
        start: ``[1 or B, C, H, W]`` start images in [0, 1] (the baseline).
        config: validated options.
        lr: the Adam step size (from the learning-rate finder or ``config.lr``).
        chunk_size: rows per model call; results do not depend on it.
        robust: measure ``robust_probs`` (16 crops and flips per row); False leaves it None
            (the spurious scan's extra prototypes, which only need the images).

    Raises:
        NonFiniteError: the loss or gradients became NaN/Inf; carries the last finite images.
    """
    num_classes = model.num_classes
    weights, group = target_weights(
        targets, num_classes, config.objective_weight, config.prototypes_per_class, start.device
    )
    keys = row_keys(targets, config.prototypes_per_class)
    problem = PrototypeProblem(model, start, weights, group, config, chunk_size, config.seed, keys)
    if config.prototypes_per_class > 1 and config.baseline_init != "r":
        # Identical starts are a fixed point of the diversity term (its gradient vanishes there), so
        # several prototypes of one target start from slightly different images.
        with torch.no_grad():
            offset = problem.colour.offset
            jitter = RowStreams(config.seed + Stream.PROTOTYPE_JITTER, keys, start.device).randn(
                offset.shape[1:]
            )
            offset.add_(0.25 * jitter.to(offset.dtype))
    steps_logged: list[int] = []
    trajectory: list[torch.Tensor] = []
    view, logits = problem.evaluate()
    best_score = problem.target_score(logits)
    best_images, best_alpha, best_logits = problem.images().detach(), problem.alphas(), logits
    best_alpha = best_alpha.detach() if best_alpha is not None else None
    steps_logged.append(0)
    trajectory.append(problem.probabilities(logits).cpu())
    last_snapshot, last_step = problem.colour.snapshot(), 0
    bad_step = torch.full((), -1, dtype=torch.long, device=start.device)
    stop = (
        PlateauStop(
            group.tolist(),
            config.stop_check_every,
            config.stop_tolerance,
            config.stop_patience,
            antitype=config.objective_weight < 0,
        )
        if config.stop_early
        else None
    )
    active = list(range(problem.batch))
    steps_run = 0
    began = time.perf_counter()
    for step in range(1, config.max_steps + 1):
        stopping.check()
        out = problem.step(lr, None if len(active) == problem.batch else active)
        steps_run = step
        bad_step = torch.where(
            (bad_step < 0) & ~out.finite, torch.full_like(bad_step, step), bad_step
        )
        if step == 1:
            # One sync, once: a saturated start would otherwise spin for max_steps doing nothing.
            check_gradient_moves(out.grad_max)
        if stop is not None:
            stop.add(out.row_score, active)
            if stop.due(step):
                _, clean = problem.evaluate(active)
                rows = as_rows(active, start.device)
                done = stop.check(step, problem.target_score(clean, rows), active)
                active = [r for r in active if r not in set(done)]
        if step % config.log_freq == 0 or step == config.max_steps or not active:
            first_bad = int(bad_step)
            if first_bad >= 0:
                problem.colour.restore(last_snapshot)
                raise NonFiniteError(
                    "prototype optimisation", first_bad, problem.images().detach().cpu(), last_step
                )
            view, logits = problem.evaluate()
            score = problem.target_score(logits)
            steps_logged.append(step)
            trajectory.append(problem.probabilities(logits).cpu())
            improved = (
                score >= best_score
                if not config.always_update
                else torch.ones_like(score, dtype=torch.bool)
            )
            images = problem.images().detach()
            best_images = torch.where(improved[:, None, None, None], images, best_images)
            alpha = problem.alphas()
            if alpha is not None:
                best_alpha = torch.where(improved[:, None, None, None], alpha.detach(), best_alpha)
            best_logits = torch.where(improved[:, None], logits, best_logits)
            best_score = torch.where(improved, score, best_score)
            last_snapshot, last_step = problem.colour.snapshot(), step
            report(PROTOTYPES, step, config.max_steps)
            log.info(
                "prototypes step %d/%d: mean target score %.3f, %d of %d rows still running",
                step,
                config.max_steps,
                float(score.mean()),
                len(active),
                problem.batch,
            )
        if not active:
            break
    seconds = time.perf_counter() - began
    images = equalise(best_images, config.equalise)
    if config.equalise > 0:
        with torch.no_grad():
            shown = (
                images
                if best_alpha is None
                else images * best_alpha + problem.eval_background * (1 - best_alpha)
            )
            best_logits = torch.cat(
                [model(shown[i : i + chunk_size]) for i in range(0, len(shown), chunk_size)]
            )
    shown = (
        images
        if best_alpha is None
        else images * best_alpha + problem.eval_background * (1 - best_alpha)
    )
    robust = (
        robust_target_probs(
            model, shown.detach(), targets, config.prototypes_per_class, config.seed, chunk_size
        )
        if robust
        else None
    )
    result = PrototypeResult(
        targets=targets,
        per_target=config.prototypes_per_class,
        images=images.cpu(),
        alphas=None if best_alpha is None else best_alpha.cpu(),
        logits=best_logits.cpu(),
        trajectory_steps=steps_logged,
        trajectory=torch.stack(trajectory),
        lr=float(lr),
        steps=steps_run,
        seconds=seconds,
        robust_probs=robust,
        objective_weight=config.objective_weight,
        output=getattr(model, "output", "logits"),
        region=getattr(model, "region_label", None),
    )
    if stop is not None:
        result.extras["stopped_at"] = [
            stop.stopped_at.get(r, steps_run) for r in range(problem.batch)
        ]
    top, off, prob = result.flags()
    for row in off.nonzero().flatten().tolist():
        log.warning(
            "the prototype of target %s (index %d) is classified as class %d (target probability "
            "%.3f): it is not a prototype of its target.",
            targets[row // config.prototypes_per_class],
            row % config.prototypes_per_class,
            int(top[row]),
            float(prob[row]),
        )
    return result


def as_numpy(result: PrototypeResult) -> dict[str, np.ndarray]:
    return {
        "prototypes": result.images.numpy(),
        "prototype_logits": result.logits.numpy(),
        "trajectory": result.trajectory.numpy(),
        "trajectory_steps": np.asarray(result.trajectory_steps),
    }
