"""The ``_async`` twins never block the event loop: not on a slow Redis, not on the embedded
cluster's first start. (The loop's lag under load is measured by ``benchmarks/loop_lag.py``.)"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import redis

from benchmarks.loop_lag import LagProbe
from embedded.redis_server import RedisServer
from producer import Client, Models, Settings
from tests.conftest import HEARTBEAT_S, Worker
from tests.faults import FaultyProxy
from wire.constants import attempts_key

REPO = Path(__file__).resolve().parents[2]


async def test_the_loop_keeps_ticking_while_a_slow_redis_holds_the_enqueues(
    proxy: FaultyProxy, fake_worker: Worker
) -> None:
    settings = Settings(broker_url=proxy.url(), heartbeat_interval_s=HEARTBEAT_S, cache=False)
    client = Client(settings)
    model = Models.create("fake", client=client)
    assert await model.call_async("warm up") == "fake output"  # connected
    proxy.delay(1.0)  # every round trip to Redis takes 2 s
    async with LagProbe(interval_s=0.01) as probe:
        started = time.monotonic()
        jobs = [model.call_async(f"slow {n}") for n in range(5)]
        handed_out_s = time.monotonic() - started
        assert await asyncio.wait_for(asyncio.gather(*jobs), 60) == ["fake output"] * 5
        took_s = time.monotonic() - started
    assert handed_out_s < 0.5
    assert took_s > 2.0  # the enqueues did wait for Redis...
    assert probe.max_s < 1.0, probe.max_s  # ...and the loop went on meanwhile
    proxy.heal()
    await client.aclose_listener()
    client.close()


FIRST_USE = """
import asyncio, json, time
from benchmarks.loop_lag import LagProbe
from producer import Models

async def main():
    async with LagProbe(interval_s=0.01) as probe:
        started = time.monotonic()
        job = Models.create("fake").call_async("first use")
        handed_out_s = time.monotonic() - started
        value = await asyncio.wait_for(job, 120)
        took_s = time.monotonic() - started
    print(json.dumps({"handed_out_s": handed_out_s, "took_s": took_s, "max_stall_s": probe.max_s,
                      "ticks": len(probe.lags_s), "value": value}))

asyncio.run(main())
"""


def test_the_first_use_starts_the_embedded_cluster_off_the_loop() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIBYLQ_")}
    done = subprocess.run(
        [sys.executable, "-c", FIRST_USE], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome["value"] == "fake output"
    assert outcome["handed_out_s"] < 0.5
    # Redis and a worker process started meanwhile (a Python process importing Celery takes
    # longer than 0.3 s)...
    assert outcome["took_s"] > 0.3
    # ...and the loop went on: it turned every 10 ms or so, never stalled for a second.
    assert outcome["ticks"] >= 20
    assert outcome["max_stall_s"] < 1.0, outcome


async def test_a_blocking_result_on_the_loops_thread_enqueues_the_job_once(
    client: Client, fake_worker: Worker, redis_server: RedisServer
) -> None:
    model = Models.create("fake", client=client)
    job = model.call_async("blocking inside the loop")
    assert job.id  # known before the enqueue runs
    # The loop is blocked here, its enqueue task cannot run: the handle enqueues by itself.
    assert job.result(timeout=30) == "fake output"
    assert await job == "fake output"
    admin = redis.Redis.from_url(redis_server.url)
    assert admin.get(attempts_key(job.id)) == b"1"
    admin.close()
