"""Enqueueing a job, written once as a generator and driven by a sync and an async loop.

A job's message is pushed onto its queue's Redis list by one Lua script that also records the
push under the job's claim key (``sibylq:claimed:<job id>``), valued with the message's
delivery tag. So a try is idempotent: a try whose reply was lost (a connection cut, a
blackholed network) may or may not have pushed, and the next try of the same enqueue (same
message, same tag) finds its own tag and pushes nothing. A job is never queued twice by a
retried enqueue. ``once`` enqueues only if no enqueue of that job id ever did (resumable
labeling runs attach to the job instead).

The message is the one kombu's Redis transport pushes for Celery's ``send_task`` (protocol 2,
JSON, base64 body): workers consume it as any other. The flow retries with backoff while Redis
is unreachable, for ``SIBYLQ_BROKER_TIMEOUT_S`` as waits do, then raises
``BrokerUnavailableError``.
"""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery
from kombu.utils.json import dumps

from wire import cache
from wire.constants import TASK_NAME, claim_key, queue_list_key
from wire.contract import Envelope, JobSpec
from wire.errors import BrokerUnavailableError

#: Errors after which a try may or may not have reached Redis: retried (the script makes a
#: second push of the same enqueue a no-op).
RETRYABLE = (redis.ConnectionError, redis.TimeoutError, OSError)
FIRST_PAUSE_S = 0.05
MAX_PAUSE_S = 1.0
#: A try waits this long at most for Redis (a quarter of the budget when that is less, but at
#: least MIN_TRY_TIMEOUT_S): a blackholed connection cannot hold an enqueue past its budget by
#: more than one try.
TRY_TIMEOUT_S = 5.0
MIN_TRY_TIMEOUT_S = 0.5

# KEYS: claim, queue list. ARGV: this enqueue's delivery tag, once ("1"/"0"), claim expiry (s),
# message. Returns 1: pushed now or by an earlier try of this enqueue; 0: enqueued before by
# another enqueue (once), nothing pushed.
PUSH_SCRIPT = """
local claimed = redis.call('GET', KEYS[1])
if claimed == ARGV[1] then
  return 1
end
if claimed and ARGV[2] == '1' then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
redis.call('LPUSH', KEYS[2], ARGV[4])
return 1
"""


@dataclass(frozen=True)
class ReadCache:
    """Answer the cache entry at ``key`` (raw), or None on a miss or an error."""

    key: str


@dataclass(frozen=True)
class StoreHit:
    """Store ``envelope`` as the job's result; answer whether it was stored."""

    job_id: str
    envelope: Envelope


@dataclass(frozen=True)
class Push:
    """Run ``PUSH_SCRIPT``; answer its reply, or the exception the try raised."""

    keys: tuple[str, str]
    args: tuple[str, str, int, str]


@dataclass(frozen=True)
class Pause:
    seconds: float


EnqueueStep = ReadCache | StoreHit | Push | Pause
EnqueueFlow = Generator[EnqueueStep, Any, bool]


@dataclass(frozen=True)
class EnqueuePlan:
    """Everything one enqueue sends, fixed before its first try."""

    spec: JobSpec
    job_id: str
    queue: str
    priority: int
    once: bool
    message: str
    tag: str
    claim_expires_s: int
    budget_s: float
    cache_key: str | None

    def push(self) -> Push:
        once = "1" if self.once else "0"
        return Push(
            (claim_key(self.job_id), queue_list_key(self.queue, self.priority)),
            (self.tag, once, self.claim_expires_s, self.message),
        )


def plan_enqueue(
    app: Celery,
    spec: JobSpec,
    *,
    job_id: str,
    queue: str,
    priority: int,
    once: bool,
    use_cache: bool,
    claim_expires_s: int,
    budget_s: float,
) -> EnqueuePlan:
    """The plan of one enqueue. A ``once`` enqueue skips the producer's cache lookup: it must
    not answer a job id enqueued before; the worker's check-in answers it from the cache."""
    message, tag = task_message(app, spec, job_id=job_id, queue=queue, priority=priority)
    cache_key = cache.entry_key(spec) if use_cache and not once else None
    return EnqueuePlan(
        spec, job_id, queue, priority, once, message, tag, claim_expires_s, budget_s, cache_key
    )


def task_message(
    app: Celery, spec: JobSpec, *, job_id: str, queue: str, priority: int
) -> tuple[str, str]:
    """The JSON message kombu's Redis transport pushes for ``send_task``, and its delivery tag.

    Celery builds the headers and body (``as_task_v2``); the envelope is what kombu's virtual
    channel adds (``prepare_message``, ``_inplace_augment_message``), for the anonymous exchange
    with the queue as routing key.
    """
    task = app.amqp.as_task_v2(
        job_id,
        TASK_NAME,
        args=(spec.encode(),),
        # Celery would saferepr() the whole job for logs and Flower: slow, and noisy.
        argsrepr=f"<{spec.kind} job for {spec.model}>",
        kwargsrepr="{}",
        ignore_result=None,  # type: ignore[arg-type]  # as send_task() leaves it
    )
    tag = str(uuid.uuid4())
    body = base64.b64encode(dumps(task.body).encode()).decode()
    properties = {
        **task.properties,
        "delivery_mode": 2,
        "delivery_info": {"exchange": "", "routing_key": queue},
        "priority": priority,
        "body_encoding": "base64",
        "delivery_tag": tag,
    }
    message = {
        "body": body,
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": task.headers,
        "properties": properties,
    }
    return dumps(message), tag


def try_timeout_s(budget_s: float) -> float:
    """How long one try may wait for Redis, for an enqueue budget of ``budget_s``."""
    return min(TRY_TIMEOUT_S, max(MIN_TRY_TIMEOUT_S, budget_s / 4))


def enqueue_flow(plan: EnqueuePlan, clock: Any = time.monotonic) -> EnqueueFlow:
    """Enqueue ``plan``: True once enqueued (or answered from the cache), False if ``once``
    found the job id enqueued before. Raises BrokerUnavailableError when Redis stays
    unreachable for ``plan.budget_s``."""
    started = clock()
    if plan.cache_key is not None:
        raw = yield ReadCache(plan.cache_key)
        hit = None if raw is None else cache.decode_hit(raw, plan.spec)
        if hit is not None and (yield StoreHit(plan.job_id, hit)):
            return True
    pause = FIRST_PAUSE_S
    while True:
        answer = yield plan.push()
        if not isinstance(answer, BaseException):
            return bool(answer)
        spent = clock() - started
        if spent >= plan.budget_s:
            raise BrokerUnavailableError(
                f"Redis unreachable for {spent:.1f}s while enqueueing job {plan.job_id} "
                f"(SIBYLQ_BROKER_TIMEOUT_S={plan.budget_s:g}): {answer}. Is Redis running and "
                "SIBYLQ_BROKER_URL right? A try may have got through: Job.from_id re-attaches"
            ) from answer
        yield Pause(min(pause, plan.budget_s - spent))
        pause = min(pause * 2, MAX_PAUSE_S)


def advance(flow: EnqueueFlow, answer: Any) -> EnqueueStep | bool:
    """The flow's next step, or its return value."""
    try:
        return flow.send(answer)
    except StopIteration as done:
        result: bool = done.value
        return result
