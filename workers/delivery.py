"""A delivery's two trips to the result Redis: the check-in before the job runs, and the store
of its success. Each is one round trip.

The check-in (one Lua call):

- a job whose result is already stored is not run again: its message was redelivered after
  the job finished but before it was acknowledged (worker lost between the two, broker
  connection lost, visibility timeout); the delivery is dropped with ``Ignore`` (acked);
- ``sibylq:attempts:<job id>`` is incremented; past ``max_deliveries`` the job fails with
  ``BackendError`` instead of running: with ``task_reject_on_worker_lost`` a job that kills
  its process every time (a segfault or SIGILL in a native library, the OOM killer) would
  otherwise be redelivered forever, taking a pool process down each time;
- only then is STARTED stored (``task_track_started`` is off for this task: Celery would
  store STARTED before the task body runs, overwriting a stored FAILURE before the check
  above could see it);
- the answer cache's entry for the job (``wire.cache``) comes back with it.

A success is stored by the task itself (the task ignores its return value: Celery's backend
would read the key, then write it, then the cache entry would be a third trip): the result, its
announcement to waiters and the cache entry go in one Lua call. Failures are still stored by
Celery (``store_errors_even_if_ignored``), which also covers time limits and lost processes,
through the workers' result backend (``workers.results``). Both refuse to replace a final
result (``wire.outcome.STORE_UNLESS_FINAL``): when a job runs twice, the first result
stored wins, and its waiters never see another.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from celery import Task, states
from celery.exceptions import Ignore

from wire import cache as answers
from wire.constants import attempts_key, result_key
from wire.contract import Envelope, Failure, JobSpec
from wire.outcome import LUA_IS_FINAL, STORE_UNLESS_FINAL, failure_result, result_meta
from wire.settings import Settings

from . import metrics
from .store import script

log = logging.getLogger(__name__)

T = TypeVar("T")


class JobFailure(Exception):  # noqa: N818 - the name is part of the result contract
    """Carries a ``Failure`` (a JSON dict) to the result backend; the name is the contract."""

    def __init__(self, failure: dict[str, Any]) -> None:
        super().__init__(failure)


# KEYS: result, attempts[, cache entry]. ARGV: attempts expiry (s), max deliveries, STARTED
# meta (JSON), result expiry (s). Returns {stored result or false, attempts, 1 if already
# finished, cached answer or false}. STARTED is not PUBLISHed: waiters wake for final results
# only; job.status() reads the key.
_CHECK_IN = (
    LUA_IS_FINAL
    + """
local attempts = redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], ARGV[1])
local stored = redis.call('GET', KEYS[1])
if is_final(stored) then
  return {stored, attempts, 1, false}
end
if attempts <= tonumber(ARGV[2]) then
  redis.call('SET', KEYS[1], ARGV[3], 'EX', ARGV[4])
end
local cached = false
if KEYS[3] then
  cached = redis.call('GET', KEYS[3])
end
return {stored or false, attempts, 0, cached}
"""
)


def begin_delivery(
    task: Task[Any, Any], job_id: str, settings: Settings, spec: JobSpec | None
) -> Envelope | None:
    """Check in before running (see the module docstring): raises ``Ignore`` for a finished
    job, ``JobFailure`` for a job delivered too often, else stores STARTED and returns the
    cached answer to ``spec``, if the cache is on and holds one."""
    started = result_meta(job_id, states.STARTED, {"pid": os.getpid(), "hostname": host(task)})
    args = (settings.result_expires_s, settings.max_deliveries, started, settings.result_expires_s)
    keys = [result_key(job_id), attempts_key(job_id)]
    entry = answers.entry_key(spec) if settings.cache and spec is not None else None
    if entry is not None:
        keys.append(entry)
    check_in = script(settings, _CHECK_IN)
    stored, attempts, finished, cached = retrying(lambda: check_in(keys=keys, args=args))
    if attempts > 1:
        metrics.record_redelivery(settings, queue_of(task))
    if finished:
        log.warning("job %s already finished (%s): not running it again", job_id, _state(stored))
        raise Ignore()
    if attempts > settings.max_deliveries:
        raise JobFailure(_delivered_too_often(job_id, attempts, settings).encode())
    return None if spec is None or not cached else answers.decode_hit(cached, spec)


def store_success(job_id: str, spec: JobSpec, envelope: Envelope, settings: Settings) -> bool:
    """Store the job's result, wake its waiters and cache the answer, in one round trip;
    False (nothing stored) when the job already has a final result."""
    meta = result_meta(job_id, states.SUCCESS, envelope.encode())
    keys, args = [result_key(job_id)], [meta, settings.result_expires_s]
    cached = answers.entry(spec, envelope) if settings.cache else None
    if cached is not None:
        keys.append(cached[0])
        args += [cached[1], settings.cache_ttl_s]
    return _store_unless_final(keys, args, settings)


def store_failure(job_id: str, failure: Failure, settings: Settings) -> bool:
    """Store ``failure`` as the job's result and wake its waiters, unless the job already has
    a final result (then False)."""
    meta = result_meta(job_id, states.FAILURE, failure_result(failure))
    return _store_unless_final([result_key(job_id)], [meta, settings.result_expires_s], settings)


def _store_unless_final(keys: list[str], args: list[Any], settings: Settings) -> bool:
    store = script(settings, STORE_UNLESS_FINAL)
    stored = bool(retrying(lambda: store(keys=keys, args=args)))
    if not stored:
        log.warning("job %s already has a final result: keeping it", keys[0])
    return stored


def retrying(operation: Callable[[], T]) -> T:
    """Run a Redis operation until Redis answers: like Celery's result store
    (``result_backend_always_retry``), a job waits out a Redis outage rather than fail or be
    lost."""
    pause = 0.05
    while True:
        try:
            return operation()
        except (redis.ConnectionError, redis.TimeoutError) as exc:  # also BusyLoadingError
            log.warning("result Redis unreachable (%s); retrying in %.2fs", exc, pause)
            time.sleep(pause)
            pause = min(pause * 2, 1.0)


def queue_of(task: Task[Any, Any]) -> str:
    """The queue a delivery came from (its routing key: sibylq sends each job to the queue
    of the same name)."""
    info = task.request.delivery_info or {}
    return str(info.get("routing_key") or "unknown")


def host(task: Task[Any, Any]) -> str:
    return task.request.hostname or "unknown"


def _delivered_too_often(job_id: str, attempts: int, settings: Settings) -> Failure:
    return Failure(
        type="BackendError",
        message=(
            f"job {job_id} was delivered {attempts - 1} times and its worker process "
            "died each time; not running it again (SIBYLQ_MAX_DELIVERIES="
            f"{settings.max_deliveries}). A crash in the model backend (out of memory, "
            "a native library fault) is the usual cause: see the worker logs."
        ),
    )


def _state(stored: Any) -> str | None:
    if not stored:
        return None
    try:
        meta = json.loads(stored)
    except ValueError:
        return None
    return meta.get("status") if isinstance(meta, dict) else None
