"""Horizontal scale: jobs of one queue spread over every worker that serves it.

How close to linear the throughput grows is measured by ``python -m benchmarks`` (scaling),
not asserted here: a timing ratio on a shared machine is a flaky test.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable

from producer import Client, Models
from tests.conftest import Worker
from wire.constants import queue_name

QUEUE = queue_name("fake", "scaling")


async def test_jobs_of_one_queue_spread_over_four_concurrency_one_workers(
    client: Client, start_worker: Callable[..., Worker]
) -> None:
    model = Models.create("fake:delay=0.2", client=client, queue=QUEUE)
    for _ in range(4):
        start_worker("fake", "-c", "1", "-Q", QUEUE, queue=QUEUE)

    handles = [model.call_async(f"job {i}") for i in range(40)]
    envelopes = await asyncio.gather(*(handle.envelope_async() for handle in handles))
    per_worker = Counter(envelope.worker for envelope in envelopes)

    assert len(per_worker) == 4  # every worker took jobs...
    assert min(per_worker.values()) >= 5  # ...a fair share of them
