"""The registry watcher: on an interval schedule, request an audit of every unaudited model version.

Each poll lists READY versions in the MLflow registry without the ``leap.audit.requested`` tag and
calls :func:`flows.hooks.request_audit` for each (claim the version with the tag, emit
``leap.model-version.ready``); the ``audit_model`` deployment's trigger runs the audits. A second
poll finds the versions tagged and requests nothing. ``max_requests`` bounds one poll (a backlog is
worked off over several polls); ``models`` limits the watch to some registered model names.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task

from flows.hooks import iter_unaudited_versions, mlflow_client, request_audit


@task(name="find-unaudited-versions", retries=2, retry_delay_seconds=5)
def find_unaudited_versions(
    models: list[str] | None, limit: int, tracking_uri: str | None = None
) -> list[str]:
    client = mlflow_client(tracking_uri)
    return [
        f"models:/{mv.name}/{mv.version}" for mv in iter_unaudited_versions(client, models, limit)
    ]


@task(name="request-audit")
def request_version_audit(model_uri: str, tracking_uri: str | None = None) -> bool:
    return request_audit(
        model_uri, requested_by="registry-watch", tracking_uri=tracking_uri
    ).emitted


@flow(name="leap-registry-watch", log_prints=False)
def watch_registry(
    models: list[str] | None = None, max_requests: int = 20, tracking_uri: str | None = None
) -> list[str]:
    """Request audits for model versions not yet audited; return the URIs requested in this poll.

    Args:
        models: registered model names to watch; None watches the whole registry.
        max_requests: most audits requested by one poll.
        tracking_uri: MLflow tracking URI; default ``MLFLOW_TRACKING_URI`` of the process.
    """
    logger = get_run_logger()
    candidates = find_unaudited_versions(models, max_requests, tracking_uri)
    requested = [uri for uri in candidates if request_version_audit(uri, tracking_uri)]
    logger.info("%d version(s) unaudited, %d audit(s) requested", len(candidates), len(requested))
    return requested
