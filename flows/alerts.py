"""``drift_alert``: pass a ``leapcore.audit.drift`` event on to a team's own notification block.

The audit's ``diff_audits`` stage emits ``leapcore.audit.drift`` (resource ``leapcore.model.<name>``)
when a pair of classes became entangled or disentangled beyond the threshold, or a spurious-scan
verdict got worse, since the last audited version. The optional ``drift-alert`` deployment of
``deployments/prefect.yaml`` runs this flow for every such event: it logs the summary, leaves it as a
Markdown artifact on the flow run and, with ``notify_block`` set, sends it through that Prefect
notification block (Slack, Teams, e-mail, a custom webhook: any block with ``notify``)::

    prefect block register -m prefect.blocks.notifications
    # create e.g. a "slack-webhook" block named "ml-team" in the UI, then set the deployment's
    # parameter notify_block: slack-webhook/ml-team (prefect.yaml or the UI)
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

DRIFT_EVENT = "leapcore.audit.drift"  # tasks.diff.DRIFT_EVENT (not imported: flows stay light)


def load_notifier(notify_block: str) -> Any:
    """The notification block ``type-slug/name`` (e.g. ``slack-webhook/ml-team``), loaded."""
    from prefect.blocks.core import Block

    block = Block.load(notify_block)
    if not hasattr(block, "notify"):
        raise ValueError(
            f"block {notify_block!r} is a {type(block).__name__}, not a notification block."
        )
    return block


@flow(name="drift-alert", description="Pass an audit's drift event on to a notification block.")
def drift_alert(
    summary: str,
    model: str = "",
    version: str = "",
    previous_version: str = "",
    notify_block: str | None = None,
) -> str:
    """Log the drift, leave it as a Markdown artifact and send it through ``notify_block``.

    Args:
        summary: the event's one-line summary (``payload.summary``).
        model: the registered model's name.
        version: the audited version.
        previous_version: the version it was compared with.
        notify_block: a notification block as ``type-slug/name``; None only logs.

    Returns:
        The message sent (or logged).
    """
    from prefect.artifacts import create_markdown_artifact

    subject = f"leapcore: {model} v{version} drifted from v{previous_version}"
    logger = get_run_logger()
    logger.warning("%s: %s", subject, summary)
    create_markdown_artifact(
        f"**{subject}**\n\n{summary}", key="leapcore-drift", description="leapcore drift alert"
    )
    if notify_block:
        load_notifier(notify_block).notify(summary, subject=subject)
        logger.info("sent through %s", notify_block)
    return summary
