"""Horizontal scale: jobs of one queue spread over every worker that serves it."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from producer import Client, Models
from producer.constants import queue_name
from tests.conftest import Worker

QUEUE = queue_name("fake", "scaling")


async def _throughput(model: Any, jobs: int) -> tuple[float, Counter[str]]:
    started = time.monotonic()
    handles = [model.call_async(f"job {i}") for i in range(jobs)]
    envelopes = await asyncio.gather(*(handle.envelope_async() for handle in handles))
    return jobs / (time.monotonic() - started), Counter(e.worker for e in envelopes)


async def test_four_concurrency_one_workers_give_about_four_times_one(
    client: Client, start_worker: Callable[..., Worker]
) -> None:
    model = Models.create("fake:delay=0.2", client=client, queue=QUEUE)
    start_worker("fake", "-c", "1", "-Q", QUEUE, queue=QUEUE)
    one, _ = await _throughput(model, 10)

    for _ in range(3):
        start_worker("fake", "-c", "1", "-Q", QUEUE, queue=QUEUE)
    await _throughput(model, 8)  # warm up: a worker's first job imports its backend
    four, per_worker = await _throughput(model, 40)

    assert len(per_worker) == 4  # every worker took jobs...
    assert min(per_worker.values()) >= 5  # ...a fair share of them
    assert four / one >= 3.0, f"1 worker: {one:.1f} jobs/s, 4 workers: {four:.1f} jobs/s"
