"""Asking for an audit: one function for training runs, the registry watcher and the webhook.

``request_audit(model_uri)`` emits the Prefect event ``leap.model-version.ready`` with the model URI in
its payload; the trigger of the ``audit_model`` deployment (``deployments/prefect.yaml``) starts an
audit of that URI. A training script calls it at its end::

    from flows import request_audit
    request_audit("models:/my-classifier/7")   # or models:/name@alias, runs:/<id>/model, a file

Exactly once per model version: a registry URI is first pinned to its version (an alias resolves to
the version it points to now) and the version is *claimed* by setting the tag
``leap.audit.requested``; a version that already carries the tag is not requested again, so the
watcher's next poll, an alias moving onto the version or a second webhook delivery start nothing.
Two requesters that race past the tag check (the webhook and a poll in the same second) send events
with the same id, derived from the pinned URI, and the Prefect server evaluates an event id only once
(it remembers ids for 30 minutes). ``force=True`` re-audits on purpose: a new id, the tag rewritten.
``runs:/`` URIs are claimed with a run tag; other URIs (files, zoo names) cannot be claimed and are
requested every time.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

log = logging.getLogger(__name__)

AUDIT_REQUESTED_EVENT = "leap.model-version.ready"
REQUESTED_TAG = "leap.audit.requested"
RESOURCE_PREFIX = "leap.model."
# Event ids are uuid5(namespace, pinned URI): the same version always yields the same event id.
_EVENT_NAMESPACE = uuid.UUID("6c1f4c52-5e0b-4d0c-9a57-1b0e8f3f7a11")

_MODELS_VERSION = re.compile(r"^models:/(?P<name>[^@]+)/(?P<version>\d+)$")
_MODELS_ALIAS = re.compile(r"^models:/(?P<name>[^@/]+)@(?P<alias>[\w.-]+)$")
_RUNS = re.compile(r"^runs:/(?P<run_id>[^/]+)/.+$")


class AuditRequestError(RuntimeError):
    """An audit could not be requested (no Prefect server, unreachable registry, ...)."""


class UnknownModelError(AuditRequestError):
    """The model version, alias or run does not exist (asking again will not help)."""


def _describe(err: Exception) -> str:
    from leapcore.secrets import redact_uri

    return redact_uri(f"{type(err).__name__}: {err}")[:300]


def _not_found(err: Exception) -> bool:
    return getattr(err, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"


@dataclass(frozen=True)
class AuditRequest:
    """What :func:`request_audit` did.

    Attributes:
        model_uri: the URI the audit runs on (registry URIs pinned to a version).
        requested_uri: the URI that was asked for.
        emitted: whether an event was sent (False when the version was already claimed).
        event_id: the id of the event sent (or of the claim that was found).
        detail: why, in words.
    """

    model_uri: str
    requested_uri: str
    emitted: bool
    event_id: str | None
    detail: str


# ---------------------------------------------------------------------------------------------- #
# Registry side (MLflow, imported lazily)
# ---------------------------------------------------------------------------------------------- #
def mlflow_client(tracking_uri: str | None = None) -> Any:
    """An ``MlflowClient`` for ``tracking_uri`` (default: ``MLFLOW_TRACKING_URI``)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def pin_model_uri(model_uri: str, client: Any) -> tuple[str, str, str | None]:
    """``(pinned_uri, name, version)``; an alias resolves to its current version.

    ``version`` is None for URIs outside the registry.
    """
    if m := _MODELS_VERSION.match(model_uri):
        return model_uri, m["name"], m["version"]
    if m := _MODELS_ALIAS.match(model_uri):
        try:
            mv = client.get_model_version_by_alias(m["name"], m["alias"])
        except Exception as err:
            _explain_missing_alias(client, model_uri, m["name"], m["alias"])
            raise AuditRequestError(f"cannot resolve {model_uri!r} ({_describe(err)}).") from None
        return f"models:/{mv.name}/{mv.version}", mv.name, str(mv.version)
    if model_uri.startswith("models:/"):
        raise AuditRequestError(
            f"model URI {model_uri!r} is not models:/<name>/<version> or models:/<name>@<alias>."
        )
    return model_uri, "", None


def _explain_missing_alias(client: Any, model_uri: str, name: str, alias: str) -> None:
    """Raise :class:`UnknownModelError` if the model or its alias does not exist."""
    try:
        aliases = dict(getattr(client.get_registered_model(name), "aliases", {}) or {})
    except Exception as err:
        if _not_found(err):
            raise UnknownModelError(
                f"cannot resolve {model_uri!r}: there is no registered model {name!r}."
            ) from None
        return
    if alias not in aliases:
        known = ", ".join(sorted(aliases)) or "none"
        raise UnknownModelError(
            f"cannot resolve {model_uri!r}: no version of {name!r} has alias {alias!r} "
            f"(its aliases: {known})."
        )


def event_id_for(pinned_uri: str) -> uuid.UUID:
    return uuid.uuid5(_EVENT_NAMESPACE, pinned_uri)


def _claim_value(requested_by: str, event_id: uuid.UUID) -> str:
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return json.dumps({"at": now, "by": requested_by, "event": str(event_id)}, sort_keys=True)


class _Claim:
    """Set/read/undo the ``leap.audit.requested`` tag on a model version or a run."""

    def __init__(self, client: Any, pinned_uri: str, name: str, version: str | None):
        self.client, self.name, self.version = client, name, version
        run = _RUNS.match(pinned_uri)
        self.run_id = run["run_id"] if run and version is None else None

    @property
    def possible(self) -> bool:
        return self.version is not None or self.run_id is not None

    def read(self) -> str | None:
        try:
            if self.version is not None:
                tags = self.client.get_model_version(self.name, self.version).tags
            else:
                tags = self.client.get_run(self.run_id).data.tags
        except Exception as err:
            what = f"models:/{self.name}/{self.version}" if self.version else f"run {self.run_id}"
            if _not_found(err):
                raise UnknownModelError(f"{what} does not exist in the MLflow registry.") from None
            raise AuditRequestError(f"cannot read {what} ({_describe(err)}).") from None
        return (tags or {}).get(REQUESTED_TAG)

    def write(self, value: str) -> None:
        if self.version is not None:
            self.client.set_model_version_tag(self.name, self.version, REQUESTED_TAG, value)
        else:
            self.client.set_tag(self.run_id, REQUESTED_TAG, value)

    def undo(self) -> None:
        try:
            if self.version is not None:
                self.client.delete_model_version_tag(self.name, self.version, REQUESTED_TAG)
            else:
                self.client.delete_tag(self.run_id, REQUESTED_TAG)
        except Exception:
            log.exception("could not remove the %s tag after a failed request", REQUESTED_TAG)


def iter_unaudited_versions(
    client: Any, models: list[str] | None = None, limit: int = 20, page_size: int = 200
) -> Iterator[Any]:
    """READY model versions without the ``leap.audit.requested`` tag, oldest first, at most ``limit``.

    Args:
        models: registered model names to look at; None looks at every registered model.
        limit: most versions returned (the rest wait for the next poll).
    """
    filters = [None] if not models else [f"name = '{_quote(n)}'" for n in models]
    found = []
    for filter_string in filters:
        token = None
        for _ in range(1000):  # bounded paging: 200k versions per filter at most
            page = client.search_model_versions(
                filter_string=filter_string, max_results=page_size, page_token=token
            )
            for mv in page:
                if str(mv.status) in (
                    "READY",
                    "ModelVersionStatus.READY",
                ) and REQUESTED_TAG not in (mv.tags or {}):
                    found.append(mv)
            token = page.token
            if not token:
                break
    found.sort(key=lambda mv: (mv.creation_timestamp or 0, mv.name, int(mv.version)))
    yield from found[:limit]


def _quote(name: str) -> str:
    return name.replace("'", "\\'")


# ---------------------------------------------------------------------------------------------- #
# Prefect side
# ---------------------------------------------------------------------------------------------- #
def audit_event(
    pinned_uri: str,
    requested_uri: str,
    requested_by: str,
    event_id: uuid.UUID,
    name: str = "",
    version: str | None = None,
) -> Any:
    """The ``leap.model-version.ready`` event for one model, with the URI in its payload."""
    from prefect.context import FlowRunContext
    from prefect.events import Event

    resource = {
        "prefect.resource.id": f"{RESOURCE_PREFIX}{pinned_uri}",
        "prefect.resource.name": pinned_uri,
        "leap.model.uri": pinned_uri,
    }
    if version is not None:
        resource.update({"mlflow.model.name": name, "mlflow.model.version": version})
    related = []
    ctx = FlowRunContext.get()
    if ctx is not None and ctx.flow_run is not None:
        related.append(
            {
                "prefect.resource.id": f"prefect.flow-run.{ctx.flow_run.id}",
                "prefect.resource.role": "requested-by",
                "prefect.resource.name": ctx.flow_run.name,
            }
        )
    return Event(
        event=AUDIT_REQUESTED_EVENT,
        resource=resource,
        related=related,
        payload={
            "model_uri": pinned_uri,
            "requested_uri": requested_uri,
            "requested_by": requested_by,
        },
        id=event_id,
    )


def send_event(event: Any) -> None:
    """POST the event to the Prefect server named by ``PREFECT_API_URL`` and wait for its answer.

    Unlike ``emit_event`` (a background queue that drops errors), this raises when the server did
    not take the event, so a claim is never left standing without its request.
    """
    from prefect.client.orchestration import get_client
    from prefect.settings import get_current_settings

    if not get_current_settings().api.url:
        raise AuditRequestError(
            "PREFECT_API_URL is not set: start a server (prefect server start) and export "
            "PREFECT_API_URL=http://127.0.0.1:4200/api so that the audit deployment sees the request."
        )
    try:
        with get_client(sync_client=True) as client:
            response = client.request("POST", "/events", json=[event.model_dump(mode="json")])
            response.raise_for_status()
    except Exception as err:
        raise AuditRequestError(
            f"the Prefect server did not accept the audit request event ({_describe(err)})."
        ) from None


def request_audit(
    model_uri: str,
    *,
    requested_by: str = "training-run",
    force: bool = False,
    tracking_uri: str | None = None,
    client: Any = None,
) -> AuditRequest:
    """Ask the ``audit_model`` deployment to audit ``model_uri``; once per model version.

    Args:
        model_uri: ``models:/name/version``, ``models:/name@alias`` (pinned to its current version),
            ``runs:/<run_id>/<path>``, or any URI ``audit_model`` loads.
        requested_by: who asks (``training-run``, ``registry-watch``, ``webhook``); kept in the tag
            and the event payload.
        force: request again even if the version was already claimed (a new event id).
        tracking_uri: MLflow tracking URI; default ``MLFLOW_TRACKING_URI``.
        client: an ``MlflowClient`` to reuse.

    Raises:
        AuditRequestError: the URI does not resolve or the Prefect server is unreachable (the
            claim is then removed again, so a later request retries).
    """
    if not isinstance(model_uri, str) or not model_uri.strip():
        raise AuditRequestError("model_uri must be a non-empty string such as 'models:/name/3'.")
    model_uri = model_uri.strip()
    registry = model_uri.startswith(("models:/", "runs:/"))
    if registry and client is None:
        client = mlflow_client(tracking_uri)
    pinned, name, version = pin_model_uri(model_uri, client) if registry else (model_uri, "", None)
    claim = _Claim(client, pinned, name, version) if registry else None
    if claim is None or not claim.possible:
        event_id = uuid.uuid4()
        send_event(audit_event(pinned, model_uri, requested_by, event_id))
        log.info("audit requested for %s by %s (unclaimed URI)", pinned, requested_by)
        return AuditRequest(pinned, model_uri, True, str(event_id), "requested (no claim possible)")

    existing = claim.read()
    if existing is not None and not force:
        previous = _event_of(existing)
        log.info("audit of %s already requested (%s); nothing sent", pinned, existing)
        return AuditRequest(pinned, model_uri, False, previous, "already requested")

    event_id = uuid.uuid4() if force else event_id_for(pinned)
    value = _claim_value(requested_by, event_id)
    claim.write(value)
    if claim.read() != value:  # someone else claimed it between our read and write
        log.info("audit of %s was claimed concurrently; nothing sent", pinned)
        return AuditRequest(
            pinned, model_uri, False, _event_of(claim.read()), "claimed concurrently"
        )
    try:
        send_event(audit_event(pinned, model_uri, requested_by, event_id, name, version))
    except Exception:
        claim.undo()
        raise
    log.info("audit requested for %s by %s (event %s)", pinned, requested_by, event_id)
    return AuditRequest(pinned, model_uri, True, str(event_id), "requested")


def _event_of(tag_value: str | None) -> str | None:
    try:
        return json.loads(tag_value or "")["event"]
    except (ValueError, KeyError, TypeError):
        return None
