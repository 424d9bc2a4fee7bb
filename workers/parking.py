"""Jobs waiting for a retry wait in Redis, not in a worker.

A job that must run again later (a 429, a timeout, a 5xx, a full rate limiter) is *parked*:
its message is acknowledged and the job goes into the sorted set ``sibylq:delayed``, scored by
when it is due (Redis server time, so every machine agrees). It holds no worker slot, and no
visibility timeout can hand it to a second worker meanwhile.

Every worker runs a ``Promoter``: a thread that moves due jobs back onto their queue. A due
job is first *leased* (moved to ``sibylq:delayed:leased``, in one Lua call, so two workers
never both take it), then published, then released. A worker that dies between the two leaves
the lease behind: after ``LEASE_S`` any promoter puts the job back in ``sibylq:delayed``. The
worst case is then one duplicate delivery, which the delivery check (``workers.task``) drops
once the job has finished.
"""

from __future__ import annotations

import logging
import random
import threading
from typing import Any, Literal

import redis
from celery import Celery
from pydantic import BaseModel, ConfigDict, ValidationError

from wire.constants import DELAYED_KEY, DELAYED_LEASED_KEY, TASK_NAME, attempts_key
from wire.errors import ContractError
from wire.settings import Settings

from .store import script

log = logging.getLogger(__name__)

#: How often each worker looks for due jobs.
POLL_S = 0.1
#: A lease older than this belongs to a dead promoter: its job is put back.
LEASE_S = 30.0
#: Due jobs moved per Lua call.
BATCH = 100

# KEYS: delayed, attempts. ARGV: member, delay (ms), attempts expiry (s). The delivery that
# parks a job ended cleanly: it must not count towards SIBYLQ_MAX_DELIVERIES.
_PARK = """
local now = redis.call('TIME')
local now_ms = now[1] * 1000 + math.floor(now[2] / 1000)
redis.call('ZADD', KEYS[1], now_ms + tonumber(ARGV[2]), ARGV[1])
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('DECR', KEYS[2])
  redis.call('EXPIRE', KEYS[2], ARGV[3])
end
return now_ms
"""

# KEYS: delayed, leased. ARGV: batch, lease (ms). Returns the members now leased.
_LEASE_DUE = """
local now = redis.call('TIME')
local now_ms = now[1] * 1000 + math.floor(now[2] / 1000)
local stale = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now_ms - tonumber(ARGV[2]),
                         'LIMIT', 0, ARGV[1])
for _, member in ipairs(stale) do
  redis.call('ZREM', KEYS[2], member)
  redis.call('ZADD', KEYS[1], now_ms, member)
end
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms, 'LIMIT', 0, ARGV[1])
for _, member in ipairs(due) do
  redis.call('ZREM', KEYS[1], member)
  redis.call('ZADD', KEYS[2], now_ms, member)
end
return due
"""


class Parked(BaseModel):
    """A job waiting for its retry: enough to publish it again as it was. Stored in Redis as
    versioned JSON: a job parked by one release may be promoted by the next."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: Literal[1] = 1
    job_id: str
    queue: str
    priority: int
    payload: dict[str, Any]
    progress: dict[str, Any]  # workers.execute.Progress, encoded
    reason: str

    def encode(self) -> str:
        return self.model_dump_json()

    @classmethod
    def decode(cls, raw: bytes | str) -> Parked:
        """Raises ContractError for anything but a parked job's JSON."""
        try:
            return cls.model_validate_json(raw)
        except ValidationError as exc:
            raise ContractError(f"not a valid parked job: {exc}", raw) from exc


def park(parked: Parked, delay_s: float, settings: Settings) -> None:
    """Park ``parked`` for ``delay_s`` seconds (from now, in Redis time)."""
    script(settings, _PARK)(
        keys=[DELAYED_KEY, attempts_key(parked.job_id)],
        args=[parked.encode(), max(0, round(delay_s * 1000)), settings.result_expires_s],
    )


def backoff_s(retries: int, settings: Settings) -> float:
    """Exponential backoff with jitter for the ``retries``-th retry (1-based): a random delay
    in the upper half of ``retry_backoff_s * 2**(retries-1)``, capped."""
    ceiling = min(settings.retry_backoff_max_s, settings.retry_backoff_s * 2 ** max(retries - 1, 0))
    return random.uniform(ceiling / 2, ceiling)


def delay_after(server_delay_s: float) -> float:
    """A delay the server asked for (``Retry-After``), plus a little jitter: after it, never
    before, and spread so parked jobs don't return all in the same millisecond."""
    return server_delay_s + random.uniform(0.0, min(0.1 * server_delay_s, 1.0) + 0.01)


class Promoter:
    """Moves due parked jobs back onto their queues, from a thread of the worker."""

    def __init__(self, client: redis.Redis, sender: Celery) -> None:
        self._redis = client
        self._sender = sender
        self._lease_due = client.register_script(_LEASE_DUE)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sibylq-promoter", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def promote_due(self) -> int:
        """Publish every due job; returns how many."""
        members = self._lease_due(
            keys=[DELAYED_KEY, DELAYED_LEASED_KEY], args=[BATCH, LEASE_S * 1000]
        )
        for member in members:
            try:
                parked = Parked.decode(member)
            except ContractError as exc:  # written by no sibylq release: it can never run
                log.error("dropping an entry of %s that is no parked job: %s", DELAYED_KEY, exc)
            else:
                self._publish(parked)
            self._redis.zrem(DELAYED_LEASED_KEY, member)
        return len(members)

    def _publish(self, parked: Parked) -> None:
        self._sender.send_task(
            TASK_NAME,
            args=[parked.payload],
            kwargs={"carry": parked.progress},
            task_id=parked.job_id,
            queue=parked.queue,
            routing_key=parked.queue,
            priority=parked.priority,
            argsrepr=f"<retry of {parked.job_id}>",
            kwargsrepr="{}",
        )

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                while self.promote_due() == BATCH:
                    pass
            except Exception as exc:
                log.warning("cannot re-enqueue parked jobs yet: %s", exc)
                self._stop.wait(1.0)
            self._stop.wait(POLL_S)
