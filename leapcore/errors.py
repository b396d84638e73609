"""Errors the engine raises at its public boundary; each message says what was wrong and how to fix it."""

from __future__ import annotations

from typing import Any


class LeapError(Exception):
    """Base class of every error leapcore raises on purpose."""


class ConfigError(LeapError, ValueError):
    """An unknown config option, or a value of the wrong type or out of range."""


class ModelOutputError(LeapError, ValueError):
    """The model's output is not a batch of logits that matches the class list."""


class InputError(LeapError, ValueError):
    """Targets, samples or class lists that the model cannot take."""


class NonFiniteError(LeapError, FloatingPointError):
    """The loss or its gradients became NaN or Inf during optimisation.

    Attributes:
        step: the first step at which a non-finite value appeared.
        stage: which optimisation stopped.
        last_finite: the last finite result (an image or mask batch), kept for inspection.
    """

    def __init__(self, stage: str, step: int, last_finite: Any = None, last_finite_step: int = 0):
        self.stage = stage
        self.step = step
        self.last_finite = last_finite
        self.last_finite_step = last_finite_step
        super().__init__(
            f"{stage}: the loss or its gradients became NaN/Inf at step {step}; stopped and kept the "
            f"last finite result (step {last_finite_step}) in `.last_finite`. Lower the learning rate "
            "or check the model for operations that overflow."
        )


class ModelSourceError(LeapError, ValueError):
    """A model could not be found or loaded from the source that was named."""


class UntrustedSourceError(ModelSourceError):
    """Loading would run code from a file (a pickle or a Keras Lambda) that was not marked trusted."""
