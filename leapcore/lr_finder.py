"""Learning-rate range test on the prototype objective (``find_lr_steps``, ``min_lr``, ``max_lr``)."""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass

import torch

from leapcore import stopping
from leapcore.config import EngineConfig
from leapcore.problem import PrototypeProblem, TargetSet, row_keys, target_weights

log = logging.getLogger(__name__)


@dataclass
class LearningRateResult:
    """The chosen rate and the range test behind it (empty when the test was skipped)."""

    lr: float
    rates: list[float]
    losses: list[float]
    fell_back: bool
    reason: str = ""


def window_rates(config: EngineConfig) -> list[float]:
    """The rate of each window, log-spaced from ``min_lr`` to ``max_lr``.

    ``num_lr_windows`` windows, but never more than ``find_lr_steps`` (at least one step per window):
    a short test sweeps the whole range in fewer windows instead of stopping at its low end.
    """
    n = max(2, min(config.num_lr_windows, config.find_lr_steps))
    lo, hi = math.log(config.min_lr), math.log(config.max_lr)
    return [math.exp(lo + (hi - lo) * i / (n - 1)) for i in range(n)]


def pick_rate(rates: list[float], losses: list[float]) -> tuple[float | None, str]:
    """The rate where the (lightly smoothed) loss falls fastest against log rate, or why there is none."""
    finite = [(r, loss) for r, loss in zip(rates, losses) if math.isfinite(loss)]
    if len(finite) < 3:
        return None, f"only {len(finite)} finite loss windows (need 3)"
    smooth = []
    for i in range(len(finite)):
        near = [finite[j][1] for j in range(max(0, i - 1), min(len(finite), i + 2))]
        smooth.append(sum(near) / len(near))
    slopes = [
        (smooth[i + 1] - smooth[i]) / (math.log(finite[i + 1][0]) - math.log(finite[i][0]))
        for i in range(len(finite) - 1)
    ]
    best = min(range(len(slopes)), key=lambda i: slopes[i])
    if slopes[best] >= 0:
        return None, "the loss only rose over the range"
    return finite[best][0], ""


def find_learning_rate(
    model: torch.nn.Module,
    targets: list[TargetSet],
    start: torch.Tensor,
    config: EngineConfig,
    chunk_size: int,
) -> LearningRateResult:
    """Sweep the rate from ``min_lr`` to ``max_lr`` over ``find_lr_steps`` steps and pick the steepest fall.

    Windows of steps share one rate; the loss of a window is its mean. The test stops early (with
    ``stop_lr_early``) once a window's loss is not finite or, after the second window, exceeds the
    best one by more than three times its magnitude (``best + 3 * |best|``, so negative losses work). Non-finite losses, a loss
    that only rises or too few windows fall back to ``config.lr`` with a warning. ``find_lr_steps=0``
    returns ``config.lr``.
    """
    if config.find_lr_steps == 0:
        return LearningRateResult(config.lr, [], [], fell_back=False, reason="find_lr_steps is 0")
    weights, group = target_weights(
        targets,
        model.num_classes,
        config.objective_weight,
        config.prototypes_per_class,
        start.device,
    )
    keys = row_keys(targets, config.prototypes_per_class)
    problem = PrototypeProblem(model, start, weights, group, config, chunk_size, config.seed, keys)
    rates = window_rates(config)
    per_window = max(1, config.find_lr_steps // len(rates))
    losses: list[float] = []
    best = math.inf
    for rate in rates:
        total = torch.zeros((), device=start.device)
        for _ in range(per_window):
            stopping.check()
            total = total + problem.step(rate).loss
        loss = float(total) / per_window  # one sync per window
        losses.append(loss)
        if math.isfinite(loss):
            best = min(best, loss)
        if config.stop_lr_early and (
            not math.isfinite(loss) or (len(losses) > 2 and loss > best + 3 * abs(best))
        ):
            break
    chosen, reason = pick_rate(rates[: len(losses)], losses)
    if chosen is None:
        warnings.warn(f"learning-rate finder fell back to lr={config.lr}: {reason}.", stacklevel=2)
        return LearningRateResult(
            config.lr, rates[: len(losses)], losses, fell_back=True, reason=reason
        )
    log.info("learning-rate finder chose %.4g after %d windows", chosen, len(losses))
    return LearningRateResult(chosen, rates[: len(losses)], losses, fell_back=False)
