"""Issue 11, item 2, at the issue's own sizes: a 0.1 s and a 10 s connection cut (refused, or
blackholed: no RST) while the sync and the awaited API enqueue, under the default
``SIBYLQ_BROKER_TIMEOUT_S``. The enqueue is held for the whole outage (it neither fails after
~2 s nor goes through while nothing can reach Redis), then each job runs once.

The producer reaches Redis through a ``FaultyProxy``; the worker talks to Redis directly."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest
import redis

from embedded.redis_server import RedisServer
from producer import Client, Models, Settings
from tests.conftest import HEARTBEAT_S, Worker
from tests.faults import FaultyProxy
from wire.constants import attempts_key

DEFAULT_BUDGET_S: float = Settings.model_fields["broker_timeout_s"].default


@pytest.fixture
def producer(proxy: FaultyProxy) -> Iterator[Client]:
    settings = Settings(
        broker_url=proxy.url(),
        heartbeat_interval_s=HEARTBEAT_S,
        no_worker_timeout_s=0,  # the producer cannot see workers while it is cut off
        cache=False,
    )
    assert settings.broker_timeout_s == DEFAULT_BUDGET_S  # the default budget, 120 s
    client = Client(settings)
    yield client
    client.close()


def _heal_after(proxy: FaultyProxy, seconds: float) -> threading.Timer:
    timer = threading.Timer(seconds, proxy.heal)
    timer.start()
    return timer


def _delivered(url: str, job_id: str) -> int:
    admin = redis.Redis.from_url(url)
    try:
        return int(admin.get(attempts_key(job_id)) or 0)
    finally:
        admin.close()


@pytest.mark.parametrize("window_s", [0.1, 10.0])
@pytest.mark.parametrize("fault", ["refuse", "blackhole"])
def test_a_sync_enqueue_is_held_through_the_cut_then_runs_once(
    proxy: FaultyProxy,
    producer: Client,
    fake_worker: Worker,
    redis_server: RedisServer,
    fault: str,
    window_s: float,
) -> None:
    model = Models.create("fake", client=producer)
    assert model.classify(["spam", "ham"], "warm up", timeout=30) in {"spam", "ham"}
    getattr(proxy, fault)()
    healer = _heal_after(proxy, window_s)
    started = time.monotonic()
    job = model.classify_async(["spam", "ham"], f"sync through a {window_s} s {fault}")
    held_s = time.monotonic() - started
    healer.join()
    print(f"sync enqueue, {fault} {window_s:g} s: held {held_s:.2f} s, then enqueued")

    assert held_s >= window_s - 0.05  # it waited for Redis: nothing could get through before
    assert held_s < window_s + 6  # and went on within a try (5 s at most) of its return
    assert job.result(timeout=60) in {"spam", "ham"}
    assert _delivered(redis_server.url, job.id) == 1


@pytest.mark.parametrize("fault", ["refuse", "blackhole"])
async def test_an_awaited_enqueue_rides_out_a_10_s_cut_then_runs_once(
    proxy: FaultyProxy, producer: Client, fake_worker: Worker, redis_server: RedisServer, fault: str
) -> None:
    window_s = 10.0
    model = Models.create("fake", client=producer)
    assert await model.extract_async(int, "warm up") == 0
    getattr(proxy, fault)()
    healer = _heal_after(proxy, window_s)
    started = time.monotonic()
    jobs = [model.extract_async(int, f"awaited through a {fault} {n}") for n in range(20)]
    assert time.monotonic() - started < 0.5  # handles at once; the enqueues wait off the loop
    values = await asyncio.wait_for(asyncio.gather(*jobs), window_s + 60)
    took_s = time.monotonic() - started
    await asyncio.to_thread(healer.join)
    print(f"awaited enqueues, {fault} {window_s:g} s: all 20 answered after {took_s:.2f} s")

    assert values == [0] * 20
    assert took_s >= window_s - 0.05
    delivered = [await asyncio.to_thread(_delivered, redis_server.url, j.id) for j in jobs]
    assert delivered == [1] * 20
    await producer.aclose_listener()
