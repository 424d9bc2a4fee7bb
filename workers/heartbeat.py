"""Worker liveness in Redis, so producers can say "no worker serves this queue", and
``sibylq status`` can describe the fleet.

Every ``heartbeat_interval_s`` a worker stamps its hostname into ``sibylq:workers:<queue>``
for each queue it consumes, its queues into ``sibylq:queues`` (the queues ``sibylq status``
knows), and refreshes ``sibylq:worker:<hostname>``: its model, queues, pool, concurrency,
the jobs it is running now (``busy``) and its metrics port. It writes to the result Redis,
the one producers read. (The leases on the jobs a worker holds are renewed at the same pace,
in the broker Redis, by ``workers.leases``.)
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import redis

from wire.connections import connect
from wire.constants import QUEUES_KEY, QUEUES_RETENTION_S, worker_info_key, workers_key
from wire.liveness import grace_s
from wire.settings import Settings

log = logging.getLogger(__name__)


class Heartbeat:
    def __init__(
        self,
        settings: Settings,
        hostname: str,
        queues: Iterable[str],
        *,
        pool: str | None = None,
        concurrency: int | None = None,
        busy: Callable[[], int] | None = None,
        metrics_port: int | None = None,
    ) -> None:
        self._redis = connect(settings.result_url, settings, socket_connect_timeout=2)
        self._interval_s = settings.heartbeat_interval_s
        self._hostname = hostname
        self._queues = sorted(queues)
        self._busy = busy
        self._info: dict[str, Any] = {
            "hostname": hostname,
            "queues": self._queues,
            "model": settings.worker_model,
            "pid": os.getpid(),
            "pool": pool,
            "concurrency": concurrency,
            "metrics_port": metrics_port,
            "started_at": time.time(),
        }
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sibylq-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            with self._redis.pipeline() as pipe:
                for queue in self._queues:
                    pipe.zrem(workers_key(queue), self._hostname)
                pipe.delete(worker_info_key(self._hostname))
                pipe.execute()
        except redis.RedisError:
            pass  # the entries expire on their own
        self._redis.close()

    def info(self) -> dict[str, Any]:
        """What the next beat writes to ``sibylq:worker:<hostname>``."""
        return {**self._info, "busy": None if self._busy is None else self._busy()}

    def beat(self) -> None:
        now = time.time()
        grace = grace_s(self._interval_s)
        with self._redis.pipeline() as pipe:
            for queue in self._queues:
                pipe.zadd(workers_key(queue), {self._hostname: now})
                pipe.zremrangebyscore(workers_key(queue), "-inf", now - grace)
            if self._queues:
                pipe.zadd(QUEUES_KEY, dict.fromkeys(self._queues, now))
            pipe.zremrangebyscore(QUEUES_KEY, "-inf", now - QUEUES_RETENTION_S)
            pipe.set(worker_info_key(self._hostname), json.dumps(self.info()), ex=int(grace) + 1)
            pipe.execute()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.beat()
            except redis.RedisError as exc:
                log.warning("heartbeat to Redis failed: %s", exc)
            self._stop.wait(self._interval_s)
