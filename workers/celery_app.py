"""The workers' Celery app: JSON only, late acks, one prefetched job, heartbeats."""

from __future__ import annotations

from typing import Any

from celery import Celery, signals

from producer.constants import TASK_NAME
from producer.settings import Settings, get_settings

from .heartbeat import Heartbeat
from .task import run_job


def create_app(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    app = Celery("sibylq", broker=settings.broker_url, backend=settings.result_url)
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
        task_track_started=True,
        task_soft_time_limit=settings.job_time_limit_s,
        task_time_limit=settings.job_time_limit_s + 30,
        # Redis redelivers an unacked job after the visibility timeout, live worker or not:
        # it must outlast the longest job (Settings checks it does).
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        broker_connection_retry_on_startup=True,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        result_backend_always_retry=True,
        result_backend_max_sleep_between_retries_ms=1000,
    )
    app.task(name=TASK_NAME, bind=True)(run_job)
    _attach_heartbeat(app, settings)
    return app


def _attach_heartbeat(app: Celery, settings: Settings) -> None:
    beats: list[Heartbeat] = []

    @signals.worker_ready.connect(weak=False)
    def start(sender: Any, **_: Any) -> None:
        if sender.app is not app:
            return
        beat = Heartbeat(settings, sender.hostname, app.amqp.queues.consume_from.keys())
        beat.beat()
        beat.start()
        beats.append(beat)

    @signals.worker_shutdown.connect(weak=False)
    def stop(sender: Any, **_: Any) -> None:
        while beats:
            beats.pop().stop()
