"""The workers' Celery app: JSON only, late acks, one prefetched job, heartbeats, metrics."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery, signals
from celery.worker import state as worker_state

from wire.constants import TASK_NAME
from wire.settings import Settings, get_settings

from .heartbeat import Heartbeat
from .metrics import WorkerMetrics, process_exited
from .parking import Promoter
from .store import result_redis
from .task import run_job


def create_app(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    app = Celery("sibylq", broker=settings.broker, backend=settings.result_url)
    app.conf.update(
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
        task_soft_time_limit=settings.job_time_limit_s,
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
        track_started=False,
        ignore_result=True,
        store_errors_even_if_ignored=True,
    )(run_job)
    _attach_observability(app, settings)
    return app


def hard_time_limit_s(settings: Settings) -> float:
    """When a job's process is killed: 30 s after its soft limit (time to wind down, and for
    native code that ignores the soft limit's exception), but always before its message
    outlives the visibility timeout, which would hand it to a second worker while it runs."""
    grace_s = min(30.0, (settings.visibility_timeout_s - settings.job_time_limit_s) / 2)
    return settings.job_time_limit_s + grace_s


def broker_transport_options(settings: Settings) -> dict[str, Any]:
    """kombu Redis transport options: the visibility timeout, and how soon a live worker
    requeues the jobs of a worker that vanished.

    Redis redelivers an unacked job after the visibility timeout, live worker or not: it must
    outlast the longest job (Settings checks it does). kombu requeues expired jobs only in a
    periodic sweep (``QoS.restore_visible``) that by default runs every 10 s but scans Redis
    only on every 10th run: ~100 s late, whatever the timeout. Scan every run, and run at
    most a tenth of the timeout apart (1..10 s), so a lost worker's jobs run again within
    about ``visibility_timeout_s`` + 10 s.
    """
    timeout = settings.visibility_timeout_s
    sweep_s = max(1, min(10, timeout // 10))
    return {
        "visibility_timeout": timeout,
        "unacked_restore_interval": sweep_s,
        "unacked_restore_throttle": 1,
        # A sweep holds a Redis lock (default expiry 300 s): a worker killed while holding it
        # would stall every other worker's sweeps that long. Sweeps take milliseconds, and
        # two at once are safe (each requeue is a WATCH/MULTI transaction).
        "unacked_mutex_expire": 3 * sweep_s + 5,
    }


def _attach_observability(app: Celery, settings: Settings) -> None:
    """Heartbeats, metrics and the promoter of parked jobs, run by the worker's main process.

    ``worker_init`` comes before the pool starts (prefork forks its children then): the
    metrics directory must exist by then for the children to write to it. ``worker_ready``
    comes once the pool and the consumer run: the metrics server and the heartbeat start,
    the heartbeat carrying the port actually bound (``SIBYLQ_METRICS_PORT=0``).
    """
    exporters: list[WorkerMetrics] = []
    running: list[WorkerMetrics | Heartbeat | Promoter] = []  # stopped last to first

    @signals.worker_init.connect(weak=False)
    def prepare(sender: Any, **_: Any) -> None:
        if sender.app is app:
            exporters.append(WorkerMetrics(settings))
            running.append(exporters[-1])

    @signals.worker_ready.connect(weak=False)
    def start(sender: Any, **_: Any) -> None:
        if sender.app is not app:
            return
        queues = sorted(app.amqp.queues.consume_from.keys())
        pool, concurrency = describe_pool(sender.controller)
        port = None
        if exporters:
            exporters[-1].serve(queues, running=jobs_running, concurrency=concurrency)
            port = exporters[-1].port
        beat = Heartbeat(
            settings,
            sender.hostname,
            queues,
            pool=pool,
            concurrency=concurrency,
            busy=jobs_running,
            metrics_port=port,
        )
        beat.beat()
        beat.start()
        promoter = Promoter(result_redis(settings), app)
        promoter.start()
        running.extend((beat, promoter))

    @signals.worker_shutdown.connect(weak=False)
    def stop(sender: Any, **_: Any) -> None:
        while running:
            running.pop().stop()

    @signals.worker_process_shutdown.connect(weak=False)
    def process_exit(pid: int | None = None, **_: Any) -> None:
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
