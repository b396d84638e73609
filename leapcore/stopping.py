"""A cooperative stop: a signal handler asks, and every optimisation step checks.

The stages run in worker threads, which a signal cannot interrupt; the CLI's SIGTERM/SIGINT
handler calls :func:`request_stop`, and the next step of any running optimisation raises
:class:`StopRequestedError`, so a stopped audit ends within one step instead of finishing its stage.
"""

from __future__ import annotations

import threading

from leapcore.errors import LeapError

_REQUESTED = threading.Event()
_REASON: list[str] = []


class StopRequestedError(LeapError):
    """The run was asked to stop (a signal); not an error of the input, and never retried."""


def request_stop(reason: str = "stop requested") -> None:
    """Ask every running optimisation of this process to stop at its next step."""
    _REASON[:] = [reason]
    _REQUESTED.set()


def clear() -> None:
    """Forget a stop request (a new run in the same process)."""
    _REASON.clear()
    _REQUESTED.clear()


def requested() -> bool:
    return _REQUESTED.is_set()


def check() -> None:
    """Raise :class:`StopRequestedError` if a stop was asked for; call once per optimisation step.

    Raises:
        StopRequestedError: with the reason given to :func:`request_stop`.
    """
    if _REQUESTED.is_set():
        raise StopRequestedError(_REASON[0] if _REASON else "stop requested")
