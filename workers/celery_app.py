"""The workers' Celery app: JSON only, late acks, one prefetched job, heartbeats, metrics."""

from __future__ import annotations

import os
from functools import cached_property
from typing import Any

from celery import Celery, signals
from celery.worker import state as worker_state

from wire.connections import endpoint
from wire.constants import TASK_NAME
from wire.redact import secrets_of
from wire.settings import HARD_LIMIT_GRACE_S, Settings, get_settings

from .broker import TRANSPORT
from .consumer import HoldDuplicates
from .heartbeat import Heartbeat
from .leases import LeaseKeeper
from .metrics import WorkerMetrics, process_exited
from .parking import Promoter
from .redacting import RedactingLogging
from .results import BACKEND
from .store import result_redis
from .task import Backends, JobTask, run_job

#: Celery's soft time limit comes this long after the job's own (prefork pools): a job's
#: deadline ends cooperative work first, and ends it as JobTimeLimitError, not as whatever
#: Celery's exception interrupts (storing the failure, say).
SOFT_LIMIT_GRACE_S = 2.0


class WorkerApp(Celery):
    """The workers' Celery app. It owns its settings, the log set-up that masks their secrets
    (``workers.redacting``) and what its worker runs beside the pool (``Observability``)."""

    def __init__(self, settings: Settings) -> None:
        broker = endpoint(settings.broker, settings)
        results = endpoint(settings.result_url, settings)
        # Results go through Celery's Redis backend, except that no write replaces a final
        # result (workers.results: when a job runs twice, the first result stored wins) and no
        # value stored holds a secret (workers.redacting).
        super().__init__("sibylq", broker=broker.url, backend=f"{BACKEND}+{results.url}")
        self.settings = settings
        self.observability = Observability(self, settings)
        # One TLS policy for every client (wire.connections): kombu alone would not check
        # the certificate of a bare rediss:// URL.
        self.conf.update(
            broker_use_ssl=broker.ssl_options() or False,
            redis_backend_use_ssl=results.ssl_options() or False,
        )

    @cached_property
    def log(self) -> RedactingLogging:
        secrets = secrets_of(self.settings.broker_url, self.settings.result_backend)
        return RedactingLogging(self, secrets)


def create_app(settings: Settings | None = None) -> WorkerApp:
    settings = settings or get_settings()
    app = WorkerApp(settings)
    app.conf.update(
        # kombu's Redis transport, screening every entry before it is decoded and closing
        # cleanly when a connection dies mid-read (workers.broker).
        broker_transport=TRANSPORT,
        # JSON only: a pickled message is refused, never executed.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        result_expires=settings.result_expires_s,
        # A job is acked when it finishes, and requeued if its process dies mid-run.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # Jobs end themselves at the time limit (workers.backends.base.Deadline), on every
        # pool; on prefork, Celery's soft limit (an exception in Python code that ignored it)
        # and hard limit (the process killed) back that up.
        task_soft_time_limit=settings.job_time_limit_s + SOFT_LIMIT_GRACE_S,
        task_time_limit=hard_time_limit_s(settings),
        broker_transport_options=broker_transport_options(settings),
        # Workers outlive any Redis outage: retry connecting forever (Celery's default gives
        # up, and exits, after 100 attempts).
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        # Jobs keep running through a lost broker connection (Redis restart): they finish,
        # store their result and ack once Redis is back; cancelling them would throw the work
        # away and, with the Redis transport, leave them unacked for the visibility timeout.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # Storing a result must survive Redis being down. Without this, the store's first
        # step (a GET of the current state, in KeyValueStoreBackend._store_result, which
        # result_backend_transport_options' retry_policy does not cover: it only wraps SET)
        # raises ConnectionError at once: Celery logs "Exception raised outside body", acks
        # the message all the same, and the result is lost (the job stays STARTED, or turns
        # into a ConnectionError failure). With it, the pool process retries the whole store
        # until Redis answers (RedisBackend.exception_safe_to_retry: its connection errors,
        # BusyLoadingError included), at most 1 s apart.
        result_backend_always_retry=True,
        result_backend_max_retries=float("inf"),
        result_backend_max_sleep_between_retries_ms=1000,
        # Task events feed Flower and `celery events`; off by default: each job then costs
        # ~1.5 more Redis PUBLISHes (`celery worker -E` turns them on too). Worker events
        # (online, heartbeats) are sent either way.
        worker_send_task_events=settings.worker_events,
    )
    # STARTED and successes are stored by the task itself, in one round trip each; failures
    # by Celery (workers.delivery).
    app.task(
        name=TASK_NAME,
        bind=True,
        base=JobTask,
        settings=settings,
        backends=Backends(settings),
        track_started=False,
        ignore_result=True,
        store_errors_even_if_ignored=True,
    )(run_job)
    # A delivery of a job this worker is already running waits for that run (workers.consumer).
    app.steps["consumer"].add(HoldDuplicates)
    return app


def hard_time_limit_s(settings: Settings) -> float:
    """When a prefork job's process is killed: 30 s after its time limit (time to wind down,
    and for native code that ignores the soft limit's exception). Leases keep a running job
    from being handed to a second worker, however long it takes (``workers.leases``)."""
    return settings.job_time_limit_s + HARD_LIMIT_GRACE_S


def broker_transport_options(settings: Settings) -> dict[str, Any]:
    """kombu Redis transport options: its visibility timeout is only a backstop.

    A lost worker's jobs are requeued by leases (``workers.leases``), renewed by every live
    worker on each heartbeat, within ``SIBYLQ_VISIBILITY_TIMEOUT_S`` of its last one. kombu's
    own sweep (``QoS.restore_visible``) would requeue any job delivered longer ago than its
    timeout, live worker or not: it is set far past any job's end, where it only catches what
    leases could not (``Settings.broker_visibility_timeout_s``), at kombu's own pace.
    """
    return {"visibility_timeout": settings.broker_visibility_timeout_s}


class Observability:
    """Heartbeats, leases, metrics and the promoter of parked jobs, run by the worker's main
    process for its app.

    ``prepare`` comes at ``worker_init``, before the pool starts (prefork forks its children
    then): the metrics directory must exist by then for the children to write to it.
    ``start`` comes at ``worker_ready``, once the pool and the consumer run: the metrics
    server and the heartbeat start, the heartbeat carrying the port actually bound
    (``SIBYLQ_METRICS_PORT=0``). ``stop`` stops them, last started first.
    """

    def __init__(self, app: Celery, settings: Settings) -> None:
        self._app = app
        self._settings = settings
        self._exporter: WorkerMetrics | None = None
        self._running: list[WorkerMetrics | Heartbeat | LeaseKeeper | Promoter] = []

    def prepare(self) -> None:
        self._exporter = WorkerMetrics(self._settings)
        self._running.append(self._exporter)

    def start(self, worker: Any) -> None:
        queues = sorted(self._app.amqp.queues.consume_from.keys())
        pool, concurrency = describe_pool(worker.controller)
        port = None
        if self._exporter is not None:
            self._exporter.serve(queues, running=jobs_running, concurrency=concurrency)
            port = self._exporter.port
        beat = Heartbeat(
            self._settings,
            worker.hostname,
            queues,
            pool=pool,
            concurrency=concurrency,
            busy=jobs_running,
            metrics_port=port,
        )
        beat.beat()
        beat.start()
        leases = LeaseKeeper(self._app, self._settings)
        leases.start()
        promoter = Promoter(result_redis(self._settings), self._app)
        promoter.start()
        self._running.extend((beat, leases, promoter))

    def stop(self) -> None:
        while self._running:
            self._running.pop().stop()


# Celery's worker signals, connected once per process: each is handed to the app it is about.


def _observability(sender: Any) -> Observability | None:
    app = getattr(sender, "app", None)
    return app.observability if isinstance(app, WorkerApp) else None


@signals.worker_init.connect(weak=False, dispatch_uid="sibylq.worker_init")
def _prepare(sender: Any, **_: Any) -> None:
    if (observability := _observability(sender)) is not None:
        observability.prepare()


@signals.worker_ready.connect(weak=False, dispatch_uid="sibylq.worker_ready")
def _start(sender: Any, **_: Any) -> None:
    if (observability := _observability(sender)) is not None:
        observability.start(sender)


@signals.worker_shutdown.connect(weak=False, dispatch_uid="sibylq.worker_shutdown")
def _stop(sender: Any, **_: Any) -> None:
    if (observability := _observability(sender)) is not None:
        observability.stop()


@signals.worker_process_shutdown.connect(weak=False, dispatch_uid="sibylq.process_shutdown")
def _process_exit(pid: int | None = None, **_: Any) -> None:
    # In a prefork child, as it exits (not when it is killed).
    process_exited(pid if pid is not None else os.getpid())


def jobs_running() -> int:
    """Jobs this worker is running now: Celery's own count, kept in the main process (a
    prefork child reports each job it starts, and the main process drops it when it ends,
    the child dies or its time limit kills it; ``celery inspect active`` reads the same)."""
    return len(worker_state.active_requests)


def describe_pool(controller: Any) -> tuple[str, int]:
    """The pool's name (``prefork``, ``threads``, ``solo``...) and the jobs it runs at once."""
    module = type(controller.pool).__module__  # celery.concurrency.prefork, ...thread, ...
    name = module.rsplit(".", 1)[-1]
    name = {"thread": "threads"}.get(name, name)  # the names -P takes
    limit = getattr(controller.pool, "limit", None) or controller.concurrency
    return name, int(limit)
