"""Parked jobs are versioned payloads: an entry no release wrote is dropped, never a crash
loop, and the due jobs beside it are published."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import redis
from celery import Celery

from embedded.redis_server import RedisServer
from wire.constants import DELAYED_KEY, DELAYED_LEASED_KEY
from wire.errors import ContractError
from workers.execute import Progress
from workers.parking import Parked, Promoter

QUEUE = "sibylq.test-parking"


@pytest.fixture
def results(server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(server.url)
    yield client
    client.close()


def _parked(job_id: str) -> Parked:
    return Parked(
        job_id=job_id,
        queue=QUEUE,
        priority=0,
        payload={"version": 1},
        progress=Progress(retries=1).encode(),
        reason="a 429",
    )


def test_a_foreign_entry_is_dropped_and_the_due_jobs_beside_it_are_published(
    server: RedisServer, results: redis.Redis
) -> None:
    results.zadd(DELAYED_KEY, {"not json": 0, '{"job_id": "x"}': 0, _parked("due").encode(): 0})
    sender = Celery("test-parking", broker=server.url, set_as_current=False)
    assert Promoter(results, sender).promote_due() == 3
    assert results.zcard(DELAYED_KEY) == results.zcard(DELAYED_LEASED_KEY) == 0
    published = [json.loads(raw)["headers"]["id"] for raw in results.lrange(QUEUE, 0, -1)]
    assert published == ["due"]


def test_payloads_written_before_they_had_a_version_still_decode() -> None:
    old_progress = {"retries": 2, "calls": 3, "usage": {}, "raw_outputs": ["{"], "started_at": None}
    assert Progress.decode(old_progress).retries == 2
    old_parked = _parked("old").model_dump(exclude={"version"})
    assert Parked.decode(json.dumps(old_parked)).job_id == "old"


@pytest.mark.parametrize("raw", ["[]", '{"retries": "many"}', '{"version": 2}'])
def test_a_payload_of_another_shape_or_version_is_a_contract_error(raw: str) -> None:
    with pytest.raises(ContractError):
        Progress.decode(json.loads(raw))
    with pytest.raises(ContractError):
        Parked.decode(raw)
