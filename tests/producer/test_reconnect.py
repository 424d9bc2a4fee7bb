"""Waiting survives lost Redis connections: after reconnecting, handles re-read every pending
result, so results stored while they were away are not missed.

The connections are cut with CLIENT KILL while jobs keep finishing. (A full Redis restart,
where workers must reconnect too, is a fleet-resilience scenario of its own.)
"""

from __future__ import annotations

import asyncio
import time

import redis

from embedded.redis_server import RedisServer
from producer import Client, Models
from tests.conftest import Worker, connection_ids


def _cut_producer_connections(url: str) -> int:
    ours = connection_ids(url, "sibylq-listener", "sibylq-producer")
    admin = redis.Redis.from_url(url)
    for conn_id in ours:
        admin.client_kill_filter(_id=conn_id)
    admin.close()
    return len(ours)


async def test_awaited_handles_survive_lost_connections(
    client: Client, fake_worker: Worker, redis_server: RedisServer
) -> None:
    model = Models.create("fake:delay=0.2", client=client)
    jobs = [model.extract_async(int, f"q{i}") for i in range(40)]
    gathering = asyncio.ensure_future(asyncio.gather(*jobs))
    for _ in range(3):
        await asyncio.sleep(0.3)
        cut = 0
        while cut == 0 and not gathering.done():  # wait for the listener to be back
            cut = await asyncio.to_thread(_cut_producer_connections, redis_server.url)
    assert await asyncio.wait_for(gathering, timeout=60) == [0] * 40


def test_a_blocking_wait_survives_lost_connections(
    client: Client, fake_worker: Worker, redis_server: RedisServer
) -> None:
    job = Models.create("fake:delay=1", client=client).call_async("slow")
    time.sleep(0.3)
    assert _cut_producer_connections(redis_server.url) > 0
    assert job.result(timeout=60) == "fake output"
