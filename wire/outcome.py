"""Turn a stored Celery result into an Envelope, or into the typed error it stands for."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import redis

from .constants import result_key
from .contract import Envelope, Failure
from .errors import (
    REMOTE_FAILURES,
    ContractError,
    JobCancelledError,
    JobFailedError,
)

#: The exception type the worker raises to carry a Failure (see workers.task).
FAILURE_CARRIER = "JobFailure"

#: Celery's states after which a job never changes again.
READY = ("SUCCESS", "FAILURE", "REVOKED")

#: Lua: ``is_final(stored)``, whether a result key's value holds one of the ``READY`` states.
#: Every script that must not touch a finished job starts with it.
LUA_IS_FINAL = """
local function is_final(stored)
  if not stored then return false end
  local ok, meta = pcall(cjson.decode, stored)
  return ok and type(meta) == 'table' and ({})
end
""".format(" or ".join(f"meta.status == '{state}'" for state in READY))

#: Lua: store a job's state unless a final one is stored already, and announce it on the job's
#: channel. The first final result stored wins: a second run of the same job (a redelivery
#: racing the first run) can neither replace it nor wake its waiters with another value.
#: KEYS: result[, cache entry]. ARGV: meta (JSON), expiry (s, 0: none)[, cache value, cache
#: expiry (s)]. Returns 1 when stored, 0 when a final state was already there. Every write of a
#: result goes through it: ``workers.delivery`` (successes) and the workers' Celery result
#: backend (failures, RETRY).
STORE_UNLESS_FINAL = (
    LUA_IS_FINAL
    + """
if is_final(redis.call('GET', KEYS[1])) then
  return 0
end
if tonumber(ARGV[2]) > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
if KEYS[2] then
  redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[4])
end
return 1
"""
)


def result_meta(job_id: str, status: str, result: Any) -> str:
    """A result as Celery's Redis backend stores it (for results sibylq writes itself)."""
    done = datetime.now(UTC).isoformat() if status in READY else None
    return json.dumps(
        {
            "status": status,
            "result": result,
            "traceback": None,
            "children": [],
            "date_done": done,
            "task_id": job_id,
        }
    )


def stage_success(pipe: redis.client.Pipeline, job_id: str, result: Any, expires_s: int) -> None:
    """Add to ``pipe`` what storing a success takes: the result, as Celery's backend stores it,
    and its announcement on the job's channel (the waiters' wake-up call)."""
    meta = result_meta(job_id, "SUCCESS", result)
    pipe.set(result_key(job_id), meta, ex=expires_s)
    pipe.publish(result_key(job_id), meta)


def failure_result(failure: Failure) -> dict[str, Any]:
    """A ``Failure`` as Celery stores the exception that carries it (``failure_error`` reads it
    back): for failures a worker stores without raising, such as a message it cannot decode."""
    return {
        "exc_type": FAILURE_CARRIER,
        "exc_message": [failure.encode()],
        "exc_module": "workers.delivery",
    }


def envelope_from_meta(meta: dict[str, Any], job_id: str) -> Envelope:
    """The envelope of a finished job; raises JobFailedError (or a subclass) or
    JobCancelledError."""
    status = meta.get("status")
    if status == "SUCCESS":
        return Envelope.decode(meta.get("result"))
    if status == "REVOKED":
        raise JobCancelledError(job_id)
    raise failure_error(meta.get("result"), job_id)


def failure_error(result: Any, job_id: str) -> JobFailedError:
    """The local error for a stored failure. Nothing is unpickled or imported."""
    if not isinstance(result, dict):
        return JobFailedError(f"job failed: {result!r}", job_id=job_id)
    remote_type = str(result.get("exc_type", "Exception"))
    args = result.get("exc_message") or []
    if remote_type == FAILURE_CARRIER and args:
        try:
            failure = Failure.decode(args[0])
        except ContractError:
            pass
        else:
            cls = REMOTE_FAILURES.get(failure.type, JobFailedError)
            return cls(
                failure.message,
                job_id=job_id,
                remote_type=failure.type,
                raw_text=failure.raw_text,
                finish_reason=failure.finish_reason,
                raw_outputs=failure.raw_outputs,
                usage=failure.usage,
                attempts=failure.attempts,
            )
    message = " ".join(map(str, args)) if isinstance(args, list | tuple) else str(args)
    return JobFailedError(
        f"{remote_type}: {message}" if message else remote_type,
        job_id=job_id,
        remote_type=remote_type,
    )
