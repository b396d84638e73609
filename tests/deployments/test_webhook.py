"""The MLflow webhook endpoint: MLflow's own signature scheme, rejection and logging, real deliveries."""

from __future__ import annotations

import json
import logging
import time
import uuid

import pytest
from deploy_support import WEBHOOK_SECRET, free_port, prefect_events, wait_for
from pydantic import SecretStr

from deployments.webhook import (
    DELIVERY_ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    SignatureError,
    create_app,
    run_in_thread,
    sign,
    verify_signature,
)
from flows.hooks import REQUESTED_TAG

SECRET = SecretStr(WEBHOOK_SECRET)


def _delivery(name: str, version: str, entity: str = "model_version", **data) -> bytes:
    body = {
        "entity": entity,
        "action": "created",
        "timestamp": "2026-01-01T00:00:00+00:00",
        "data": {"name": name, "version": version, **data},
    }
    return json.dumps(body).encode()


def _headers(body: bytes, secret: str = WEBHOOK_SECRET, delivery_id: str | None = None, ts=None):
    delivery_id = delivery_id or str(uuid.uuid4())
    ts = str(int(time.time())) if ts is None else str(ts)
    return {
        "Content-Type": "application/json",
        DELIVERY_ID_HEADER: delivery_id,
        TIMESTAMP_HEADER: ts,
        SIGNATURE_HEADER: sign(secret, delivery_id, ts, body),
    }


# ---------------------------------------------------------------------------------------------- #
# Signatures (no servers)
# ---------------------------------------------------------------------------------------------- #
def test_signature_matches_mlflows_own_signing_function():
    from mlflow.webhooks.delivery import _generate_hmac_signature

    payload = json.dumps({"entity": "model_version", "data": {"name": "m", "version": "1"}})
    ours = sign(SECRET, "d-1", "1700000000", payload.encode())
    assert ours == _generate_hmac_signature(WEBHOOK_SECRET, "d-1", "1700000000", payload)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"signature": "v1,AAAA"}, "signature does not match"),
        ({"secret": "another-secret"}, "signature does not match"),
        ({"body": b'{"tampered": true}'}, "signature does not match"),
        ({"timestamp": "1000"}, "s off"),
        ({"timestamp": "yesterday"}, "not a Unix time"),
        ({"signature": None}, "missing signature"),
        ({"delivery_id": ""}, "missing signature"),
    ],
)
def test_bad_deliveries_are_rejected_with_a_reason(change, reason):
    body, delivery_id, ts = b'{"a": 1}', "d-2", str(int(time.time()))
    signature = sign(change.get("secret", WEBHOOK_SECRET), delivery_id, ts, body)
    kwargs = {
        "delivery_id": change.get("delivery_id", delivery_id),
        "timestamp": change.get("timestamp", ts),
        "signature": change.get("signature", signature),
        "body": change.get("body", body),
    }
    with pytest.raises(SignatureError, match=reason) as info:
        verify_signature(SECRET, **kwargs)
    assert WEBHOOK_SECRET not in str(info.value)


def test_a_good_delivery_verifies_also_among_rotated_signatures():
    body, ts = b'{"a": 1}', str(int(time.time()))
    good = sign(SECRET, "d-3", ts, body)
    verify_signature(SECRET, "d-3", ts, good, body)
    verify_signature(SECRET, "d-3", ts, f"v1,b2xk {good}", body)


def test_empty_secret_is_refused():
    with pytest.raises(ValueError, match="LEAP_WEBHOOK_SECRET"):
        create_app(SecretStr(""))


# ---------------------------------------------------------------------------------------------- #
# The endpoint with the real request_audit, MLflow and Prefect servers
# ---------------------------------------------------------------------------------------------- #
@pytest.mark.services
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_signed_delivery_requests_the_audit_and_a_bad_one_is_rejected_and_logged(
    register_version, model_name, caplog
):
    from fastapi.testclient import TestClient
    from mlflow import MlflowClient

    good_v = register_version(model_name)
    bad_v = register_version(model_name)
    app = create_app(SECRET)
    caplog.set_level(logging.INFO)
    with TestClient(app) as http:
        bad_body = _delivery(model_name, bad_v)
        rejected = http.post("/mlflow", content=bad_body, headers=_headers(bad_body, "wrong"))
        assert rejected.status_code == 401
        assert rejected.json() == {"detail": "invalid signature"}

        body = _delivery(model_name, good_v)
        headers = _headers(body)
        accepted = http.post("/mlflow", content=body, headers=headers)
        assert accepted.status_code == 200, accepted.text
        assert accepted.json()["status"] == "requested"
        replay = http.post("/mlflow", content=body, headers=headers)
        assert replay.json() == {"status": "duplicate delivery"}

        alias = _delivery(model_name, good_v, entity="model_version_alias", alias="champion")
        moved = http.post("/mlflow", content=alias, headers=_headers(alias))
        assert moved.json()["status"] == "already requested"

        missing = _delivery(model_name, "999")
        assert http.post("/mlflow", content=missing, headers=_headers(missing)).status_code == 404

        other = json.dumps({"entity": "registered_model", "action": "created", "data": {}}).encode()
        assert http.post("/mlflow", content=other, headers=_headers(other)).json() == {
            "status": "ignored"
        }

    client = MlflowClient()
    assert REQUESTED_TAG in client.get_model_version(model_name, good_v).tags
    assert REQUESTED_TAG not in client.get_model_version(model_name, bad_v).tags
    assert len(prefect_events(f"leap.model.models:/{model_name}/{bad_v}")) == 0
    wait_for(lambda: prefect_events(f"leap.model.models:/{model_name}/{good_v}"), 30, what="event")
    warnings = [
        r for r in caplog.records if r.levelno == logging.WARNING and "rejected" in r.message
    ]
    assert len(warnings) == 1 and "signature does not match" in warnings[0].message
    assert all(WEBHOOK_SECRET not in r.getMessage() for r in caplog.records)
    assert app.state.deliveries == {"accepted": 5, "rejected": 1, "requested": 1}


@pytest.mark.services
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_mlflow_server_deliveries_reach_the_endpoint(register_version, model_name, caplog):
    """The real ``mlflow server`` signs and sends; a webhook with the wrong secret is refused."""
    from mlflow import MlflowClient

    caplog.set_level(logging.INFO)
    port = free_port()
    app = create_app(SECRET)
    server, thread = run_in_thread(app, "127.0.0.1", port)
    client = MlflowClient()
    hooks = []
    try:
        url = f"http://127.0.0.1:{port}/mlflow"
        events = ["model_version.created", "model_version_alias.created"]
        hooks.append(
            client.create_webhook(f"{model_name}-good", url, events, secret=WEBHOOK_SECRET)
        )
        hooks.append(
            client.create_webhook(f"{model_name}-bad", url, events[:1], secret="not-the-secret")
        )
        time.sleep(1.5)  # the server caches webhook lists for MLFLOW_WEBHOOK_CACHE_TTL=1 s
        version = register_version(model_name)

        def tagged():
            return REQUESTED_TAG in client.get_model_version(model_name, version).tags

        wait_for(tagged, 60, what="the webhook to claim the new version")
        wait_for(lambda: app.state.deliveries["rejected"] >= 1, 30, what="the bad delivery")
        client.set_registered_model_alias(model_name, "champion", version)
        wait_for(lambda: app.state.deliveries["accepted"] >= 2, 30, what="the alias delivery")
        time.sleep(1.0)
        assert app.state.deliveries["requested"] == 1  # the alias moved onto an audited version
        assert len(prefect_events(f"leap.model.models:/{model_name}/{version}")) <= 1
        assert all(WEBHOOK_SECRET not in r.getMessage() for r in caplog.records)
        assert all("not-the-secret" not in r.getMessage() for r in caplog.records)
    finally:
        for hook in hooks:
            client.delete_webhook(hook.webhook_id)
        server.should_exit = True
        thread.join(10)


# ---------------------------------------------------------------------------------------------- #
# Hostile bodies (no servers: FastAPI's test client; the audit request must never be reached)
# ---------------------------------------------------------------------------------------------- #
def _never_called(model_uri, requested_by):
    raise AssertionError(f"an audit was requested for {model_uri}")


def test_oversized_bodies_get_413_without_being_read_whole():
    from fastapi.testclient import TestClient

    from deployments.webhook import MAX_BODY_BYTES

    app = create_app(SECRET, request=_never_called)
    sent: list[int] = []

    def stream():  # chunked, no Content-Length: the cap must hold while streaming
        for _ in range(64):
            sent.append(1)
            yield b"x" * (256 * 1024)

    with TestClient(app) as http:
        big = b"[" + b"0," * MAX_BODY_BYTES + b"0]"
        declared = http.post("/mlflow", content=big, headers=_headers(big))
        assert declared.status_code == 413
        streamed = http.post("/mlflow", content=stream(), headers=_headers(b""))
        assert streamed.status_code == 413
    assert app.state.deliveries["rejected"] == 2 and app.state.deliveries["accepted"] == 0


@pytest.mark.parametrize("body", [b"[1, 2, 3]", b'"a string"', b"42", b"null", b"{not json"])
def test_signed_bodies_that_are_not_a_delivery_object_get_400(body):
    from fastapi.testclient import TestClient

    app = create_app(SECRET, request=_never_called)
    with TestClient(app) as http:
        answer = http.post("/mlflow", content=body, headers=_headers(body))
    assert answer.status_code == 400, answer.text
    assert answer.json() == {"detail": "malformed delivery"}
