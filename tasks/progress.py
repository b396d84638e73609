"""Engine progress in the Prefect UI: a task's step loop as a progress artifact.

:func:`task_progress` gives a :class:`~leapcore.progress.ProgressEvent` callback for one engine call
inside a task; the first event creates a progress artifact (``progress-<stage>-<chunk>``), later
ones update its percentage. Outside a task run the events are dropped; if the API refuses one, the
engine's :func:`~leapcore.progress.report` logs the failing callback and carries on.
"""

from __future__ import annotations

from leapcore.progress import ProgressCallback, ProgressEvent


def task_progress(stage: str, chunk: int = 0) -> ProgressCallback:
    """A callback that shows ``stage``'s steps (of class chunk ``chunk``) as a progress artifact."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact
    from prefect.context import TaskRunContext

    if TaskRunContext.get() is None:
        return _ignore
    artifact: list = []

    def update(event: ProgressEvent) -> None:
        percent = 100.0 * min(event.step, event.total) / max(event.total, 1)
        text = f"{stage}: step {event.step} of {event.total}"
        if not artifact:
            key = f"progress-{stage.replace('_', '-')}-{chunk}"
            artifact.append(create_progress_artifact(percent, key=key, description=text))
        else:
            update_progress_artifact(artifact[0], percent, description=text)

    return update


def _ignore(event: ProgressEvent) -> None:
    """Outside a task run there is no artifact to update."""
