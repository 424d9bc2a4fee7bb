"""The one Celery task: decode a job, run it on this process's backend, store the envelope.

Every delivery first checks in with the result Redis, in one MULTI/EXEC (``begin_delivery``):

- a job whose result is already stored is not run again: its message was redelivered after
  the job finished but before it was acknowledged (worker lost between the two, broker
  connection lost, visibility timeout); the delivery is dropped with ``Ignore`` (acked);
- ``sibylq:attempts:<job id>`` is incremented; past ``max_deliveries`` the job fails with
  ``BackendError`` instead of running: with ``task_reject_on_worker_lost`` a job that kills
  its process every time (a segfault or SIGILL in a native library, the OOM killer) would
  otherwise be redelivered forever, taking a pool process down each time;
- only then is STARTED stored (``task_track_started`` is off for this task: Celery would
  store STARTED before the task body runs, overwriting a stored FAILURE before the check
  above could see it).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import cache
from typing import Any, TypeVar

import redis
from celery import Task, states
from celery.exceptions import Ignore

from producer.constants import FAILURES_RETENTION_S, attempts_key, failures_key, result_key
from producer.contract import Envelope, Failure, JobSpec, Usage
from producer.errors import JobFailedError, SibylqError
from producer.modelref import parse_model_ref
from producer.outcome import FAILURE_CARRIER
from producer.settings import Settings, get_settings

from . import metrics
from .backends import Backend, create_backend
from .execute import execute

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Stored states after which a job never runs again.
FINAL_STATES = frozenset({states.SUCCESS, states.FAILURE, states.REVOKED})


class JobFailure(Exception):  # noqa: N818 - the name is part of the result contract
    """Carries a ``Failure`` (a JSON dict) to the result backend; the name is the contract."""

    def __init__(self, failure: dict[str, Any]) -> None:
        super().__init__(failure)


assert JobFailure.__name__ == FAILURE_CARRIER


@cache
def backend_for(provider: str, settings: Settings) -> Backend:
    """One backend per provider per worker process: models and HTTP clients load once."""
    return create_backend(provider, settings)


def run_job(task: Task[Any, Any], payload: dict[str, Any]) -> dict[str, Any]:
    """Celery entry point. Known failures become a JobFailure the producer can type.

    Every outcome is counted: in the worker's metrics (``workers.metrics``) and, for
    failures, per queue and minute in Redis (``count_failure``, read by ``sibylq status``).
    """
    settings = get_settings()
    run = _Run(settings, queue=queue_of(task))
    try:
        if task.request.id:
            begin_delivery(task, task.request.id, settings)
        envelope = run.execute(payload, worker=task.request.hostname or "unknown")
    except Ignore:
        run.finish("skipped")
        raise
    except JobFailure as exc:
        failure = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
        run.failed(str(failure.get("type", "JobFailure")))
        raise
    except SibylqError as exc:
        run.failed(type(exc).__name__)
        raise JobFailure(_failure(exc).encode()) from exc
    except Exception as exc:  # a soft time limit, a bug: Celery stores it as the failure
        run.failed(type(exc).__name__)
        raise
    run.finish("succeeded", usage=envelope.usage)
    return envelope.encode()


class _Run:
    """One delivery's bookkeeping for the metrics and the failure counts."""

    def __init__(self, settings: Settings, queue: str) -> None:
        self.settings = settings
        self.queue = queue
        self.model = "unknown"  # until the job decodes
        self.duration_s: float | None = None

    def execute(self, payload: dict[str, Any], worker: str) -> Envelope:
        spec = JobSpec.decode(payload)
        self.model = spec.model
        created = spec.created_at
        created = created if created.tzinfo is not None else created.replace(tzinfo=UTC)
        wait_s = (datetime.now(UTC) - created).total_seconds()
        metrics.record_started(self.settings, model=self.model, queue=self.queue, wait_s=wait_s)
        started = time.monotonic()
        try:
            backend = backend_for(parse_model_ref(spec.model).provider, self.settings)
            return execute(spec, backend, worker=worker)
        finally:
            self.duration_s = time.monotonic() - started

    def finish(self, status: str, *, error: str | None = None, usage: Usage | None = None) -> None:
        metrics.record_job(
            self.settings,
            model=self.model,
            queue=self.queue,
            status=status,
            error=error,
            duration_s=self.duration_s,
            usage=usage,
        )

    def failed(self, error: str) -> None:
        self.finish("failed", error=error)
        count_failure(self.settings, self.queue)


def queue_of(task: Task[Any, Any]) -> str:
    """The queue a delivery came from (its routing key: sibylq sends each job to the queue
    of the same name)."""
    info = task.request.delivery_info or {}
    return str(info.get("routing_key") or "unknown")


def count_failure(settings: Settings, queue: str) -> None:
    """Count a failure on ``queue`` for this minute, for ``sibylq status``. Best effort: a
    count lost to a Redis outage never changes the job's outcome."""
    key = failures_key(queue, int(time.time() // 60))
    try:
        with _redis(settings.result_url).pipeline(transaction=False) as pipe:
            pipe.incr(key)
            pipe.expire(key, FAILURES_RETENTION_S)
            pipe.execute()
    except redis.RedisError as exc:
        log.warning("cannot count a failure on %s in Redis: %s", queue, exc)


def _failure(exc: SibylqError) -> Failure:
    if isinstance(exc, JobFailedError):
        return Failure(
            type=type(exc).__name__,
            message=str(exc),
            raw_text=exc.raw_text,
            finish_reason=exc.finish_reason,
            usage=Usage(),
        )
    return Failure(type=type(exc).__name__, message=str(exc))


def begin_delivery(task: Task[Any, Any], job_id: str, settings: Settings) -> None:
    """Check in before running: raises ``Ignore`` for a finished job, ``JobFailure`` for a
    job delivered too often, else stores STARTED (see the module docstring)."""
    client = _redis(settings.result_url)
    key = attempts_key(job_id)

    def check_in() -> list[Any]:
        with client.pipeline(transaction=True) as pipe:
            pipe.get(result_key(job_id))
            pipe.incr(key)
            pipe.expire(key, settings.result_expires_s)
            return pipe.execute()

    stored, attempts, _ = _retrying(check_in)
    if attempts > 1:
        metrics.record_redelivery(settings, queue_of(task))
    state = _stored_state(stored)
    if state in FINAL_STATES:
        log.warning("job %s already finished (%s): not running it again", job_id, state)
        raise Ignore()
    if attempts > settings.max_deliveries:
        raise JobFailure(
            Failure(
                type="BackendError",
                message=(
                    f"job {job_id} was delivered {attempts - 1} times and its worker process "
                    "died each time; not running it again (SIBYLQ_MAX_DELIVERIES="
                    f"{settings.max_deliveries}). A crash in the model backend (out of memory, "
                    "a native library fault) is the usual cause: see the worker logs."
                ),
            ).encode()
        )
    # Celery's own STARTED meta, which job.status() and the tests read.
    task.update_state(state=states.STARTED, meta={"pid": os.getpid(), "hostname": _host(task)})


@cache
def _redis(url: str) -> redis.Redis:
    # One client per process and URL; redis-py's pool reconnects after a fork by itself.
    return redis.Redis.from_url(
        url, client_name="sibylq-worker", socket_connect_timeout=5, socket_timeout=30
    )


def _retrying(operation: Callable[[], T]) -> T:
    """Run a Redis operation until Redis answers: like the result store (workers.celery_app),
    a job waits out a Redis outage rather than fail or be lost."""
    pause = 0.05
    while True:
        try:
            return operation()
        except (redis.ConnectionError, redis.TimeoutError) as exc:  # also BusyLoadingError
            log.warning("result Redis unreachable (%s); retrying in %.2fs", exc, pause)
            time.sleep(pause)
            pause = min(pause * 2, 1.0)


def _stored_state(stored: Any) -> str | None:
    if not stored:
        return None
    try:
        meta = json.loads(stored)
    except ValueError:
        return None
    return meta.get("status") if isinstance(meta, dict) else None


def _host(task: Task[Any, Any]) -> str:
    return task.request.hostname or "unknown"
