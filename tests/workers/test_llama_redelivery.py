"""A llama.cpp worker process killed while it decodes a batch: every job in the batch runs
again on another worker and finishes once.

The worker is killed with SIGKILL (no goodbye): its jobs come back when their lease runs out
(``workers.leases``), here after 4 s.
"""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import Callable
from typing import Any

import redis

from producer import Client, Models
from tests.conftest import Worker, wait_for
from wire.constants import TASK_NAME, attempts_key, queue_name, result_key

QUEUE = queue_name("llamacpp", "redelivery")
LEASE_ENV = {"SIBYLQ_VISIBILITY_TIMEOUT_S": "4", "SIBYLQ_LLAMA_BATCH": "4"}
ANIMALS = ("dragon", "whale", "fox", "owl")


def started_on(client: redis.Redis, job_id: str) -> int | None:
    """The pid running ``job_id``, once its STARTED state is stored."""
    raw = client.get(result_key(job_id))
    meta = None if raw is None else json.loads(raw)
    return None if meta is None or meta["status"] != "STARTED" else int(meta["result"]["pid"])


def executions(workers: list[Worker], job_id: str) -> int:
    """Runs of ``job_id`` that finished, counted from the workers' logs."""
    pattern = re.escape(f"Task {TASK_NAME}[{job_id}] succeeded")
    return sum(len(re.findall(pattern, worker.log())) for worker in workers)


def test_a_worker_killed_mid_batch_has_every_job_run_again_and_finished_once(
    start_worker: Callable[..., Worker], client: Client, redis_server: Any
) -> None:
    doomed = start_worker("llamacpp:smollm2", "-Q", QUEUE, queue=QUEUE, env=LEASE_ENV)
    model = Models.create(
        "llamacpp:smollm2", client=client, queue=QUEUE, genconf={"max_tokens": 48}
    )
    jobs = [model.call_async(f"Write a long story about a {animal}.") for animal in ANIMALS]
    store = redis.Redis.from_url(redis_server.url)
    pids = [
        wait_for("the batch to start", lambda job=job: started_on(store, job.id), 120)
        for job in jobs
    ]
    assert set(pids) == {doomed.process.pid}  # one process decodes the whole batch

    os.killpg(doomed.process.pid, signal.SIGKILL)
    doomed.process.wait(timeout=10)
    survivor = start_worker("llamacpp:smollm2", "-Q", QUEUE, queue=QUEUE, env=LEASE_ENV)

    envelopes = [job.envelope(timeout=240) for job in jobs]
    assert all(f"-{survivor.process.pid}@" in envelope.worker for envelope in envelopes)
    assert all(envelope.usage.completion_tokens > 0 for envelope in envelopes)
    for job in jobs:  # a run logs its success just after it stores its result
        ran = lambda job=job: executions([doomed, survivor], job.id)  # noqa: E731
        wait_for("the run's log line", ran, 30)
        assert ran() == 1
        assert int(store.get(attempts_key(job.id)) or 0) == 2
    store.close()
