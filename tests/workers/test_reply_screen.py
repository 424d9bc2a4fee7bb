"""Celery's remote-control replies (``<oid>.reply.celery.pidbox`` lists) are no jobs: they pass
the intake when kombu can decode them, and a broken one is set aside like any hostile entry,
so a forged reply cannot crash a worker that is waiting for replies (a plain Celery worker's
mingle at start-up)."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from workers.intake import screen_reply


def reply(**changes: Any) -> str:
    """A reply as kombu's Redis transport stores it, with ``changes`` to its fields."""
    payload = json.dumps({"worker@host": {"ok": "pong"}})
    message = {
        "body": base64.b64encode(payload.encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"ticket": "t-1", "clock": 3},
        "properties": {
            "delivery_tag": "tag-1",
            "body_encoding": "base64",
            "delivery_info": {"exchange": "reply.celery.pidbox", "routing_key": "oid"},
            "priority": 0,
        },
    }
    message.update(changes)
    return json.dumps(message)


def test_a_reply_kombu_can_decode_passes() -> None:
    assert screen_reply(reply()) is None


@pytest.mark.parametrize(
    "entry",
    [
        "not json at all",
        "[1, 2]",
        reply(**{"body": base64.b64encode(b"not json").decode()}),
        reply(**{"body": "%%% not base64 %%%"}),
        reply(**{"content-type": "application/x-python-serialize"}),
        reply(**{"properties": {"body_encoding": "base64"}}),
        json.dumps({"body": 1}),
    ],
)
def test_a_reply_kombu_cannot_decode_is_refused(entry: str) -> None:
    refusal = screen_reply(entry)
    assert refusal is not None
    assert refusal.job_id is None
