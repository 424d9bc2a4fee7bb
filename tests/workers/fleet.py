"""A test's own fleet: worker subprocesses on a private queue of a private redis-server, their
logs, and what the tests read of Redis and of those logs ("executions" are counted from them:
Celery logs ``Task sibylq.run_job[<id>] succeeded`` once per run that finished)."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import redis

from embedded.redis_server import RedisServer
from producer import Client, Settings
from tests.conftest import Worker, wait_for
from wire.constants import TASK_NAME, attempts_key, result_key, workers_key

T = TypeVar("T")

HEARTBEAT_S = 0.5
#: How Celery logs the end of a delivery: the job ran, was dropped, or failed.
_ENDED = ("succeeded", "ignored", "raised")


class Fleet:
    """The test's workers on ``queue`` (each may reach its broker through a proxy)."""

    def __init__(
        self, server: RedisServer, logs: Path, queue: str, env: dict[str, str] | None = None
    ) -> None:
        self.server = server
        self.logs = logs
        self.queue = queue
        self.env = env or {}
        self.workers: list[Worker] = []

    def start(
        self,
        *args: str,
        broker: str | None = None,
        model: str = "fake",
        env: dict[str, str] | None = None,
    ) -> Worker:
        """A worker, once it consumes and stamps a heartbeat of its own (another worker's
        would do for ``wait_ready``)."""
        environment = {
            **os.environ,
            "SIBYLQ_BROKER_URL": broker or self.server.url,
            "SIBYLQ_RESULT_BACKEND": self.server.url,
            "SIBYLQ_HEARTBEAT_INTERVAL_S": str(HEARTBEAT_S),
            "PYTHONUNBUFFERED": "1",
            **self.env,
            **(env or {}),
        }
        log_path = self.logs / f"worker-{len(self.workers)}.log"
        worker = Worker([model, "-Q", self.queue, *args], environment, log_path)
        self.workers.append(worker)
        worker.wait_ready(self.server.url, self.queue)
        self.wait_for("the worker's heartbeat", lambda: self.hostname(worker), 60)
        return worker

    def producer(self, **settings: Any) -> Client:
        """A client of this fleet's Redis that rides out the faults the tests inject."""
        defaults: dict[str, Any] = {
            "heartbeat_interval_s": HEARTBEAT_S,
            "no_worker_timeout_s": 60.0,
            "broker_timeout_s": 60.0,
        }
        return Client(Settings(broker_url=self.server.url, **{**defaults, **settings}))

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.server.url, socket_connect_timeout=2)

    def hostname(self, worker: Worker) -> str | None:
        """The hostname ``worker`` beats under (``sibylq-fake-any-<pid>@host``), once it does."""
        with self.redis() as client:
            beating = client.zrange(workers_key(self.queue), 0, -1)
        mine = [name.decode() for name in beating if f"-{worker.process.pid}@".encode() in name]
        return mine[0] if mine else None

    def beats_since(self, worker: Worker, since: float) -> bool:
        """Whether ``worker`` (the same process) has stamped its heartbeat after ``since``."""
        hostname = self.hostname(worker)
        return hostname is not None and self.last_heartbeat(hostname) > since

    def last_heartbeat(self, hostname: str) -> float:
        """When the worker ``hostname`` last stamped its heartbeat (unix s)."""
        with self.redis() as client:
            score = client.zscore(workers_key(self.queue), hostname)
        assert score is not None, f"no heartbeat of {hostname}"
        return float(score)

    def logs_text(self) -> str:
        return "\n".join(worker.log() for worker in self.workers)

    def executions(self, job_id: str) -> int:
        return len(re.findall(re.escape(f"Task {TASK_NAME}[{job_id}] succeeded"), self.logs_text()))

    def attempts(self, job_id: str) -> int:
        with self.redis() as client:
            return int(client.get(attempts_key(job_id)) or 0)

    def meta(self, job_id: str) -> dict[str, Any] | None:
        with self.redis() as client:
            raw = client.get(result_key(job_id))
        return None if raw is None else dict(json.loads(raw))

    def started(self, job_id: str, *, not_pids: frozenset[int] = frozenset()) -> Any:
        """The STARTED meta's ``{"pid", "hostname"}`` once a run (not by ``not_pids``) began."""
        meta = self.meta(job_id)
        if meta is None or meta["status"] != "STARTED" or meta["result"]["pid"] in not_pids:
            return None
        return meta["result"]

    def wait_for(self, what: str, probe: Callable[[], T | None], timeout_s: float = 30) -> T:
        return wait_for(what, probe, timeout_s, detail=lambda: self.logs_text()[-6000:])

    def unfinished_deliveries(self) -> Counter[str]:
        """Per job id, deliveries received and not yet ended (ran, ignored or failed), from
        Celery's log lines."""
        events = re.findall(rf"Task {re.escape(TASK_NAME)}\[([^\]]+)\] (\w+)", self.logs_text())
        received = Counter(job_id for job_id, what in events if what == "received")
        ended = Counter(job_id for job_id, what in events if what in _ENDED)
        return received - ended

    def settle(self, killed: int | None = None) -> None:
        """Wait until every job is acknowledged and none is queued: nothing can run again, and
        each run's log lines are written (a run logs before its message is acked). With
        ``killed``, also until every delivery ended but the ``killed`` ones (their process
        died: Celery logs no end for them). (An acknowledgement by a first run can also remove
        the index entry of a second delivery of the same message: kombu's delivery tag is the
        message's.)"""
        with self.redis() as client:
            self.wait_for(
                "every job to be acknowledged and every delivery to end",
                lambda: (
                    client.hlen("unacked") == 0
                    and client.llen(self.queue) == 0
                    and (killed is None or self.unfinished_deliveries().total() == killed)
                ),
            )

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()
