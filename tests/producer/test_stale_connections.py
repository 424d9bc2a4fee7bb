"""A wait outlives a connection that went silently dead: a partition that drops the packets of
the connections open at the time (a NAT or a firewall losing their state, a failover to another
address) and never sends an RST, while new connections get through. Nothing tells the
producer: only a timeout of its own or a re-read on another connection can. The stored result
must still reach every waiter, sync and awaited (issue 11: no hang; "waiting handles
resolve").

The producer reaches Redis through ``FaultyProxy`` (``go_stale``); the worker talks to Redis
directly."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

from producer import Client, Models, Settings
from tests.conftest import HEARTBEAT_S, Worker
from tests.faults import FaultyProxy

#: How long a wait may take to notice, at most: far less than forever.
NOTICE_S = 45.0


@pytest.fixture
def producer(proxy: FaultyProxy) -> Iterator[Client]:
    client = Client(Settings(broker_url=proxy.url(), heartbeat_interval_s=HEARTBEAT_S, cache=False))
    yield client
    client.close()


async def test_an_awaited_job_resolves_after_its_connections_went_silently_dead(
    proxy: FaultyProxy, producer: Client, fake_worker: Worker
) -> None:
    model = Models.create("fake:delay=2", client=producer)
    assert await model.call_async("warm up") == "fake output"  # the listener is connected
    job = model.call_async("through a silent partition")
    waiting = asyncio.ensure_future(job.result_async())
    await asyncio.sleep(1.0)  # enqueued, subscribed, running
    assert not waiting.done()
    assert await asyncio.to_thread(proxy.go_stale) > 0

    assert await asyncio.wait_for(waiting, NOTICE_S) == "fake output"
    await producer.aclose_listener()


def test_a_blocking_wait_resolves_after_its_connections_went_silently_dead(
    proxy: FaultyProxy, producer: Client, fake_worker: Worker
) -> None:
    model = Models.create("fake:delay=2", client=producer)
    assert model.call("warm up", timeout=30) == "fake output"  # connected
    job = model.call_async("through a silent partition")
    outcome: list[object] = []
    waiter = threading.Thread(target=lambda: outcome.append(job.result()), daemon=True)
    waiter.start()
    waiter.join(1.0)  # subscribed, running
    assert proxy.go_stale() > 0

    waiter.join(NOTICE_S)
    assert outcome == ["fake output"], "the blocking wait did not end"
