"""Prometheus metrics of a real prefork worker: counts from every pool process, dead ones too.

The worker runs on its own queue with ``SIBYLQ_METRICS_PORT=0`` and publishes the port it
bound in its heartbeat; the test scrapes ``/metrics`` like Prometheus would.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from embedded.redis_server import RedisServer, free_port
from producer import Client, Job, JobFailedError, Models, Settings
from tests.conftest import Worker, wait_for
from wire.constants import queue_name, result_key, worker_info_key, workers_key
from wire.contract import JobKind, JobSpec, Message
from workers.metrics import WorkerCollector

T = TypeVar("T")

QUEUE = queue_name("fake", "metrics")
SLOW = "fake:delay=1"
FAST = "fake:delay=0.05"
BROKEN = "fake:delay=nope"  # the producer refuses it; sent raw, the worker's backend fails it

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def worker_info(url: str, queue: str) -> dict[str, Any]:
    with redis.Redis.from_url(url) as client:
        [host] = client.zrange(workers_key(queue), 0, -1)
        raw = client.get(worker_info_key(host.decode()))
    assert raw is not None
    return dict(json.loads(raw))


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def number(samples: Samples, name: str, **labels: str) -> float:
    found = value(samples, name, **labels)
    assert found is not None, f"no sample {name}{labels}"
    return found


def started_pid(url: str, job_id: str) -> int | None:
    with redis.Redis.from_url(url) as client:
        raw = client.get(result_key(job_id))
    meta = None if raw is None else json.loads(raw)
    return int(meta["result"]["pid"]) if meta and meta["status"] == "STARTED" else None


@pytest.fixture(scope="module")
def prefork_worker(start_worker: Callable[..., Worker]) -> Worker:
    return start_worker(
        "fake", "-Q", QUEUE, "-P", "prefork", "-c", "2", queue=QUEUE,
        env={"SIBYLQ_METRICS_PORT": "0"},
    )  # fmt: skip


def test_a_prefork_worker_counts_jobs_from_every_pool_process(
    prefork_worker: Worker, client: Client, redis_server: RedisServer
) -> None:
    info = worker_info(redis_server.url, QUEUE)
    assert info["pool"] == "prefork"
    assert info["concurrency"] == 2
    port = info["metrics_port"]
    assert isinstance(port, int) and port > 0
    assert f"metrics: serving http://0.0.0.0:{port}/metrics" in prefork_worker.log()

    # Five slow jobs at once: both pool processes run one, three wait in the queue.
    slow = Models.create(SLOW, client=client, queue=QUEUE)
    batch: list[Job[str]] = [slow.call_async(f"job {i}") for i in range(5)]
    busy = wait_for(
        "two running jobs and three waiting",
        lambda: (
            (s := scrape(port))
            and value(s, "sibylq_jobs_running") == 2
            and value(s, "sibylq_queue_depth", queue=QUEUE) == 3
            and s
        ),
    )
    assert value(busy, "sibylq_worker_concurrency") == 2
    assert value(busy, "sibylq_broker_up") == 1
    assert [job.result(timeout=20) for job in batch] == ["fake output"] * 5

    # A job whose pool process dies mid-run is delivered again, and runs on a live one. The
    # dead process's counts (it ran jobs of the batch above) stay in the totals.
    doomed: Job[str] = Models.create("fake:delay=2", client=client, queue=QUEUE).call_async("x")
    pid = wait_for("the job to start", lambda: started_pid(redis_server.url, doomed.id))
    # STARTED is stored just before the job's metrics: kill it once both are in.
    wait_for(
        "the job's queue wait to be recorded",
        lambda: (
            value(
                scrape(port),
                "sibylq_job_queue_wait_seconds_count",
                model="fake:delay=2",
                queue=QUEUE,
            )
            == 1
        ),
    )
    assert pid != prefork_worker.process.pid
    os.kill(pid, signal.SIGKILL)
    assert doomed.result(timeout=20) == "fake output"

    fast = Models.create(FAST, client=client, queue=QUEUE)
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    assert fast.json("structured", json_schema=schema) == {"n": 0}
    spec = JobSpec(model=BROKEN, kind=JobKind.TEXT, messages=(Message(role="user", content="x"),))
    broken = Job.from_id(client.submit(spec, QUEUE), model=BROKEN, queue=QUEUE, client=client)
    with pytest.raises(JobFailedError, match="fake:delay must be a number"):
        broken.result(timeout=20)

    samples = scrape(port)
    jobs = "sibylq_jobs_total"
    assert value(samples, jobs, model=SLOW, queue=QUEUE, status="succeeded") == 5
    assert value(samples, jobs, model="fake:delay=2", queue=QUEUE, status="succeeded") == 1
    assert value(samples, jobs, model=FAST, queue=QUEUE, status="succeeded") == 1
    assert value(samples, jobs, model=BROKEN, queue=QUEUE, status="failed") == 1
    failures = "sibylq_job_failures_total"
    assert value(samples, failures, model=BROKEN, queue=QUEUE, error="ConfigurationError") == 1
    assert value(samples, "sibylq_job_redeliveries_total", queue=QUEUE) == 1

    duration = "sibylq_job_duration_seconds"
    assert value(samples, f"{duration}_count", model=SLOW, queue=QUEUE) == 5
    assert 5 <= number(samples, f"{duration}_sum", model=SLOW, queue=QUEUE) < 10
    assert value(samples, f"{duration}_bucket", model=SLOW, queue=QUEUE, le="0.5") == 0
    assert value(samples, f"{duration}_bucket", model=SLOW, queue=QUEUE, le="2.5") == 5
    # The killed run never finished: only the run that did is timed.
    assert value(samples, f"{duration}_count", model="fake:delay=2", queue=QUEUE) == 1
    assert value(samples, f"{duration}_count", model=BROKEN, queue=QUEUE) == 1

    wait = "sibylq_job_queue_wait_seconds"
    assert value(samples, f"{wait}_count", model=SLOW, queue=QUEUE) == 5
    # Three waited for a free process, each at least one job's run (1 s).
    assert number(samples, f"{wait}_bucket", model=SLOW, queue=QUEUE, le="0.5") <= 2
    assert number(samples, f"{wait}_sum", model=SLOW, queue=QUEUE) >= 3
    assert value(samples, f"{wait}_count", model="fake:delay=2", queue=QUEUE) == 2  # two runs

    usage = [job.envelope(timeout=5).usage for job in batch]
    tokens = "sibylq_tokens_total"
    prompt = value(samples, tokens, model=SLOW, queue=QUEUE, kind="prompt")
    completion = value(samples, tokens, model=SLOW, queue=QUEUE, kind="completion")
    assert prompt == sum(u.prompt_tokens for u in usage) > 0
    assert completion == sum(u.completion_tokens for u in usage) > 0

    # A pool process stores a job's result before it tells the main process the job ended, so
    # the main process's count of running jobs catches up just after the last result.
    idle = wait_for("the worker to count no running job", lambda: idle_scrape(port))
    assert value(idle, "sibylq_queue_depth", queue=QUEUE) == 0


def idle_scrape(port: int) -> Samples | None:
    samples = scrape(port)
    return samples if value(samples, "sibylq_jobs_running") == 0 else None


def test_a_scrape_survives_redis_being_down() -> None:
    settings = Settings(broker_url=f"redis://127.0.0.1:{free_port()}/0", metrics_port=0)
    collector = WorkerCollector(settings, [QUEUE], running=lambda: 3, concurrency=4)
    started = time.monotonic()
    samples = {sample.name: sample for family in collector.collect() for sample in family.samples}
    collector.close()
    assert time.monotonic() - started < 2
    assert samples["sibylq_broker_up"].value == 0
    assert samples["sibylq_jobs_running"].value == 3
    assert samples["sibylq_worker_concurrency"].value == 4
    assert "sibylq_queue_depth" not in samples
