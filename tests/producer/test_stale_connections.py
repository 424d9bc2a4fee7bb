"""A wait outlives a connection that went silently dead: a partition that drops the packets of
the connections open at the time (a NAT or a firewall losing their state, a failover to another
address) and never sends an RST, while new connections get through. Nothing tells the
producer: only a timeout of its own or a re-read on another connection can. The stored result
must still reach every waiter, sync and awaited (issue 11: no hang; "waiting handles
resolve").

The producer reaches Redis through ``StaleProxy``; the worker talks to Redis directly."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator

import pytest

from embedded.redis_server import RedisServer
from producer import Client, Models, Settings
from tests.conftest import HEARTBEAT_S, Worker
from tests.faults import FaultyProxy

#: How long a wait may take to notice, at most: far less than forever.
NOTICE_S = 45.0


class StaleProxy(FaultyProxy):
    """A ``FaultyProxy`` that can also make the connections open now go silently dead: what
    either side sends on them is dropped, forever, and nobody is told; new connections pass."""

    def __init__(self, upstream_port: int) -> None:
        self._stale: set[socket.socket] = set()
        self._stale_lock = threading.Lock()
        super().__init__(upstream_port)

    def go_stale(self) -> int:
        """Silence every connection open now; returns how many."""
        with self._lock:
            pairs = list(self._pairs)
        with self._stale_lock:
            for pair in pairs:
                self._stale.update(pair)
        return len(pairs)

    def _forward(self, data: bytes, sink: socket.socket) -> bool:
        with self._stale_lock:
            if sink in self._stale:
                return True  # swallowed: no answer, no RST, no FIN
        return super()._forward(data, sink)


@pytest.fixture
def proxy(redis_server: RedisServer) -> Iterator[StaleProxy]:
    proxy = StaleProxy(redis_server.port)
    try:
        yield proxy
    finally:
        proxy.close()


@pytest.fixture
def producer(proxy: StaleProxy) -> Iterator[Client]:
    client = Client(Settings(broker_url=proxy.url(), heartbeat_interval_s=HEARTBEAT_S, cache=False))
    yield client
    client.close()


async def test_an_awaited_job_resolves_after_its_connections_went_silently_dead(
    proxy: StaleProxy, producer: Client, fake_worker: Worker
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
    proxy: StaleProxy, producer: Client, fake_worker: Worker
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
