"""Keeping secrets out of what the pipeline writes: exception texts, flow-run parameters, logs.

Secrets are the values of secret-looking config options (``wandb_api_key``, ``leap_api_key``, any
``*_key`` / ``*token*`` / password field), ``WANDB_API_KEY`` and credentials inside URIs. Every task
and flow body runs under :func:`scrubbed_errors`, which rewrites an escaping exception (and its
causes) with the secrets replaced by ``***`` before Prefect records or logs it.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from pydantic import BaseModel, SecretStr

from leapcore.secrets import is_secret_name, redact, redact_uri

F = TypeVar("F", bound=Callable[..., Any])

_ENV_SECRETS = ("WANDB_API_KEY", "LEAP_API_KEY")
_CREDENTIALS = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://(?P<cred>[^/@\s]+)@")
_QUERY_VALUE = re.compile(
    r"[?&][^=&\s]*(?:key|token|password|secret|signature|credential)[^=&\s]*=(?P<val>[^&\s]+)",
    re.IGNORECASE,
)


def uri_credentials(text: str) -> list[str]:
    """The credentials inside URIs in ``text``: ``user:password`` parts and secret query values."""
    found = []
    for match in _CREDENTIALS.finditer(text):
        cred = match["cred"]
        found.append(cred)
        if ":" in cred:
            found.append(cred.split(":", 1)[1])
    found.extend(m["val"] for m in _QUERY_VALUE.finditer(text))
    return found


class RedactedError(RuntimeError):
    """An error whose own text could not be cleaned of a secret; the cleaned text is kept."""


def secret_values(*objects: Any) -> list[str]:
    """Every secret value found in ``objects`` (configs, dicts, locators) and the environment."""
    found: list[str] = [os.environ.get(name, "") for name in _ENV_SECRETS]
    for obj in objects:
        _collect(obj, found, depth=0)
    return sorted({s for s in found if s and len(s) >= 4}, key=len, reverse=True)


def _collect(obj: Any, found: list[str], depth: int, name: str = "") -> None:
    if depth > 6 or obj is None:
        return
    if isinstance(obj, SecretStr):
        found.append(obj.get_secret_value())
    elif isinstance(obj, str):
        if name and is_secret_name(name):
            found.append(obj)
        else:
            found.extend(uri_credentials(obj))
    elif isinstance(obj, BaseModel):
        for field in type(obj).model_fields:
            _collect(getattr(obj, field, None), found, depth + 1, field)
        # Values kept aside from the fields (EngineConfig's publisher keys: the W&B API key).
        _collect(getattr(obj, "__pydantic_private__", None), found, depth + 1)
    elif isinstance(obj, dict):
        for key, value in obj.items():
            _collect(value, found, depth + 1, str(key))
    elif isinstance(obj, (list, tuple, set)):
        for value in obj:
            _collect(value, found, depth + 1, name)
    elif hasattr(obj, "secret_values"):
        found.extend(obj.secret_values())


def clean_text(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret value and URI credential replaced by ``***``."""
    return redact(text, list(secrets))


def clean_jsonable(value: Any, secrets: Iterable[str] = ()) -> Any:
    """A JSON-able value with secret-named keys dropped and secrets removed from strings."""
    secrets = list(secrets)
    if isinstance(value, dict):
        return {
            k: clean_jsonable(v, secrets) for k, v in value.items() if not is_secret_name(str(k))
        }
    if isinstance(value, (list, tuple)):
        return [clean_jsonable(v, secrets) for v in value]
    if isinstance(value, str):
        return clean_text(value, secrets)
    return value


def scrub_exception(exc: BaseException, secrets: Iterable[str]) -> BaseException:
    """Clean ``exc`` and its causes in place; returns a replacement if its text stays dirty."""
    secrets = list(secrets)
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        current.args = tuple(
            clean_text(a, secrets) if isinstance(a, str) else a for a in current.args
        )
        for attr in ("filename", "filename2", "strerror", "msg", "message", "detail"):
            value = getattr(current, attr, None)
            if isinstance(value, str):
                with contextlib.suppress(AttributeError, TypeError):
                    setattr(current, attr, clean_text(value, secrets))
        current = current.__cause__ or current.__context__
    text = _safe_str(exc)
    if clean_text(text, secrets) != text:
        replacement = RedactedError(f"{type(exc).__name__}: {clean_text(text, secrets)}")
        replacement.__cause__ = None
        replacement.__suppress_context__ = True
        return replacement
    return exc


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return type(exc).__name__


@contextlib.contextmanager
def scrubbed_errors(secrets: Iterable[str]) -> Iterator[None]:
    """Re-raise any exception with ``secrets`` removed from its text (and from its causes)."""
    secrets = list(secrets)
    try:
        yield
    except BaseException as exc:
        if not secrets and redact_uri(_safe_str(exc)) == _safe_str(exc):
            raise
        clean = scrub_exception(exc, secrets)
        if clean is exc:
            raise
        raise clean from None


def redacting(fn: F) -> F:
    """Decorator: run ``fn`` under :func:`scrubbed_errors` with the secrets found in its arguments."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind_partial(*args, **kwargs)
        with scrubbed_errors(secret_values(*bound.arguments.values())):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
