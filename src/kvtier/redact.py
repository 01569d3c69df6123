"""Secrets out of text: every URL kvtier prints or logs goes through ``redact_url``/``redact_text``.

A store URL may carry a password (``redis://user:PASSWORD@host:6379/0``) or a bare token as its
user part (``rediss://TOKEN@host``). Invariant: the user name and host stay readable (they are
what an operator needs to debug), anything that may be a secret becomes ``***``. ``redact_text``
applies the same rule to every URL inside a free-form message (an exception text, a log line),
so a message built from a URL by code that forgot to redact still prints safely.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

__all__ = ["redact_text", "redact_url"]

_URL_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
_SECRET_QUERY_RE = re.compile(r"(?i)\b(password|passwd|token|secret|access_key|secret_key)=[^&\s]*")


def redact_url(url: str) -> str:
    """``url`` with its password (or a bare userinfo, which may be a token) and secret-looking
    query values replaced by ``***``; safe to log."""
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. "s3://BUCKET[/PREFIX]" in a help text: keep it unless it may hold a secret
        return url if "@" not in url and "=" not in url else "<unparseable url>"
    query = _SECRET_QUERY_RE.sub(lambda m: f"{m.group(1)}=***", parts.query)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostinfo = netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:***@{hostinfo}" if colon and user else f"***@{hostinfo}"
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """``text`` with every URL in it passed through ``redact_url``."""
    if "://" not in text:
        return text
    return _URL_RE.sub(lambda m: redact_url(m.group(0)), text)
