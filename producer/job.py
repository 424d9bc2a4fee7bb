"""``Job``: a small typed handle over one enqueued job, rebuildable from its id.

Awaitable (``await job``), blocking (``job.result(timeout)``), and cheap: a waiting handle
holds a future on the process's shared result listener, not a thread or a connection. A
handle keeps its job's value once it has it: awaiting it again gives the value at once. A
failure is read from Redis again each time: ``sibylq retry`` re-runs a failed job under its id,
and whoever waits on it then gets the new result.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Generator
from enum import StrEnum
from typing import Any, Generic, TypeVar, overload

from wire.contract import Envelope, JobSpec
from wire.errors import JobFailedError
from wire.modelref import ModelRef, parse_model_ref
from wire.outcome import envelope_from_meta

from .client import Client, Subscription
from .enqueue import EnqueuePlan
from .targets import Target, target_for
from .waiting import UNREACHABLE, CheckWorkers, Wait, WaitFlow, WaitPlan, wait_flow

T = TypeVar("T")
U = TypeVar("U")

_ANY_JSON = Target(json_schema=None)


class JobStatus(StrEnum):
    PENDING = "PENDING"  # queued, or unknown to Redis
    STARTED = "STARTED"
    RETRY = "RETRY"
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    REVOKED = "REVOKED"


class Enqueue:
    """One job's enqueue, started with its handle: done before ``start`` returns, or, in a
    running event loop, a task of that loop (the event loop never blocks on Redis, nor on the
    embedded cluster's first start), which the handle finishes before it waits. A handle
    never awaited is enqueued all the same, unless its loop closes first.

    Every try pushes the same message (one plan, built once), so finishing it from a second
    place (a blocking ``job.result()`` on the loop's thread) never queues the job twice.
    """

    def __init__(
        self,
        client: Client,
        model: ModelRef,
        spec: JobSpec,
        queue: str,
        job_id: str,
        *,
        priority: int,
        once: bool,
    ) -> None:
        self.job_id = job_id
        self._client = client
        self._model = model
        self._spec = spec
        self._queue = queue
        self._priority = priority
        self._once = once
        self._plan: EnqueuePlan | None = None
        self._lock = threading.Lock()
        self._task: asyncio.Task[bool] | None = None
        self._sent = False

    def start(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.finish()
        else:
            self._task = loop.create_task(self._send_async(), name=f"sibylq-enqueue-{self.job_id}")

    def finish(self) -> None:
        """Block until the job is enqueued; raises what the enqueue raised."""
        if self._sent:
            return
        task = self._task
        if task is not None and task.done() and not task.cancelled():
            task.result()
        else:
            if task is not None and not task.get_loop().is_closed():
                # Its loop may be this very thread, blocked here: take over from the task.
                task.get_loop().call_soon_threadsafe(task.cancel)
            self._client.ensure_worker(self._model, self._queue)
            self._client.send(self.plan())
        self._sent = True

    async def finish_async(self) -> None:
        if self._sent:
            return
        task = self._task
        if task is None or task.cancelled() or task.get_loop() is not asyncio.get_running_loop():
            await self._send_async()
        else:  # shielded: a caller's timeout must not abort the enqueue itself
            await asyncio.shield(task)
        self._sent = True

    def plan(self) -> EnqueuePlan:
        with self._lock:
            if self._plan is None:
                self._plan = self._client.plan(
                    self._spec, self._queue, self.job_id, priority=self._priority, once=self._once
                )
            return self._plan

    async def _send_async(self) -> bool:
        await self._client.ensure_worker_async(self._model, self._queue)
        return await self._client.send_async(self.plan())


class Job(Generic[T]):
    """A handle on one job. ``await job`` or ``job.result()`` gives the typed value."""

    def __init__(
        self,
        job_id: str,
        *,
        client: Client,
        target: Target,
        model: str,
        queue: str | None,
        enqueue: Enqueue | None = None,
    ) -> None:
        self.id = job_id
        self.model = model
        self.queue = queue
        self._client = client
        self._target = target
        self._enqueue = enqueue
        self._outcome: dict[str, Any] | None = None  # the stored success, once there is one

    @overload
    @classmethod
    def from_id(
        cls,
        job_id: str,
        *,
        target: type[U],
        model: str | None = None,
        queue: str | None = None,
        client: Client | None = None,
    ) -> Job[U]: ...
    @overload
    @classmethod
    def from_id(
        cls,
        job_id: str,
        *,
        target: Any = None,
        model: str | None = None,
        queue: str | None = None,
        client: Client | None = None,
    ) -> Job[Any]: ...
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
        """Cancel the job: its waiters get ``JobCancelledError`` at once; a queued job never
        runs, also when no worker is up until later; a running one is ended midway where its
        backend can (llama.cpp), else finishes unreported."""
        self._client.revoke(self.id)

    # -- waiting: one flow, two drivers ------------------------------------------------

    def envelope(
        self, timeout: float | None = None, *, subscription: Subscription | None = None
    ) -> Envelope:
        """Block until the job finishes; the stored envelope (raw text, usage, timings).
        ``subscription``: one already open on this job's channel (else one is opened)."""
        if self._outcome is not None:
            return self._open(self._outcome)
        if self._enqueue is not None:
            self._enqueue.finish()
        if subscription is None:
            with self._client.subscription(self.id) as opened:
                return self.envelope(timeout, subscription=opened)
        flow = self._flow(timeout)
        answer: Any = None
        while True:
            step = _advance(flow, answer)
            if not isinstance(step, Wait | CheckWorkers):
                return self._resolved(step)
            answer = (
                subscription.wait(step.seconds)
                if isinstance(step, Wait)
                else self._client.workers_alive(self.queue or "")
            )

    async def envelope_async(self, timeout: float | None = None) -> Envelope:
        """Await the job's envelope."""
        if self._outcome is not None:
            return self._open(self._outcome)
        if self._enqueue is not None:
            await self._enqueue.finish_async()
        await self._client.ready_async()
        flow = self._flow(timeout)
        answer: Any = None
        listener = self._client.listener()
        future = listener.watch(self.id)
        try:
            while True:
                step = _advance(flow, answer)
                if not isinstance(step, Wait | CheckWorkers):
                    return self._resolved(step)
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
        settings = self._client.connect()
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

    def _resolved(self, meta: dict[str, Any]) -> Envelope:
        if meta.get("status") == "SUCCESS":
            self._outcome = meta
        return self._open(meta)

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


__all__ = ["UNREACHABLE", "Enqueue", "Job", "JobStatus"]
