"""The baseline: bare Celery, configured as sibylq's workers are, running a no-op task.

Same Redis (broker and results), JSON only, ``task_acks_late``, ``task_reject_on_worker_lost``,
``worker_prefetch_multiplier=1``; the benchmark starts it with the same pool type and
concurrency as the sibylq worker it is compared with::

    BENCH_BROKER_URL=redis://... celery -A benchmarks.bare_celery worker -Q bench.bare \
        -P threads -c 8

What it leaves out is what sibylq adds: the job contract, the delivery check, STARTED,
heartbeats, metrics, schema validation, typed results.
"""

from __future__ import annotations

import os
from functools import lru_cache
from types import TracebackType
from typing import Any

from celery import Celery
from celery.result import AsyncResult

NOOP_TASK = "bench.noop"
BARE_QUEUE = "bench.bare"


def create_bare_app(url: str) -> Celery:
    app = Celery("bench-bare", broker=url, backend=url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        worker_send_task_events=False,
        task_default_queue=BARE_QUEUE,
    )
    app.task(name=NOOP_TASK)(noop)
    return app


def noop(payload: Any = None) -> None:
    """Does nothing: what is left is Celery and Redis."""


@lru_cache(maxsize=1)
def default_app() -> Celery:
    return create_bare_app(os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/0"))


def __getattr__(name: str) -> Any:
    # `celery -A benchmarks.bare_celery` looks up `app`; build it only then.
    if name in ("app", "celery"):
        return default_app()
    raise AttributeError(name)


class BareClient:
    """A producer of no-op tasks on the bare app; ``get()`` on what ``noop`` returns waits."""

    def __init__(self, url: str, queue: str = BARE_QUEUE) -> None:
        self.app = create_bare_app(url)
        self.queue = queue

    def noop(self, payload: Any) -> AsyncResult[Any]:
        return self.app.send_task(NOOP_TASK, args=[payload], queue=self.queue)

    def close(self) -> None:
        self.app.close()

    def __enter__(self) -> BareClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
