"""Keeping secrets out of everything leapcore writes: logs, params, tables, reports, messages."""

from __future__ import annotations

import re
from typing import Any

_URI_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<cred>[^/@\s]+)@")
_QUERY_SECRET = re.compile(
    r"(?P<key>[?&](?:[^=&\s]*(?:key|token|password|secret|signature|credential)[^=&\s]*))=(?P<val>[^&\s]+)",
    re.IGNORECASE,
)


def redact_uri(text: str) -> str:
    """Replace ``user:password@`` inside URIs and secret query values with ``***``."""
    text = _URI_CREDENTIALS.sub(lambda m: f"{m['scheme']}***@", text)
    return _QUERY_SECRET.sub(lambda m: f"{m['key']}=***", text)


def redact(text: str, secrets: list[str]) -> str:
    """Remove every literal secret value and URI credential from ``text``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return redact_uri(text)


_SECRET_HINTS = ("key", "token", "password", "secret", "credential")


def is_secret_name(name: str) -> bool:
    """Whether an option name looks like it holds a secret (``*_key``, ``*token*``, passwords)."""
    lowered = name.lower()
    return any(h in lowered for h in _SECRET_HINTS)


def sanitise(values: dict[str, Any]) -> dict[str, Any]:
    """Drop every secret-looking field (recursively) and credentials inside URIs."""
    clean: dict[str, Any] = {}
    for name, value in values.items():
        if is_secret_name(name):
            continue
        if isinstance(value, dict):
            value = sanitise(value)
        elif isinstance(value, str):
            value = redact_uri(value)
        clean[name] = value
    return clean
