"""Reading how long a provider asked us to wait from its response headers."""

from __future__ import annotations

import time
from email.utils import formatdate

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.backends.retry_after import MAX_DELAY_S, parse_duration_s, server_delay_s


@pytest.mark.parametrize(
    ("headers", "delay"),
    [
        ({"retry-after-ms": "250"}, 0.25),
        ({"Retry-After": "3"}, 3.0),
        ({"retry-after-ms": "250", "retry-after": "1"}, 0.25),  # the precise one wins
        ({"x-ratelimit-reset-requests": "1.5s"}, 1.5),
        ({"x-ratelimit-reset-requests": "20ms", "x-ratelimit-reset-tokens": "6m0s"}, 360.0),
        (
            {
                "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-requests": "2s",
                "x-ratelimit-remaining-tokens": "5000",
                "x-ratelimit-reset-tokens": "1m",
            },
            2.0,
        ),
        ({}, None),
        ({"retry-after": "soon"}, None),
        ({"retry-after": "-5"}, 0.0),
        ({"retry-after": "86400000"}, MAX_DELAY_S),
        ({"retry-after": "nan"}, None),
        ({"retry-after-ms": "NaN", "retry-after": "2"}, 2.0),
        ({"retry-after": "inf"}, None),
        ({"x-ratelimit-reset-requests": "nan"}, None),
        ({"retry-after": "Fri, 31 Dec 99999 23:59:59 GMT"}, None),  # past any calendar
    ],
)
def test_the_server_delay_comes_from_the_most_precise_header(
    headers: dict[str, str], delay: float | None
) -> None:
    assert server_delay_s(headers) == delay


def test_retry_after_may_be_an_http_date() -> None:
    headers = {"retry-after": formatdate(time.time() + 30, usegmt=True)}

    delay = server_delay_s(headers)

    assert delay is not None and 28 <= delay <= 31


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("2", 2.0), ("0.5s", 0.5), ("250ms", 0.25), ("1m30s", 90.0), ("1h2m3s", 3723.0)],
)
def test_durations_read_like_openai_writes_them(text: str, seconds: float) -> None:
    assert parse_duration_s(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "soon", "1x", "5s later"])
def test_unreadable_durations_are_none(text: str) -> None:
    assert parse_duration_s(text) is None


HEADERS = ("retry-after", "retry-after-ms", "x-ratelimit-reset-requests",
           "x-ratelimit-reset-tokens", "x-ratelimit-remaining-requests")  # fmt: skip


@settings(deadline=None)  # a loaded machine is slow, not wrong
@given(st.dictionaries(st.sampled_from(HEADERS), st.text() | st.floats().map(str)))
def test_whatever_the_headers_say_the_delay_is_none_or_a_bounded_number(
    headers: dict[str, str],
) -> None:
    delay = server_delay_s(headers)
    assert delay is None or 0.0 <= delay <= MAX_DELAY_S
