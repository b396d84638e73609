"""The fast path: an endpoint for MLflow registry webhooks that requests an audit at once.

MLflow (3.3+, ``mlflow server`` only) POSTs a JSON delivery for ``model_version.created`` and
``model_version_alias.created`` and signs it like Standard Webhooks: the header
``X-MLflow-Signature: v1,<base64 HMAC-SHA256>`` over ``"<delivery id>.<timestamp>.<raw body>"``
with the webhook's secret, the id and the Unix timestamp in ``X-MLflow-Delivery-Id`` and
``X-MLflow-Timestamp`` (``mlflow/webhooks/delivery.py``). This endpoint checks the signature in
constant time, refuses timestamps older than ``tolerance_s`` (replays) and delivery ids it has
already handled, then calls :func:`flows.hooks.request_audit` for the version, which claims it and
emits the same event as the registry watcher. A bad delivery gets 401 and a warning in the log;
neither the secret nor the signature is ever logged.

Register it with MLflow (see deployments/README.md)::

    MlflowClient().create_webhook(name="leap-audit", url="https://audits.example.com/mlflow",
        events=["model_version.created", "model_version_alias.created"], secret=SECRET)

Run it: ``python -m deployments.webhook --port 8790`` with ``LEAP_WEBHOOK_SECRET``,
``MLFLOW_TRACKING_URI`` and ``PREFECT_API_URL`` set, or ``leap serve --webhook-port 8790``.
"""

from __future__ import annotations

import argparse
import base64
import contextvars
import hashlib
import hmac
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import SecretStr
from starlette.concurrency import run_in_threadpool

from flows.hooks import UnknownModelError

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-MLflow-Signature"
TIMESTAMP_HEADER = "X-MLflow-Timestamp"
DELIVERY_ID_HEADER = "X-MLflow-Delivery-Id"
SECRET_ENV = "LEAP_WEBHOOK_SECRET"
DEFAULT_PATH = "/mlflow"
MAX_BODY_BYTES = 1 << 20
AUDITED_EVENTS = {
    ("model_version", "created"),
    ("model_version_alias", "created"),
}


class SignatureError(ValueError):
    """A delivery whose signature, timestamp or headers do not check out (the reason, no secret)."""


def sign(secret: SecretStr | str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """The ``X-MLflow-Signature`` value MLflow sends for this delivery: ``v1,<base64>``."""
    key = secret.get_secret_value() if isinstance(secret, SecretStr) else secret
    content = f"{delivery_id}.{timestamp}.".encode() + body
    digest = hmac.new(key.encode("utf-8"), content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def verify_signature(
    secret: SecretStr,
    delivery_id: str | None,
    timestamp: str | None,
    signature: str | None,
    body: bytes,
    tolerance_s: float = 300.0,
    now: float | None = None,
) -> None:
    """Raise :class:`SignatureError` unless ``signature`` is MLflow's signature of this delivery.

    Several space-separated signatures are accepted (Standard Webhooks' key rotation).
    """
    if not delivery_id or not timestamp or not signature:
        raise SignatureError("missing signature, timestamp or delivery id header")
    try:
        sent = int(timestamp)
    except ValueError:
        raise SignatureError("timestamp header is not a Unix time") from None
    now = time.time() if now is None else now
    if abs(now - sent) > tolerance_s:
        raise SignatureError(f"timestamp is {now - sent:.0f} s off (tolerance {tolerance_s:.0f} s)")
    expected = sign(secret, delivery_id, timestamp, body).encode()
    candidates = [s for s in signature.split(" ") if s.startswith("v1,")]
    if not any(hmac.compare_digest(expected, c.encode()) for c in candidates):
        raise SignatureError("signature does not match")


class _SeenDeliveries:
    """Delivery ids handled within the tolerance window (MLflow retries reuse the id)."""

    def __init__(self, ttl_s: float, max_size: int = 10_000):
        self.ttl_s, self.max_size = ttl_s, max_size
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, delivery_id: str) -> bool:
        """True if the id is new (and remember it), False if it was seen recently."""
        now = time.monotonic()
        with self._lock:
            while self._seen and (
                len(self._seen) >= self.max_size
                or next(iter(self._seen.values())) < now - self.ttl_s
            ):
                self._seen.popitem(last=False)
            if delivery_id in self._seen:
                return False
            self._seen[delivery_id] = now
            return True

    def forget(self, delivery_id: str) -> None:
        with self._lock:
            self._seen.pop(delivery_id, None)


def model_uri_of(delivery: dict[str, Any]) -> tuple[str, str] | None:
    """``(models:/name/version, reason)`` for the events that ask for an audit, else None."""
    key = (delivery.get("entity"), delivery.get("action"))
    data = delivery.get("data")
    if key not in AUDITED_EVENTS or not isinstance(data, dict):
        return None
    name, version = data.get("name"), data.get("version")
    if not isinstance(name, str) or not name or not str(version or "").isdigit():
        raise ValueError("delivery data lacks a model name and numeric version")
    reason = "registered" if key[0] == "model_version" else f"alias {data.get('alias')}"
    return f"models:/{name}/{version}", reason


def create_app(
    secret: SecretStr,
    request: Callable[..., Any] | None = None,
    path: str = DEFAULT_PATH,
    tolerance_s: float = 300.0,
) -> FastAPI:
    """The FastAPI app: ``POST {path}`` takes MLflow deliveries, ``GET /health`` answers ok.

    Args:
        secret: the webhook's secret, as given to ``MlflowClient().create_webhook``.
        request: called as ``request(model_uri, requested_by="webhook")``; default
            :func:`flows.hooks.request_audit`.
        tolerance_s: oldest accepted delivery timestamp, in seconds.
    """
    if not isinstance(secret, SecretStr) or not secret.get_secret_value():
        raise ValueError(f"the webhook secret is empty; set {SECRET_ENV}.")
    if request is None:
        from flows.hooks import request_audit as request
    seen = _SeenDeliveries(ttl_s=2 * tolerance_s)
    app = FastAPI(title="leapcore MLflow webhook", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.deliveries = {"accepted": 0, "rejected": 0, "requested": 0}

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post(path)
    async def mlflow_delivery(req: Request) -> JSONResponse:
        delivery_id = req.headers.get(DELIVERY_ID_HEADER)
        client = req.client.host if req.client else "?"
        body, refusal = await _read_capped(req)
        if refusal is not None:
            app.state.deliveries["rejected"] += 1
            log.warning(
                "rejected MLflow webhook delivery %r from %s: %s",
                (delivery_id or "")[:64],
                client,
                refusal.body.decode(),
            )
            return refusal
        try:
            verify_signature(
                secret,
                delivery_id,
                req.headers.get(TIMESTAMP_HEADER),
                req.headers.get(SIGNATURE_HEADER),
                body,
                tolerance_s,
            )
        except SignatureError as err:
            app.state.deliveries["rejected"] += 1
            log.warning(
                "rejected MLflow webhook delivery %r from %s: %s",
                (delivery_id or "")[:64],
                client,
                err,
            )
            return JSONResponse({"detail": "invalid signature"}, status_code=401)
        app.state.deliveries["accepted"] += 1
        try:
            delivery = json.loads(body)
            if not isinstance(delivery, dict):
                raise ValueError(f"the body is a JSON {type(delivery).__name__}, not an object")
            target = model_uri_of(delivery)
        except ValueError as err:
            log.warning("ignored malformed MLflow delivery %s: %s", delivery_id, err)
            return JSONResponse({"detail": "malformed delivery"}, status_code=400)
        if target is None:
            return JSONResponse({"status": "ignored"}, status_code=200)
        if not seen.add(delivery_id):
            return JSONResponse({"status": "duplicate delivery"}, status_code=200)
        model_uri, reason = target
        try:
            result = await run_in_threadpool(request, model_uri, requested_by="webhook")
        except UnknownModelError as err:
            log.warning("MLflow delivery %s names no model version: %s", delivery_id, err)
            return JSONResponse({"detail": "unknown model version"}, status_code=404)
        except Exception as err:
            seen.forget(delivery_id)  # let MLflow's retry try again
            log.error("audit request for %s (%s) failed: %s", model_uri, reason, err)
            return JSONResponse({"detail": "audit request failed"}, status_code=503)
        emitted = bool(getattr(result, "emitted", True))
        app.state.deliveries["requested"] += int(emitted)
        log.info(
            "MLflow delivery %s (%s): %s %s",
            delivery_id,
            reason,
            model_uri,
            getattr(result, "detail", "requested"),
        )
        return JSONResponse(
            {"status": "requested" if emitted else "already requested", "model_uri": model_uri}
        )

    return app


async def _read_capped(req: Request) -> tuple[bytes, JSONResponse | None]:
    """The body, read in chunks and never more than ``MAX_BODY_BYTES`` (a declared
    ``Content-Length`` over it is refused before reading): ``(body, None)`` or ``(b"", response)``."""
    declared = req.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            return b"", JSONResponse({"detail": "bad Content-Length"}, status_code=400)
        if int(declared) > MAX_BODY_BYTES:
            return b"", _too_large()
    chunks, size = [], 0
    async for chunk in req.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return b"", _too_large()
        chunks.append(chunk)
    return b"".join(chunks), None


def _too_large() -> JSONResponse:
    return JSONResponse({"detail": f"body over {MAX_BODY_BYTES} bytes"}, status_code=413)


def run_in_thread(app: Any, host: str, port: int) -> tuple[Any, threading.Thread]:
    """Start uvicorn for ``app`` in a daemon thread; ``server.should_exit = True`` stops it."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    # The thread runs in a copy of this context, so Prefect settings set here (a profile,
    # temporary_settings) apply to the requests it serves.
    context = contextvars.copy_context()
    thread = threading.Thread(
        target=context.run, args=(server.run,), name="leap-webhook", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    if not server.started:
        server.should_exit = True
        raise RuntimeError(f"the webhook endpoint did not start on {host}:{port}")
    return server, thread


def secret_from_env() -> SecretStr:
    value = os.environ.get(SECRET_ENV, "")
    if not value:
        raise SystemExit(
            f"{SECRET_ENV} is not set: export the secret given to MlflowClient().create_webhook."
        )
    return SecretStr(value)


def main(argv: list[str] | None = None) -> int:
    """``python -m deployments.webhook [--host 127.0.0.1] [--port 8790] [--path /mlflow]``."""
    import uvicorn

    parser = argparse.ArgumentParser(prog="leap webhook", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    parser.add_argument("--port", type=int, default=8790)
    parser.add_argument("--path", default=DEFAULT_PATH)
    parser.add_argument("--tolerance", type=float, default=300.0, help="seconds")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app = create_app(secret_from_env(), path=args.path, tolerance_s=args.tolerance)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
