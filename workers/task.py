"""The one Celery task: decode a job, run it on this process's backend, store the envelope.

Every delivery first checks in with the result Redis (``workers.delivery``): a finished job
is not run again, a job that keeps killing its process is failed, STARTED is stored, and the
answer cache's entry comes back. A job for a model this worker was not started for fails
(``ConfigurationError``). Then the job runs (``workers.execute``), unless the cache already
held its answer, and its success is stored in one more round trip, unless a first run of the
same job stored its result already (the first result wins). A backend's
``RetryLater`` parks the job in Redis (``workers.parking``): the message is acked, the stored
state becomes RETRY, and a promoter re-enqueues it when due, carrying the tokens and outputs of
its attempts so far. A job that finally fails is stored as a FAILURE and kept as a dead letter
(``wire.deadletters``) for ``sibylq failed`` and ``sibylq retry``; a payload that is not a
job is kept as received (messages that are not even Celery's are set aside before any task
runs: ``workers.intake``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from datetime import UTC, datetime
from typing import Any

import redis
from celery import Task, states
from celery.exceptions import Ignore, SoftTimeLimitExceeded
from celery.worker import state as worker_state

from wire import deadletters
from wire.constants import FAILURES_RETENTION_S, failures_key
from wire.contract import Envelope, Failure, JobSpec, Usage
from wire.deadletters import DeadLetter, RawMessage
from wire.errors import (
    BackendError,
    ConfigurationError,
    JobCancelledError,
    JobFailedError,
    SibylqError,
)
from wire.modelref import parse_model_ref, serves
from wire.settings import Settings

from . import metrics
from .backends import Backend, Deadline, RetryLater, create_backend
from .delivery import JobFailure, begin_delivery, host, queue_of, retrying, store_success
from .execute import Progress, execute
from .parking import Parked, backoff_s, delay_after, park
from .redacting import redacted_failure
from .store import result_redis

log = logging.getLogger(__name__)


class Backends:
    """This worker process's backends, one per provider, each built on first use from the
    worker's settings: models and HTTP clients load once per process."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._built: dict[str, Backend] = {}
        self._lock = threading.Lock()

    def for_provider(self, provider: str) -> Backend:
        with self._lock:
            if provider not in self._built:
                self._built[provider] = create_backend(provider, self._settings)
            return self._built[provider]


class JobTask(Task[Any, Any]):
    """The class of the one task: it owns the worker's settings and backends (given by
    ``workers.celery_app.create_app``), so a job reads no process-wide state."""

    settings: Settings
    backends: Backends


def run_job(task: JobTask, payload: dict[str, Any], carry: dict[str, Any] | None = None) -> None:
    """Celery entry point. Known failures become a JobFailure the producer can type, and a
    dead letter (``wire.deadletters``); a job to retry later is parked (``workers.parking``).

    ``carry`` is what earlier attempts of a parked job left (``workers.execute.Progress``).
    Every outcome is counted: in the worker's metrics (``workers.metrics``) and, for
    failures, per queue and minute in Redis (``count_failure``, read by ``sibylq status``).
    """
    run = _Run(task, payload, Progress.decode(carry))
    job_id = task.request.id
    try:
        cached = begin_delivery(task, job_id, run.settings, run.job()) if job_id else None
        spec, envelope = run.execute(cached)
    except Ignore:
        run.finish("skipped")
        raise
    except RetryLater as exc:
        raise run.retry_later(exc) from None
    except JobCancelledError:  # revoked while it ran, and ended by its backend
        if job_id:
            task.backend.mark_as_revoked(job_id, "revoked while it ran")
        run.finish("revoked")
        raise Ignore() from None
    except JobFailure as exc:
        raise run.failed(Failure.decode(exc.args[0])) from None
    except SibylqError as exc:
        raise run.failed(_failure(exc, run.progress)) from exc
    except SoftTimeLimitExceeded:  # prefork's own limit, the same as run.deadline
        raise run.failed(_failure(run.deadline.error(), run.progress)) from None
    except Exception as exc:  # a bug: Celery stores it as the failure
        run.failed(Failure(type=type(exc).__name__, message=str(exc)))
        raise
    if job_id and not store_success(job_id, spec, envelope, run.settings):
        run.finish("skipped", usage=envelope.usage)  # a first run's result was kept
        return
    run.finish("succeeded", usage=envelope.usage)


class _Run:
    """One delivery: its job, its progress, and its bookkeeping (metrics, failure counts,
    dead letters, parking)."""

    def __init__(self, task: JobTask, payload: dict[str, Any], progress: Progress) -> None:
        self.settings = task.settings
        self.task = task
        self.payload = payload
        self.progress = progress
        self.queue = queue_of(task)
        self.model = "unknown"  # until the job decodes
        self.spec: JobSpec | None = None
        self.duration_s: float | None = None
        self.deadline = Deadline.after(self.settings.job_time_limit_s)

    def execute(self, cached: Envelope | None) -> tuple[JobSpec, Envelope]:
        spec = self.spec = self.spec or JobSpec.decode(self.payload)  # decoded at check-in
        self.model = spec.model
        refuse_unserved(spec, self.settings, host(self.task), self.queue)
        created = spec.created_at
        created = created if created.tzinfo is not None else created.replace(tzinfo=UTC)
        wait_s = (datetime.now(UTC) - created).total_seconds()
        metrics.record_started(self.settings, model=self.model, queue=self.queue, wait_s=wait_s)
        started = time.monotonic()
        try:
            return spec, self._answer(spec, cached)
        finally:
            self.duration_s = time.monotonic() - started

    def _answer(self, spec: JobSpec, cached: Envelope | None) -> Envelope:
        worker = host(self.task)
        if cached is not None:
            return cached.model_copy(update={"worker": worker})
        backend = self.task.backends.for_provider(parse_model_ref(spec.model).provider)
        reask_max = self.settings.reask_max
        job_id = self.task.request.id
        return execute(
            spec,
            backend,
            worker,
            self.progress,
            reask_max,
            self.deadline,
            cancelled=lambda: job_id in worker_state.revoked,
            job_id=job_id,
        )

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

    def failed(self, failure: Failure) -> JobFailure:
        """Count the failure, record the dead letter; the carrier to raise."""
        failure = redacted_failure(failure, self.settings)
        self.finish("failed", error=failure.type, usage=failure.usage)
        count_failure(self.settings, self.queue)
        record_dead_letter(self.task, self.job(), self.payload, failure, self.settings)
        return JobFailure(failure.encode())

    def job(self) -> JobSpec | None:
        """The job, decoded once (a delivery can fail before it ran: poison jobs)."""
        if self.spec is None:
            try:
                self.spec = JobSpec.decode(self.payload)
            except SibylqError:
                return None
        return self.spec

    def retry_later(self, signal: RetryLater) -> Exception:
        """Park the job for its retry (``Ignore``: acked, no result stored), or fail it when
        its retries are used up."""
        if signal.counts:
            self.progress.retries += 1
        retries, allowed = self.progress.retries, self.settings.openai_max_retries
        if retries > allowed:
            return self.failed(
                _failure(
                    BackendError(
                        f"{signal.reason}; gave up after {allowed} retries "
                        "(SIBYLQ_OPENAI_MAX_RETRIES)"
                    ),
                    self.progress,
                )
            )
        if signal.delay_s is not None:
            delay_s = delay_after(signal.delay_s)
        else:
            delay_s = backoff_s(retries, self.settings)
        parked = Parked(
            job_id=self.task.request.id or "",
            queue=self.queue,
            priority=priority_of(self.task),
            payload=self.payload,
            progress=self.progress.encode(),
            reason=signal.reason,
        )
        retrying(lambda: park(parked, delay_s, self.settings))
        # Celery stores RETRY like a failure: an exception, type and message as strings.
        waiting = RetryLater(f"{signal.reason}; retry {retries} in {delay_s:.2f} s")
        self.task.update_state(state=states.RETRY, meta=waiting)  # type: ignore[arg-type]
        self.finish("retrying" if signal.counts else "deferred")
        return Ignore()


def priority_of(task: Task[Any, Any]) -> int:
    """The delivery's priority (its lane: ``LANE_PRIORITIES``)."""
    info = task.request.delivery_info or {}
    return int(info.get("priority") or 0)


def refuse_unserved(spec: JobSpec, settings: Settings, worker: str, queue: str) -> None:
    """Raise ``ConfigurationError`` for a job whose model this worker was not started for
    (``sibylq worker MODEL``): a ``fake`` job sent to an ``openai`` worker's queue must not
    run there. A worker started by plain ``celery worker`` names no model and runs any."""
    if settings.worker_model is None or serves(settings.worker_model, spec.model):
        return
    raise ConfigurationError(
        f"worker {worker} serves {settings.worker_model}, not {spec.model}: the job came from "
        f"queue {queue}; send it to a queue that {spec.model} workers consume (by default "
        f"`sibylq queue {spec.model}`)"
    )


def record_dead_letter(
    task: Task[Any, Any],
    job: JobSpec | None,
    payload: Any,
    failure: Failure,
    settings: Settings,
) -> None:
    """Keep a finally failed job for ``sibylq failed`` / ``sibylq retry``; a payload that is
    no job is kept as received. Best effort: the failure itself is stored as the job's result
    whatever happens here."""
    queue, priority, worker = queue_of(task), priority_of(task), host(task)
    if job is not None:
        letter = DeadLetter(
            job_id=task.request.id or "",
            queue=queue,
            priority=priority,
            job=job,
            failure=failure,
            failed_at=datetime.now(UTC),
            worker=worker,
        )
    else:  # Celery decoded it from JSON (within workers.intake.MAX_NESTING): it encodes again
        letter = DeadLetter.undecodable(
            job_id=task.request.id,
            queue=queue,
            priority=priority,
            message=RawMessage.of(json.dumps(payload).encode(), failure.message),
            failure=failure,
            worker=worker,
        )
    try:
        deadletters.record(result_redis(settings), letter, settings.dead_letters_expire_s)
    except redis.RedisError as exc:
        log.warning("cannot record dead letter %s: %s", letter.job_id, exc)


def count_failure(settings: Settings, queue: str) -> None:
    """Count a failure on ``queue`` for this minute, for ``sibylq status``. Best effort: a
    count lost to a Redis outage never changes the job's outcome."""
    key = failures_key(queue, int(time.time() // 60))
    try:
        with result_redis(settings).pipeline(transaction=False) as pipe:
            pipe.incr(key)
            pipe.expire(key, FAILURES_RETENTION_S)
            pipe.execute()
    except redis.RedisError as exc:
        log.warning("cannot count a failure on %s in Redis: %s", queue, exc)


def _failure(exc: SibylqError, progress: Progress) -> Failure:
    raw_outputs = tuple(progress.raw_outputs)
    if isinstance(exc, JobFailedError):
        return Failure(
            type=type(exc).__name__,
            message=str(exc),
            raw_text=exc.raw_text if exc.raw_text is not None else (raw_outputs or (None,))[-1],
            finish_reason=exc.finish_reason,
            usage=progress.usage,
            raw_outputs=exc.raw_outputs or raw_outputs,
            attempts=progress.calls,
        )
    return Failure(
        type=type(exc).__name__,
        message=str(exc),
        usage=progress.usage,
        raw_outputs=raw_outputs,
        attempts=progress.calls,
    )
