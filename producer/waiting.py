"""How a job handle waits, written once as a generator and driven by a sync and an async loop.

The flow yields ``Wait(seconds)`` (wait that long for the job's result, answer the stored
result or None) and ``CheckWorkers()`` (answer whether a live worker serves the queue), and
returns the ready result. It decides timeouts and "no worker" on its own, with no I/O, so the
sync and async drivers share every decision and differ only in how they wait.
"""

from __future__ import annotations

import json
import time
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

from wire.errors import BrokerUnavailableError, JobTimeoutError, NoWorkerError
from wire.outcome import READY

READY_STATES = frozenset(READY)


@dataclass(frozen=True)
class Wait:
    seconds: float


@dataclass(frozen=True)
class CheckWorkers:
    pass


Step = Wait | CheckWorkers
WaitFlow = Generator[Step, Any, dict[str, Any]]


#: What a driver answers to ``Wait`` or ``CheckWorkers`` when Redis cannot be reached.
UNREACHABLE: Any = type("Unreachable", (), {"__repr__": lambda self: "UNREACHABLE"})()


@dataclass(frozen=True)
class WaitPlan:
    job_id: str
    queue: str
    model: str
    timeout_s: float | None
    no_worker_timeout_s: float
    broker_timeout_s: float
    check_every_s: float


def ready_meta(raw: bytes | str | None) -> dict[str, Any] | None:
    """The stored Celery result if the job has finished, else None (pending, started...)."""
    if raw is None:
        return None
    meta = json.loads(raw)
    return meta if isinstance(meta, dict) and meta.get("status") in READY_STATES else None


@dataclass
class _Watch:
    """The clocks one wait keeps: its deadline, the last live worker, the last reachable Redis."""

    plan: WaitPlan
    started: float
    worker_seen: float
    broker_seen: float

    def next_slice(self, now: float) -> float:
        if self.plan.timeout_s is None:
            return self.plan.check_every_s
        left = self.started + self.plan.timeout_s - now
        if left <= 0:
            raise JobTimeoutError(self.plan.job_id, self.plan.timeout_s)
        return min(self.plan.check_every_s, left)

    def note_broker(self, reachable: bool, now: float) -> None:
        if reachable:
            self.broker_seen = now
        elif now - self.broker_seen >= self.plan.broker_timeout_s:
            raise BrokerUnavailableError(
                f"Redis unreachable for {now - self.broker_seen:.0f}s while waiting for job "
                f"{self.plan.job_id}; it may still complete: re-attach with Job.from_id"
            )

    def note_workers(self, alive: bool, now: float) -> None:
        if alive:
            self.worker_seen = now
        elif now - self.worker_seen >= self.plan.no_worker_timeout_s:
            raise NoWorkerError(self.plan.queue, self.plan.model, now - self.started)


def wait_flow(plan: WaitPlan, clock: Any = time.monotonic) -> WaitFlow:
    """Wait for ``plan.job_id``'s result; raise JobTimeoutError, NoWorkerError or
    BrokerUnavailableError."""
    now = clock()
    watch = _Watch(plan, started=now, worker_seen=now, broker_seen=now)
    while True:
        answer = yield Wait(watch.next_slice(clock()))
        watch.note_broker(answer is not UNREACHABLE, clock())
        meta = None if answer is UNREACHABLE else ready_meta(answer)
        if meta is not None:
            return meta
        if plan.no_worker_timeout_s > 0:
            alive = yield CheckWorkers()
            if alive is not UNREACHABLE:
                watch.note_workers(bool(alive), clock())
