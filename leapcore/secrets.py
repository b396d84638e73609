"""Keeping secrets out of everything leapcore writes: logs, params, tables, reports, messages."""

from __future__ import annotations

import re

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
