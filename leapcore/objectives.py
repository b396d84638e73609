"""Prototype objectives: what a step maximises, as small composable callables.

An :class:`Objective` maps a batch of logits ``[N, K]`` and per-row target weights ``[N, K]`` (the
target classes carry ``objective_weight / len(targets)``, the rest 0) to one score per row ``[N]``.
Objectives add (``a + b``) and scale by numbers (``0.5 * a``), in the manner of lucent's objectives.
The ``objective`` config option names one from :data:`OBJECTIVES`:

- ``logit``: the weighted target logits (leap-ie's objective).
- ``log_softmax``: the weighted target log-probabilities; raising it means raising the target's
  logit *relative to all others*, so a dominant class cannot grow faster than the target.
- ``margin``: the weighted target logits minus the largest non-target logit (times the weights' sum).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

import torch

from leapcore.errors import InputError

ObjectiveFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Objective:
    """A per-row score of a batch of logits; composable with ``+`` and scalar ``*``.

    Args:
        fn: ``(logits [N, K], weights [N, K]) -> [N]``.
        name: a readable name (shown in logs and errors).
    """

    def __init__(self, fn: ObjectiveFn, name: str = "objective") -> None:
        self.fn = fn
        self.name = name

    def __call__(self, logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.fn(logits, weights)

    def __add__(self, other: Objective) -> Objective:
        if not isinstance(other, Objective):
            return NotImplemented
        return Objective(lambda z, w: self(z, w) + other(z, w), f"{self.name} + {other.name}")

    def __mul__(self, scale: float) -> Objective:
        if isinstance(scale, Objective) or not isinstance(scale, (int, float)):
            return NotImplemented
        return Objective(lambda z, w: scale * self(z, w), f"{scale:g} * {self.name}")

    __rmul__ = __mul__

    def __neg__(self) -> Objective:
        return -1.0 * self

    def __repr__(self) -> str:
        return f"Objective({self.name})"


OBJECTIVES: dict[str, Objective] = {}


def register(name: str) -> Callable[[ObjectiveFn], ObjectiveFn]:
    """Decorator: register ``fn(logits, weights) -> [N]`` as the objective called ``name``."""

    def wrap(fn: ObjectiveFn) -> ObjectiveFn:
        OBJECTIVES[name] = Objective(fn, name)
        return fn

    return wrap


@register("logit")
def weighted_logit(logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Sum of the target logits times their weights (leap-ie's objective)."""
    return (logits * weights).sum(1)


@register("log_softmax")
def weighted_log_softmax(logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Sum of the target log-probabilities times their weights."""
    return (logits.log_softmax(1) * weights).sum(1)


@register("margin")
def weighted_margin(logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted target logits minus the largest logit of a non-target class (times the weights' sum)."""
    others = logits.masked_fill(weights != 0, float("-inf")).amax(1)
    return (logits * weights).sum(1) - weights.sum(1) * others


def get_objective(name: str) -> Objective:
    """The registered objective called ``name``.

    Raises:
        InputError: no such objective; the message names the closest valid one.
    """
    if name not in OBJECTIVES:
        close = difflib.get_close_matches(str(name), list(OBJECTIVES), n=1, cutoff=0.0)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise InputError(
            f"unknown objective {name!r}{hint}; valid objectives: {', '.join(OBJECTIVES)}."
        )
    return OBJECTIVES[name]
