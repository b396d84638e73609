"""Progress of the engine's step loops, as events instead of log text.

The prototype and isolation loops call :func:`report` every ``log_freq`` steps (when they already
synchronise with the host). Who wants the events either passes ``progress=`` to
:func:`~leapcore.prototypes.optimise_prototypes` / :func:`~leapcore.isolation.isolate_features`
(that call's events only) or :func:`listen` s for every loop of the process (the CLI's progress bars
do, whichever Prefect task thread runs the loop). A failing callback is logged, never raised: progress
must not break an audit.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class ProgressEvent:
    """One step report of an engine loop.

    Attributes:
        stage: the stage's name (``optimise_prototypes`` or ``isolate_features``).
        step: steps done.
        total: steps the loop runs at most.
    """

    stage: str
    step: int
    total: int


ProgressCallback = Callable[[ProgressEvent], None]

_listeners: list[ProgressCallback] = []
_lock = threading.Lock()
_current: ContextVar[ProgressCallback | None] = ContextVar("leapcore_progress", default=None)


@contextlib.contextmanager
def listen(callback: ProgressCallback) -> Iterator[None]:
    """Send every loop's events in this process to ``callback`` while the block runs."""
    with _lock:
        _listeners.append(callback)
    try:
        yield
    finally:
        with _lock:
            _listeners.remove(callback)


def with_progress(fn: F) -> F:
    """Decorator: give ``fn`` a keyword ``progress`` callback that gets the events of this call."""

    @functools.wraps(fn)
    def wrapper(*args: Any, progress: ProgressCallback | None = None, **kwargs: Any) -> Any:
        if progress is None:
            return fn(*args, **kwargs)
        token = _current.set(progress)
        try:
            return fn(*args, **kwargs)
        finally:
            _current.reset(token)

    return wrapper  # type: ignore[return-value]


def report(stage: str, step: int, total: int) -> None:
    """Hand ``ProgressEvent(stage, step, total)`` to this call's callback and every listener."""
    with _lock:
        callbacks = [_current.get(), *_listeners]
    event = ProgressEvent(stage, step, total)
    for callback in callbacks:
        if callback is None:
            continue
        try:
            callback(event)
        except Exception:  # a display must never stop the optimisation
            log.exception("progress callback %r failed", callback)
