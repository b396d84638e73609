"""Prototype objectives: what a step maximises, as small composable callables (lucent's style).

An :class:`Objective` is a weighted sum of terms. A term reads either the model's logits (with the
per-row target weights ``[N, K]``: the target classes carry ``objective_weight / len(targets)``, the
rest 0) or the images being optimised (no model needed), and gives one score per row. Terms add
(``a + b``), subtract (``a - b``) and scale by numbers (``0.5 * a``)::

    TargetMargin() - 0.1 * HighFrequency() - 0.5 * Coverage()

The ``objective`` config option names the logit term (:data:`OBJECTIVES`):

- ``logit``: the weighted target logits (leap-ie's objective).
- ``log_softmax``: the weighted target log-probabilities; raising it means raising the target's
  logit *relative to all others*, so a dominant class cannot grow faster than the target.
- ``margin``: the weighted target logits minus the largest non-target logit (times the weights' sum).

:func:`build_objective` turns a config into the whole objective (the logit term minus the weighted
penalties ``hf_weight``, ``diversity_weight``, ``alpha_weight``, ``alpha_mask``). The step evaluates
the logit terms chunk by chunk through the model and the image terms once per step on the whole
batch (:meth:`Objective.penalty`), in the order they were added.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from leapcore import penalties
from leapcore.errors import InputError

if TYPE_CHECKING:
    from leapcore.config import EngineConfig

ObjectiveFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: What an image term gets: ``(images [B, C, H, W] (a thunk), alphas [B, 1, H, W] or None,
#: group [B])``; it returns ``[B]``, or None when it has nothing to score (no alpha channel).
ImageTermFn = Callable[["ImageView"], "torch.Tensor | None"]


@dataclass
class ImageView:
    """What the image terms of one step read; ``images`` is rendered once, when a term asks."""

    render: Callable[[], torch.Tensor]
    alphas: torch.Tensor | None
    group: torch.Tensor
    _images: torch.Tensor | None = None

    @property
    def images(self) -> torch.Tensor:
        if self._images is None:
            self._images = self.render()
        return self._images


@dataclass(frozen=True)
class Term:
    """One weighted term: ``scale * fn(...)``; ``reads`` is ``"logits"`` or ``"images"``."""

    scale: float
    fn: Callable
    reads: str
    name: str

    def label(self) -> str:
        return self.name if self.scale == 1 else f"{self.scale:g} * {self.name}"


class Objective:
    """A per-row score to maximise; composable with ``+``, ``-`` and scalar ``*``.

    Args:
        fn: ``(logits [N, K], weights [N, K]) -> [N]`` for a logit term, or
            ``(view: ImageView) -> [B] | None`` for an image term.
        name: a readable name (shown in logs and errors).
        reads: ``"logits"`` or ``"images"``.
    """

    def __init__(
        self,
        fn: Callable | None = None,
        name: str = "objective",
        reads: str = "logits",
        terms: tuple[Term, ...] | None = None,
    ) -> None:
        if terms is None:
            if fn is None or reads not in ("logits", "images"):
                raise ValueError("an objective needs fn and reads 'logits' or 'images'")
            terms = (Term(1.0, fn, reads, name),)
        self.terms = terms
        self.name = " + ".join(t.label() for t in terms) if len(terms) > 1 else name

    # -- algebra -------------------------------------------------------------------------------
    def __add__(self, other: Objective) -> Objective:
        if not isinstance(other, Objective):
            return NotImplemented
        return Objective(terms=self.terms + other.terms)

    def __sub__(self, other: Objective) -> Objective:
        if not isinstance(other, Objective):
            return NotImplemented
        return self + (-other)

    def __mul__(self, scale: float) -> Objective:
        if isinstance(scale, Objective) or not isinstance(scale, (int, float)):
            return NotImplemented
        return Objective(
            terms=tuple(Term(t.scale * scale, t.fn, t.reads, t.name) for t in self.terms)
        )

    __rmul__ = __mul__

    def __neg__(self) -> Objective:
        return -1.0 * self

    # -- evaluation ----------------------------------------------------------------------------
    def __call__(self, logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The logit terms' score ``[N]`` (the part that needs the model)."""
        total = None
        for term in self.terms:
            if term.reads != "logits":
                continue
            value = term.fn(logits, weights)
            value = value if term.scale == 1 else term.scale * value
            total = value if total is None else total + value
        if total is None:
            raise InputError(f"objective {self.name!r} has no term that reads the model's logits.")
        return total

    def penalty(self, view: ImageView) -> torch.Tensor:
        """Minus the image terms' score ``[B]``: what the step adds to its loss, term by term."""
        total = torch.zeros(view.group.shape[0], device=view.group.device)
        for term in self.terms:
            if term.reads != "images":
                continue
            value = term.fn(view)
            if value is not None:
                total = total + (-term.scale) * value
        return total

    @property
    def reads_images(self) -> bool:
        return any(t.reads == "images" for t in self.terms)

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


# ---------------------------------------------------------------------------------------------- #
# The terms by name, lucent style
# ---------------------------------------------------------------------------------------------- #
def TargetLogit() -> Objective:  # noqa: N802 (an objective's constructor, as lucent names them)
    """The weighted target logits (``objective: logit``)."""
    return OBJECTIVES["logit"]


def TargetLogSoftmax() -> Objective:  # noqa: N802
    """The weighted target log-probabilities (``objective: log_softmax``)."""
    return OBJECTIVES["log_softmax"]


def TargetMargin() -> Objective:  # noqa: N802
    """The weighted target logits minus the largest other logit (``objective: margin``)."""
    return OBJECTIVES["margin"]


def HighFrequency() -> Objective:  # noqa: N802
    """High-frequency energy of the images (:func:`leapcore.penalties.high_frequency`)."""
    return Objective(lambda v: penalties.high_frequency(v.images), "high_frequency", "images")


def Diversity() -> Objective:  # noqa: N802
    """Cosine similarity of each image to the others of its target (nothing for a batch of one)."""

    def similarity(view: ImageView) -> torch.Tensor | None:
        if view.group.shape[0] < 2:
            return None
        return penalties.diversity(view.images, view.group)

    return Objective(similarity, "diversity", "images")


def Coverage() -> Objective:  # noqa: N802
    """Mean alpha: how much of the image the prototype keeps (nothing without an alpha channel)."""
    return Objective(
        lambda v: None if v.alphas is None else penalties.coverage(v.alphas), "coverage", "images"
    )


def CentreCoverage() -> Objective:  # noqa: N802
    """Alpha weighted by the squared distance from the centre (nothing without an alpha channel)."""
    return Objective(
        lambda v: None if v.alphas is None else penalties.centre_weighted_coverage(v.alphas),
        "centre_coverage",
        "images",
    )


def build_objective(config: EngineConfig) -> Objective:
    """The prototype objective a config asks for: the ``objective`` term minus the penalties.

    ``objective - hf_weight * HighFrequency() - diversity_weight * Diversity()``, and with an alpha
    channel ``- alpha_weight * Coverage()`` and (``alpha_mask``) ``- max(alpha_weight, 1) *
    CentreCoverage()``; a penalty whose weight is 0 is left out.
    """
    objective = get_objective(config.objective)
    if config.hf_weight > 0:
        objective = objective - config.hf_weight * HighFrequency()
    if config.diversity_weight > 0:
        objective = objective - config.diversity_weight * Diversity()
    if config.use_alpha or config.alpha_only:
        if config.alpha_weight > 0:
            objective = objective - config.alpha_weight * Coverage()
        if config.alpha_mask:
            objective = objective - max(config.alpha_weight, 1.0) * CentreCoverage()
    return objective
