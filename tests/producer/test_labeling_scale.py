"""A large labeling run keeps Redis memory bounded: at most ``max_in_flight`` jobs are queued,
and each row's keys go once its result is in the output file.

Rows: 20,000 by default (about three minutes on two cores); set SIBYLQ_TEST_LABEL_ROWS=100000
for the full-size run (``python -m benchmarks`` measures that one too).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
import redis

from embedded.redis_server import RedisServer
from producer import Client, Models
from producer.labeling import label_file, make_task
from producer.labeling.progress import NoProgress
from tests.conftest import Worker

ROWS = int(os.environ.get("SIBYLQ_TEST_LABEL_ROWS", "20000"))
MAX_IN_FLIGHT = 200


class MemorySampler(threading.Thread):
    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.admin = redis.Redis.from_url(url)
        self.peak_bytes = 0
        self.peak_queued = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            used = int(self.admin.info("memory")["used_memory"])
            self.peak_bytes = max(self.peak_bytes, used)
            self.peak_queued = max(self.peak_queued, int(self.admin.llen("sibylq.fake")))
            time.sleep(0.2)


@pytest.mark.timeout(300 + ROWS // 50)
async def test_a_large_run_keeps_redis_memory_bounded(
    client: Client, fake_worker: Worker, redis_server: RedisServer, tmp_path: Path
) -> None:
    source = tmp_path / "in.jsonl"
    with source.open("w") as rows:
        for i in range(ROWS):
            rows.write(json.dumps({"id": i, "text": f"message number {i}"}) + "\n")
    sampler = MemorySampler(redis_server.url)
    baseline = int(sampler.admin.info("memory")["used_memory"])
    task = make_task(Models.create("fake", client=client), prompt="{text}", classify=["a", "b"])

    sampler.start()
    try:
        summary = await label_file(
            task, source, tmp_path / "out.jsonl", progress=NoProgress(),
            max_in_flight=MAX_IN_FLIGHT,
        )  # fmt: skip
    finally:
        sampler.stopped.set()
        sampler.join()

    assert (summary.done, summary.failed) == (ROWS, 0)
    assert sum(1 for _ in (tmp_path / "out.jsonl").open()) == ROWS
    assert sampler.peak_queued <= MAX_IN_FLIGHT
    growth_mb = (sampler.peak_bytes - baseline) / 2**20
    assert growth_mb < 16, f"Redis grew by {growth_mb:.1f} MB for {ROWS} rows"
    leftover = sum(1 for _ in sampler.admin.scan_iter("label-*", count=1000))
    leftover += sum(1 for _ in sampler.admin.scan_iter("*label-*", count=1000))
    assert leftover <= MAX_IN_FLIGHT
    sampler.admin.close()
