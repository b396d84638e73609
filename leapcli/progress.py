"""The terminal side of ``leap``: plain lines and the stage / step progress bars."""

from __future__ import annotations

import logging
import sys
from typing import Any

from leapcore.progress import ProgressEvent, listen
from leapcore.stage_names import ISOLATION, PROTOTYPES


def say(text: str = "") -> None:
    """One line on stdout, flushed (the CLI's own output; never a log record)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------------- #
# Progress
# ---------------------------------------------------------------------------------------------- #
class ProgressDisplay(logging.Handler):
    """Progress bars fed by the pipeline's stage records and the engine's progress events.

    One bar per stage, each with a step count: prototype optimisation and feature isolation advance
    with the engine's :class:`~leapcore.progress.ProgressEvent` s (every ``log_freq`` steps, through
    :func:`leapcore.progress.listen`); other stages count 0/1 -> 1/1. Without a terminal, plain
    lines are printed instead.
    """

    def __init__(self, enabled: bool = True, console: Any = None):
        super().__init__(logging.INFO)
        self.live = enabled and (console is not None or sys.stdout.isatty())
        self.enabled = enabled
        self.bars: dict[str, Any] = {}
        self.progress: Any = None
        if self.live:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self.progress = Progress(
                TextColumn("{task.description:<28}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[unit]:<6}"),
                TextColumn("{task.fields[state]}"),
                TimeElapsedColumn(),
                console=console,
            )

    LOGGERS = ("leapcore.pipeline",)
    #: engine loop -> the pipeline stages that run it
    STEPPED = {
        PROTOTYPES: (PROTOTYPES,),
        ISOLATION: (ISOLATION, "isolate_samples"),
    }

    def __enter__(self) -> ProgressDisplay:
        for name in self.LOGGERS:
            logger = logging.getLogger(name)
            logger.addHandler(self)
            logger.setLevel(logging.INFO)
        self._listening = listen(self.on_progress)
        self._listening.__enter__()
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        for name in self.LOGGERS:
            logging.getLogger(name).removeHandler(self)
        self._listening.__exit__(*exc)
        if self.progress is not None:
            self.progress.stop()

    def on_progress(self, event: ProgressEvent) -> None:
        """An engine loop's step count: advance the bars of the stages that run that loop."""
        if self.enabled:
            for stage in self.STEPPED.get(event.stage, ()):
                self._advance(stage, event.step, event.total)

    def emit(self, record: logging.LogRecord) -> None:
        if not self.enabled:
            return
        try:
            stage = getattr(record, "leap_stage", None)
            if stage is not None:
                self._stage(stage, record)
        except Exception:  # progress must never break an audit
            self.handleError(record)

    def _stage(self, stage: str, record: logging.LogRecord) -> None:
        event = getattr(record, "leap_event", "")
        if not self.live:
            if event == "end":
                seconds = getattr(record, "leap_seconds", None)
                took = f" ({seconds:.1f} s of compute)" if seconds else ""
                say(f"  {stage}: {getattr(record, 'leap_state', '')}{took}")
            return
        if event == "start" and stage not in self.bars:
            self.bars[stage] = self.progress.add_task(
                stage, total=1, completed=0, state="running", unit=""
            )
        elif event == "end":
            state = getattr(record, "leap_state", "")
            if stage not in self.bars:
                self.bars[stage] = self.progress.add_task(stage, total=1, state=state, unit="")
            total = self.progress.tasks[self._index(stage)].total or 1
            self.progress.update(self.bars[stage], total=total, completed=total, state=state)

    def _index(self, stage: str) -> int:
        return [t.id for t in self.progress.tasks].index(self.bars[stage])

    def _advance(self, stage: str, step: int, total: int) -> None:
        if not self.live or stage not in self.bars:
            return
        self.progress.update(
            self.bars[stage], total=total, completed=min(step, total), unit="steps"
        )


# ---------------------------------------------------------------------------------------------- #
# Arguments shared by the subcommands
# ---------------------------------------------------------------------------------------------- #
