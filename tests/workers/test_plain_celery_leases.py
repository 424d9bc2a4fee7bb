"""docs/resilience.md, "A whole worker dies": a worker started by plain Celery
(``celery -A workers worker``, as docs/fleet.md allows) renews its jobs' leases and sweeps
lost workers' jobs like ``sibylq worker``. Without it, a ``sibylq worker`` beside it would take
its long jobs, and a lost worker's job would wait for kombu's backstop.

Each test has its own redis-server and workers, with the shortest lease the settings allow."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from embedded.redis_server import RedisServer
from producer import Client, Job, Models
from tests.conftest import Worker
from tests.workers.fleet import HEARTBEAT_S, Fleet
from wire.constants import queue_name, workers_key
from wire.deadletters import list_dead

QUEUE = queue_name("fake", "plain-celery")
LEASE_S = 4 * HEARTBEAT_S
LEASE_ENV = {"SIBYLQ_VISIBILITY_TIMEOUT_S": str(LEASE_S)}


class CeleryWorker(Worker):
    """``celery -A workers worker ARGS`` (no ``SIBYLQ_WORKER_MODEL``: it runs any model)."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.args = args
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "workers", "worker", *args],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


@pytest.fixture
def fleet(server: RedisServer, tmp_path: Path) -> Iterator[Fleet]:
    fleet = Fleet(server, tmp_path, QUEUE)
    yield fleet
    fleet.stop()


@pytest.fixture
def producer(fleet: Fleet) -> Iterator[Client]:
    client = fleet.producer(no_worker_timeout_s=30.0)
    yield client
    client.close()


def start_plain(fleet: Fleet, *args: str) -> tuple[Worker, str]:
    """A plain Celery worker, once it beats, and the node name it beats under (plain Celery's
    names hold no pid: this one holds a tag of its own)."""
    tag = f"plain-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "SIBYLQ_BROKER_URL": fleet.server.url,
        "SIBYLQ_RESULT_BACKEND": fleet.server.url,
        "SIBYLQ_HEARTBEAT_INTERVAL_S": str(HEARTBEAT_S),
        "PYTHONUNBUFFERED": "1",
        **LEASE_ENV,
    }
    env.pop("SIBYLQ_WORKER_MODEL", None)
    log = fleet.logs / f"plain-{len(fleet.workers)}.log"
    worker = CeleryWorker(["-Q", QUEUE, "-n", f"{tag}@%h", "--loglevel", "INFO", *args], env, log)
    fleet.workers.append(worker)
    worker.wait_ready(fleet.server.url, QUEUE)

    def beating() -> bool:
        with fleet.redis() as client:
            return any(tag.encode() in name for name in client.zrange(workers_key(QUEUE), 0, -1))

    fleet.wait_for("the plain worker's heartbeat", beating, 60)
    return worker, tag


def fake(client: Client, delay_s: float) -> Any:
    return Models.create(f"fake:delay={delay_s}", client=client, queue=QUEUE)


def test_a_plain_celery_worker_renews_its_long_jobs_lease(fleet: Fleet, producer: Client) -> None:
    _, tag = start_plain(fleet, "-P", "threads", "-c", "1")
    job: Job[str] = fake(producer, 5 * LEASE_S).call_async("a long job on plain Celery")
    first = fleet.wait_for("the job to start", lambda: fleet.started(job.id), 20)
    assert first["hostname"].startswith(f"{tag}@")
    fleet.start("-P", "threads", "-c", "1", env=LEASE_ENV)  # its sweeps would take the job

    assert job.result(timeout=60) == "fake output"
    fleet.settle()
    assert fleet.attempts(job.id) == 1
    assert fleet.executions(job.id) == 1
    assert "requeued job" not in fleet.logs_text()
    assert list_dead(fleet.redis()) == []  # Celery's own messages (mingle) are not refused


def test_a_plain_celery_worker_requeues_a_lost_workers_job(fleet: Fleet, producer: Client) -> None:
    doomed = fleet.start("-P", "threads", "-c", "1", env=LEASE_ENV)
    job: Job[str] = fake(producer, 3).call_async("the machine is lost")
    first = fleet.wait_for("the job to start", lambda: fleet.started(job.id), 20)
    assert f"-{doomed.process.pid}@" in first["hostname"]
    survivor, tag = start_plain(fleet, "-P", "threads", "-c", "1")

    os.killpg(doomed.process.pid, signal.SIGKILL)
    doomed.process.wait(timeout=10)

    assert job.result(timeout=60) == "fake output"
    assert job.envelope(timeout=5).worker.startswith(f"{tag}@")
    assert f"requeued job {job.id}: its worker stopped renewing its lease" in survivor.log()
    assert list_dead(fleet.redis()) == []  # Celery's own messages (mingle) are not refused
