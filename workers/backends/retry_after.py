"""How long a provider asked us to wait, from its response headers.

In order of precedence: ``retry-after-ms`` (OpenAI's, milliseconds), ``retry-after`` (seconds
or an HTTP date, RFC 9110), then OpenAI's ``x-ratelimit-reset-requests`` /
``x-ratelimit-reset-tokens`` (durations such as ``"20ms"``, ``"1.5s"`` or ``"6m0s"``): of those,
the ones whose ``x-ratelimit-remaining-*`` is 0, or the longest when none says which.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime

#: Longer waits are not believed: a broken header must not park jobs for days.
MAX_DELAY_S = 3600.0

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_LIMITS = ("requests", "tokens")


def server_delay_s(headers: Mapping[str, str]) -> float | None:
    """Seconds the server asked for, or None when it named no delay."""
    lower = {key.lower(): value for key, value in headers.items()}
    delay = _retry_after_ms(lower.get("retry-after-ms"))
    if delay is None:
        delay = _retry_after(lower.get("retry-after"))
    if delay is None:
        delay = _ratelimit_reset(lower)
    return None if delay is None else min(max(delay, 0.0), MAX_DELAY_S)


def parse_duration_s(text: str) -> float | None:
    """``"1m30s"`` -> 90.0, ``"250ms"`` -> 0.25, ``"2"`` -> 2.0; None if unreadable."""
    text = text.strip()
    number = _number(text)
    if number is not None:
        return number
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        return None
    return sum(float(number) * _UNIT_S[unit] for number, unit in parts)


def _number(text: str) -> float | None:
    """A finite number of ``text``, else None (``nan`` and ``inf`` are no delay)."""
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _retry_after_ms(value: str | None) -> float | None:
    number = None if value is None else _number(value)
    return None if number is None else number / 1000


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    number = _number(value)
    if number is not None:
        return number
    try:
        return parsedate_to_datetime(value).timestamp() - time.time()
    except (TypeError, ValueError, OverflowError):  # a date past any calendar
        return None


def _ratelimit_reset(headers: Mapping[str, str]) -> float | None:
    resets = {
        limit: parse_duration_s(headers[f"x-ratelimit-reset-{limit}"])
        for limit in _LIMITS
        if f"x-ratelimit-reset-{limit}" in headers
    }
    known = {limit: delay for limit, delay in resets.items() if delay is not None}
    exhausted = [
        delay
        for limit, delay in known.items()
        if headers.get(f"x-ratelimit-remaining-{limit}", "").strip() == "0"
    ]
    candidates = exhausted or list(known.values())
    return max(candidates) if candidates else None
