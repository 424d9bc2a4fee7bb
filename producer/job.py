"""``Job``: a small typed handle over one enqueued job, rebuildable from its id.

Awaitable (``await job``), blocking (``job.result(timeout)``), and cheap: a waiting handle
holds a future on the process's shared result listener, not a thread or a connection.
"""

from __future__ import annotations

import json
from collections.abc import Generator
from enum import StrEnum
from typing import Any, Generic, TypeVar

from wire.contract import Envelope
from wire.errors import JobFailedError
from wire.modelref import parse_model_ref
from wire.outcome import envelope_from_meta

from .client import Client, Subscription
from .targets import Target, target_for
from .waiting import UNREACHABLE, CheckWorkers, Wait, WaitFlow, WaitPlan, wait_flow

T = TypeVar("T")

_ANY_JSON = Target(json_schema=None)


class JobStatus(StrEnum):
    PENDING = "PENDING"  # queued, or unknown to Redis
    STARTED = "STARTED"
    RETRY = "RETRY"
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    REVOKED = "REVOKED"


class Job(Generic[T]):
    """A handle on one job. ``await job`` or ``job.result()`` gives the typed value."""

    def __init__(
        self, job_id: str, *, client: Client, target: Target, model: str, queue: str | None
    ) -> None:
        self.id = job_id
        self.model = model
        self.queue = queue
        self._client = client
        self._target = target

    @classmethod
    def from_id(
        cls,
        job_id: str,
        *,
        target: Any = None,
        model: str | None = None,
        queue: str | None = None,
        client: Client | None = None,
    ) -> Job[Any]:
        """Re-attach to a job from any process. Without ``target`` the result is its JSON
        value; with ``model`` (or ``queue``) a wait also notices when no worker serves it."""
        if queue is None and model is not None:
            queue = parse_model_ref(model).queue
        return Job(
            job_id,
            client=client or Client(),
            target=_ANY_JSON if target is None else target_for(target),
            model=model or "",
            queue=queue,
        )

    def __repr__(self) -> str:
        return f"<Job {self.id} model={self.model!r}>"

    def status(self) -> JobStatus:
        raw = self._client.read_result(self.id)
        return JobStatus.PENDING if raw is None else JobStatus(json.loads(raw)["status"])

    def cancel(self) -> None:
        """Revoke the job: a queued job never runs; a running one finishes but is reported
        cancelled to waiters."""
        self._client.revoke(self.id)

    # -- waiting: one flow, two drivers ------------------------------------------------

    def envelope(
        self, timeout: float | None = None, *, subscription: Subscription | None = None
    ) -> Envelope:
        """Block until the job finishes; the stored envelope (raw text, usage, timings).
        ``subscription``: one already open on this job's channel (else one is opened)."""
        if subscription is None:
            with self._client.subscription(self.id) as opened:
                return self.envelope(timeout, subscription=opened)
        flow = self._flow(timeout)
        answer: Any = None
        while True:
            step = _advance(flow, answer)
            if not isinstance(step, Wait | CheckWorkers):
                return self._open(step)
            answer = (
                subscription.wait(step.seconds)
                if isinstance(step, Wait)
                else self._client.workers_alive(self.queue or "")
            )

    async def envelope_async(self, timeout: float | None = None) -> Envelope:
        """Await the job's envelope."""
        flow = self._flow(timeout)
        answer: Any = None
        listener = self._client.listener()
        future = listener.watch(self.id)
        try:
            while True:
                step = _advance(flow, answer)
                if not isinstance(step, Wait | CheckWorkers):
                    return self._open(step)
                answer = await (
                    listener.wait(future, step.seconds)
                    if isinstance(step, Wait)
                    else listener.workers_alive(self.queue or "")
                )
        finally:
            future.cancel()

    def result(self, timeout: float | None = None) -> T:
        """Block until the job finishes; its value as the requested Python type."""
        return self.value_of(self.envelope(timeout))

    async def result_async(self, timeout: float | None = None) -> T:
        return self.value_of(await self.envelope_async(timeout))

    def __await__(self) -> Generator[Any, None, T]:
        return self.result_async().__await__()

    # -- shared core -------------------------------------------------------------------

    def _flow(self, timeout: float | None) -> WaitFlow:
        settings = self._client.settings
        plan = WaitPlan(
            job_id=self.id,
            queue=self.queue or "",
            model=self.model,
            timeout_s=settings.result_timeout_s if timeout is None else timeout,
            no_worker_timeout_s=settings.no_worker_timeout_s if self.queue else 0.0,
            broker_timeout_s=settings.broker_timeout_s,
            check_every_s=max(2.0, 2 * settings.heartbeat_interval_s),
        )
        return wait_flow(plan)

    def _open(self, meta: dict[str, Any]) -> Envelope:
        return envelope_from_meta(meta, self.id)

    def value_of(self, envelope: Envelope) -> T:
        """The envelope's value as this job's Python type."""
        try:
            value: T = self._target.parse(
                envelope.value, raw_text=envelope.raw_text, finish_reason=envelope.finish_reason
            )
        except JobFailedError as exc:
            exc.job_id = self.id
            raise
        return value


def _advance(flow: WaitFlow, answer: Any) -> Any:
    """The flow's next step, or its return value (the finished job's stored result)."""
    try:
        return flow.send(answer)
    except StopIteration as done:
        return done.value


__all__ = ["UNREACHABLE", "Job", "JobStatus"]
