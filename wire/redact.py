"""Secrets out of everything sibylq writes: the one owner of redaction.

A text leaving a process (an error message, a stored result or traceback, a log line, a dead
letter) goes through ``redact``: the process's own secrets (``secrets_of``: the API keys and the
Redis passwords it was given) are masked wherever they appear, and so is what looks like one
whatever its source: the password of a URL (``redis://user:***@host``) and a bearer token
(``Bearer ***``), as a proxy may echo in an error body.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from urllib.parse import unquote, urlsplit, urlunsplit

from .providers import api_key_variables

MASK = "***"

#: ``scheme://user:password@``: the password (no ``@``, ``/``, quote or space in it).
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@\"']*:)[^\s@/\"']+@")
#: ``Bearer <token>`` (an ``Authorization`` header, echoed).
_BEARER = re.compile(r"(?P<head>\bBearer\s+)[A-Za-z0-9._~+/=-]+", re.IGNORECASE)
#: A secret shorter than this is masked only where it looks like one (in a URL, after
#: ``Bearer``): masking every occurrence of ``"ab"`` would garble every message.
MIN_LITERAL_LENGTH = 4


def redact_url(url: str) -> str:
    """``url`` without its password (``redis://user:***@host:6379/0``)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:{MASK}@{netloc}"))


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with ``secrets`` and anything that looks like a password or token masked."""
    for secret in sorted(set(secrets), key=len, reverse=True):
        if len(secret) >= MIN_LITERAL_LENGTH:
            text = text.replace(secret, MASK)
    text = _URL_PASSWORD.sub(rf"\g<head>{MASK}@", text)
    return _BEARER.sub(rf"\g<head>{MASK}", text)


def secrets_of(*urls: str | None) -> tuple[str, ...]:
    """What a process given ``urls`` must never write out: their passwords (as written and
    URL-decoded) and every API key it has (``OPENAI_API_KEY``, ``GROQ_API_KEY``... every
    provider's of ``wire.providers``)."""
    found = []
    for url in urls:
        password = urlsplit(url).password if url else None
        if password:
            found += [password, unquote(password)]
    for variable in api_key_variables():
        api_key = os.environ.get(variable, "").strip()
        if api_key:
            found.append(api_key)
    return tuple(found)
