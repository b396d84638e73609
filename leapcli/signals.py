"""The CLI's SIGTERM / SIGINT handling: stop the stages, close the run KILLED, say so, exit.

SIGTERM and SIGINT ask the running stages to stop (:mod:`leapcore.stopping`) and raise
KeyboardInterrupt once in the main thread, so the flow marks its MLflow run KILLED and the process
exits normally, which stops Prefect's temporary server (its atexit hook). A watchdog makes sure the
process ends even when Prefect keeps retrying a server that Ctrl-C stopped too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Any

from leapcore import stopping

_EXIT_GRACE_S = 20.0
_SAID: list[str] = []


def say_stopped(name: str) -> None:
    """The one line a stopped run prints (once)."""
    if not _SAID:
        _SAID.append(name)
        sys.stderr.write(
            f"leap: stopped by {name}; the MLflow run (if any) is marked KILLED; run the same "
            "command again to resume from the cached stages.\n"
        )
        sys.stderr.flush()


def _exit_within(seconds: float, name: str) -> None:
    """A watchdog started by a signal: Ctrl-C also stops Prefect's temporary server, and Prefect
    then retries it for minutes (crash states, logs, events). After ``seconds`` the process says it
    stopped, stops its own child processes (that server) and exits with 128 + the signal."""
    code = 128 + int(getattr(signal, name, signal.SIGINT))

    def finish() -> None:
        say_stopped(name)
        for pid in _child_pids():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
        os._exit(code)

    timer = threading.Timer(seconds, finish)
    timer.daemon = True
    timer.start()


def _child_pids() -> list[int]:
    try:
        import psutil
    except ImportError:
        return []
    return [p.pid for p in psutil.Process().children(recursive=True)]


def stop_on_signals() -> list[str]:
    """SIGTERM and SIGINT ask the running stages to stop (``leapcore.stopping``) and raise
    KeyboardInterrupt once, so the flow marks its MLflow run KILLED and the process exits, stopping
    Prefect's temporary server (its atexit hook). Returns the list the signal's name is put in."""
    received: list[str] = []

    def on_signal(signum: int, frame: Any) -> None:
        first = not received
        received.append(signal.Signals(signum).name)
        stopping.request_stop(f"stopped by {received[-1]}")
        if first:
            _exit_within(_EXIT_GRACE_S, received[-1])
            raise KeyboardInterrupt(received[-1])

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    return received
