"""Awaiting at scale: handles cost a future each, not a thread or a Redis connection."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from embedded.redis_server import RedisServer
from producer import Client, Models
from tests.conftest import Worker, connection_ids

N_JOBS = 10_000


async def test_ten_thousand_handles_awaited_together(
    client: Client, fake_worker: Worker, redis_server: RedisServer
) -> None:
    model = Models.create("fake", client=client)
    threads_before = threading.active_count()
    jobs = [model.extract_async(int, f"question {i}") for i in range(N_JOBS)]
    gathering: asyncio.Future[list[Any]] = asyncio.ensure_future(asyncio.gather(*jobs))
    await asyncio.sleep(0.5)

    assert not gathering.done()
    assert (
        len(connection_ids(redis_server.url, "sibylq-listener")) <= 3
    )  # one pub/sub connection, at most two for commands
    assert threading.active_count() == threads_before

    results = await asyncio.wait_for(gathering, timeout=240)
    assert results == [0] * N_JOBS
    assert client.listener().pending == 0
