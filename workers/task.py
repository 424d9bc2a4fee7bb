"""The one Celery task: decode a job, run it on this process's backend, store the envelope.

Every delivery first checks in with the result Redis, in one Lua call (``begin_delivery``):

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

Then the job runs (``workers.execute``), unless the answer cache (``producer.cache``) already
holds it. A backend's ``RetryLater`` parks the job in Redis (``workers.parking``): the message
is acked, the stored state becomes RETRY, and a promoter re-enqueues it when due, carrying the
tokens and outputs of its attempts so far. A job that finally fails is stored as a FAILURE and
kept as a dead letter (``producer.deadletters``) for ``sibylq failed`` and ``sibylq retry``.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import redis
from celery import Task, states
from celery.exceptions import Ignore

from producer import cache as answers
from producer import deadletters
from producer.constants import FAILURES_RETENTION_S, attempts_key, failures_key, result_key
from producer.contract import Envelope, Failure, JobSpec, Usage
from producer.deadletters import DeadLetter
from producer.errors import BackendError, JobFailedError, SibylqError
from producer.modelref import parse_model_ref
from producer.outcome import FAILURE_CARRIER, result_meta
from producer.settings import Settings, get_settings

from . import metrics
from .backends import Backend, RetryLater, create_backend
from .execute import Progress, execute
from .parking import Parked, backoff_s, delay_after, park
from .store import result_redis, script

log = logging.getLogger(__name__)

T = TypeVar("T")


class JobFailure(Exception):  # noqa: N818 - the name is part of the result contract
    """Carries a ``Failure`` (a JSON dict) to the result backend; the name is the contract."""

    def __init__(self, failure: dict[str, Any]) -> None:
        super().__init__(failure)


assert JobFailure.__name__ == FAILURE_CARRIER


_backends: dict[str, Backend] = {}
_backends_lock = threading.Lock()


def backend_for(provider: str, settings: Settings) -> Backend:
    """One backend per provider per worker process: models and HTTP clients load once.
    (``settings`` are the process's own: they never change within it.)"""
    with _backends_lock:
        if provider not in _backends:
            _backends[provider] = create_backend(provider, settings)
        return _backends[provider]


def run_job(
    task: Task[Any, Any], payload: dict[str, Any], carry: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Celery entry point. Known failures become a JobFailure the producer can type, and a
    dead letter (``producer.deadletters``); a job to retry later is parked (``workers.parking``).

    ``carry`` is what earlier attempts of a parked job left (``workers.execute.Progress``).
    Every outcome is counted: in the worker's metrics (``workers.metrics``) and, for
    failures, per queue and minute in Redis (``count_failure``, read by ``sibylq status``).
    """
    run = _Run(task, payload, Progress.decode(carry))
    try:
        if task.request.id:
            begin_delivery(task, task.request.id, run.settings)
        envelope = run.execute()
    except Ignore:
        run.finish("skipped")
        raise
    except RetryLater as exc:
        raise run.retry_later(exc) from None
    except JobFailure as exc:
        raise run.failed(Failure.decode(exc.args[0])) from None
    except SibylqError as exc:
        raise run.failed(_failure(exc, run.progress)) from exc
    except Exception as exc:  # a soft time limit, a bug: Celery stores it as the failure
        run.failed(Failure(type=type(exc).__name__, message=str(exc)))
        raise
    run.finish("succeeded", usage=envelope.usage)
    return envelope.encode()


class _Run:
    """One delivery: its job, its progress, and its bookkeeping (metrics, failure counts,
    dead letters, parking)."""

    def __init__(self, task: Task[Any, Any], payload: dict[str, Any], progress: Progress) -> None:
        self.settings = get_settings()
        self.task = task
        self.payload = payload
        self.progress = progress
        self.queue = queue_of(task)
        self.model = "unknown"  # until the job decodes
        self.spec: JobSpec | None = None
        self.duration_s: float | None = None

    def execute(self) -> Envelope:
        spec = self.spec = JobSpec.decode(self.payload)
        self.model = spec.model
        created = spec.created_at
        created = created if created.tzinfo is not None else created.replace(tzinfo=UTC)
        wait_s = (datetime.now(UTC) - created).total_seconds()
        metrics.record_started(self.settings, model=self.model, queue=self.queue, wait_s=wait_s)
        started = time.monotonic()
        try:
            return self._answer(spec)
        finally:
            self.duration_s = time.monotonic() - started

    def _answer(self, spec: JobSpec) -> Envelope:
        worker = _host(self.task)
        store = result_redis(self.settings) if self.settings.cache else None
        cached = None if store is None else answers.lookup(store, spec)
        if cached is not None:
            return cached.model_copy(update={"worker": worker})
        backend = backend_for(parse_model_ref(spec.model).provider, self.settings)
        envelope = execute(spec, backend, worker, self.progress, self.settings.reask_max)
        if store is not None:
            answers.store(store, spec, envelope, self.settings.cache_ttl_s)
        return envelope

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
        self.finish("failed", error=failure.type, usage=failure.usage)
        count_failure(self.settings, self.queue)
        job = self._job()
        if job is not None:  # a malformed message is no job: nothing to retry
            record_dead_letter(self.task, job, failure, self.settings)
        return JobFailure(failure.encode())

    def _job(self) -> JobSpec | None:
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
        _retrying(lambda: park(parked, delay_s, self.settings))
        # Celery stores RETRY like a failure: an exception, type and message as strings.
        waiting = RetryLater(f"{signal.reason}; retry {retries} in {delay_s:.2f} s")
        self.task.update_state(state=states.RETRY, meta=waiting)  # type: ignore[arg-type]
        self.finish("retrying" if signal.counts else "deferred")
        return Ignore()


def queue_of(task: Task[Any, Any]) -> str:
    """The queue a delivery came from (its routing key: sibylq sends each job to the queue
    of the same name)."""
    info = task.request.delivery_info or {}
    return str(info.get("routing_key") or "unknown")


def priority_of(task: Task[Any, Any]) -> int:
    """The delivery's priority (its lane: ``LANE_PRIORITIES``)."""
    info = task.request.delivery_info or {}
    return int(info.get("priority") or 0)


def record_dead_letter(
    task: Task[Any, Any], job: JobSpec, failure: Failure, settings: Settings
) -> None:
    """Keep a finally failed job for ``sibylq failed`` / ``sibylq retry``. Best effort: the
    failure itself is stored as the job's result whatever happens here."""
    letter = DeadLetter(
        job_id=task.request.id or "",
        queue=queue_of(task),
        priority=priority_of(task),
        job=job,
        failure=failure,
        failed_at=datetime.now(UTC),
        worker=_host(task),
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


# KEYS: result, attempts. ARGV: attempts expiry (s), max deliveries, STARTED meta (JSON),
# result expiry (s). Returns {stored result or false, attempts, 1 if already finished}.
# STARTED is not PUBLISHed: waiters wake for final results only; job.status() reads the key.
_CHECK_IN = """
local attempts = redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], ARGV[1])
local stored = redis.call('GET', KEYS[1])
if stored then
  local ok, meta = pcall(cjson.decode, stored)
  if ok and type(meta) == 'table' and (meta.status == 'SUCCESS' or meta.status == 'FAILURE'
      or meta.status == 'REVOKED') then
    return {stored, attempts, 1}
  end
end
if attempts <= tonumber(ARGV[2]) then
  redis.call('SET', KEYS[1], ARGV[3], 'EX', ARGV[4])
end
return {stored or false, attempts, 0}
"""


def begin_delivery(task: Task[Any, Any], job_id: str, settings: Settings) -> None:
    """Check in before running, in one Lua call (one round trip): raises ``Ignore`` for a
    finished job, ``JobFailure`` for a job delivered too often, else stores STARTED as
    Celery's backend would (see the module docstring)."""
    started = result_meta(job_id, states.STARTED, {"pid": os.getpid(), "hostname": _host(task)})
    args = (settings.result_expires_s, settings.max_deliveries, started, settings.result_expires_s)
    check_in = script(settings, _CHECK_IN)
    stored, attempts, finished = _retrying(
        lambda: check_in(keys=[result_key(job_id), attempts_key(job_id)], args=args)
    )
    if attempts > 1:
        metrics.record_redelivery(settings, queue_of(task))
    if finished:
        state = _stored_state(stored)
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
