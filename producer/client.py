"""A producer's connections: Redis for enqueueing, results and liveness, and a Celery app.

Jobs are pushed by ``producer.enqueue``'s script (idempotent tries, within the broker budget);
the Celery app builds their messages and revokes jobs. It has no result backend on purpose:
Celery's client would otherwise subscribe to every task's result channel at send time and
leak those subscriptions (celery #4707, #6963). Results are read straight from Redis by
``ResultListener`` (async) and ``Subscription`` (sync).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from functools import cached_property
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import redis
from celery import Celery
from kombu.exceptions import OperationalError
from redis import Redis as BrokerRedis
from redis.backoff import NoBackoff
from redis.commands.core import Script
from redis.retry import Retry

from wire import cache
from wire.connections import Endpoint, connect, endpoint
from wire.constants import attempts_key, claim_key, result_key
from wire.contract import JobSpec
from wire.errors import BrokerUnavailableError, ConfigurationError
from wire.liveness import count_live
from wire.modelref import ModelRef
from wire.outcome import STORE_UNLESS_FINAL, result_meta
from wire.redact import redact, redact_url, secrets_of
from wire.settings import Settings, get_settings

from .enqueue import (
    PUSH_SCRIPT,
    RETRYABLE,
    EnqueuePlan,
    EnqueueStep,
    Pause,
    ReadCache,
    StoreHit,
    advance,
    enqueue_flow,
    plan_enqueue,
    try_timeout_s,
)
from .listener import ResultListener
from .waiting import UNREACHABLE

#: A cancelled job's stored result, as Celery stores the revocations it makes itself.
_CANCELLED = {
    "exc_type": "TaskRevokedError",
    "exc_message": ["cancelled by its producer"],
    "exc_module": "celery.exceptions",
}

if TYPE_CHECKING:
    from embedded.cluster import EmbeddedCluster

log = logging.getLogger(__name__)
T = TypeVar("T")


class Client:
    """Sends jobs and reads their results. One per process is plenty; it is thread-safe."""

    def __init__(self, settings: Settings | None = None) -> None:
        self._configured = settings or get_settings()
        self._settings: Settings | None = None  # resolved by connect()
        self._connect_lock = threading.Lock()
        self._cluster: EmbeddedCluster | None = None
        self._served_queues: set[str] = set()
        self._listeners: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, ResultListener]
        self._listeners = weakref.WeakKeyDictionary()
        self._pubsubs = _ThreadPubSubs()
        self._starts: dict[str, Future[None]] = {}  # ensure_worker_async's, by queue
        self._starts_lock = threading.Lock()

    def connect(self) -> Settings:
        """The settings in force. With no broker configured, the first call starts the
        embedded cluster (a private Redis, and workers on demand); later calls return its
        settings."""
        if self._settings is not None:
            return self._settings
        with self._connect_lock:
            if self._settings is None:
                self._settings = self._resolve()
            return self._settings

    def _resolve(self) -> Settings:
        if self._configured.broker_url is not None:
            return self._configured
        from embedded.cluster import default_cluster

        self._cluster = default_cluster()
        update = {"broker_url": self._cluster.url, "result_backend": None}
        return self._configured.model_copy(update=update)

    def ensure_worker(self, model: ModelRef, queue: str) -> None:
        """On the embedded cluster, start a worker for ``model`` if none serves it yet."""
        if queue in self._served_queues:
            return
        self.connect()  # starts the embedded cluster if there is one
        if self._cluster is not None:
            if queue != model.queue:
                raise ConfigurationError(
                    f"the embedded cluster serves each model on its own queue, not {queue!r}: "
                    "set SIBYLQ_BROKER_URL to route queues yourself"
                )
            self._cluster.ensure_worker(str(model))
        self._served_queues.add(queue)

    @cached_property
    def celery(self) -> Celery:
        settings = self.connect()
        broker = endpoint(settings.broker, settings)
        app = Celery("sibylq-producer", broker=broker.url, set_as_current=False)
        app.conf.update(
            broker_use_ssl=broker.ssl_options() or False,  # wire.connections' TLS policy
            task_serializer="json",
            accept_content=["json"],
            result_backend=None,
            broker_connection_retry_on_startup=True,
            broker_transport_options={"visibility_timeout": settings.broker_visibility_timeout_s},
            task_publish_retry_policy={
                "max_retries": 3,
                "interval_start": 0.2,
                "interval_step": 0.5,
                "interval_max": 1.0,
            },
        )
        return app

    @cached_property
    def redis(self) -> redis.Redis:
        return connect(
            (settings := self.connect()).result_url,
            settings,
            client_name="sibylq-producer",
            socket_connect_timeout=2,
            socket_keepalive=True,
        )

    def submit(
        self, spec: JobSpec, queue: str, job_id: str | None = None, *, priority: int = 0
    ) -> str:
        """Enqueue ``spec`` on ``queue`` (``priority`` 0 is served first; see
        ``LANE_PRIORITIES``); returns the job id. An answer in the cache (``wire.cache``)
        is stored as the job's result at once, and nothing is enqueued."""
        job_id = job_id or str(uuid.uuid4())
        self.send(self.plan(spec, queue, job_id, priority=priority, once=False))
        return job_id

    def submit_once(self, spec: JobSpec, queue: str, job_id: str, *, priority: int = 0) -> bool:
        """Enqueue unless this job id was enqueued before; True if it was enqueued now (the
        claim is recorded with the push, atomically: see ``producer.enqueue``)."""
        return self.send(self.plan(spec, queue, job_id, priority=priority, once=True))

    def plan(
        self, spec: JobSpec, queue: str, job_id: str, *, priority: int, once: bool
    ) -> EnqueuePlan:
        """One enqueue's message and settings, fixed before its first try."""
        settings = self.connect()
        return plan_enqueue(
            self.celery,
            spec,
            job_id=job_id,
            queue=queue,
            priority=priority,
            once=once,
            use_cache=settings.cache,
            claim_expires_s=settings.result_expires_s,
            budget_s=settings.broker_timeout_s,
        )

    def send(self, plan: EnqueuePlan) -> bool:
        """Run ``plan`` (see ``enqueue_flow``), blocking."""
        flow, answer = enqueue_flow(plan), None
        while not isinstance(step := advance(flow, answer), bool):
            answer = self._perform(step)
        return step

    async def send_async(self, plan: EnqueuePlan) -> bool:
        """Run ``plan`` on the running event loop, batched with the loop's other enqueues."""
        flow, answer = enqueue_flow(plan), None
        while not isinstance(step := advance(flow, answer), bool):
            answer = await self._perform_async(step)
        return step

    def _perform(self, step: EnqueueStep) -> Any:
        if isinstance(step, Pause):
            return time.sleep(step.seconds)
        try:
            if isinstance(step, ReadCache):
                return self.redis.get(step.key)
            if isinstance(step, StoreHit):
                cache.store_as_result(
                    self.redis, step.job_id, step.envelope, self.connect().result_expires_s
                )
                return True
            return self._push_script(keys=step.keys, args=step.args)
        except RETRYABLE as exc:
            return self._failed(step, exc)

    async def _perform_async(self, step: EnqueueStep) -> Any:
        if isinstance(step, Pause):
            return await asyncio.sleep(step.seconds)
        timeout_s = self._try_timeout_s
        enqueuer = self.listener().enqueuer(self.connect().broker, try_timeout_s=timeout_s)
        if isinstance(step, StoreHit):
            try:
                async with asyncio.timeout(timeout_s):
                    await enqueuer.store_hit(step, self.connect().result_expires_s)
            except RETRYABLE as exc:
                return self._failed(step, exc)
            return True
        if isinstance(step, ReadCache):
            reply = await enqueuer.read_cache(step.key)
        else:
            reply = await enqueuer.push(step.keys, step.args)
        return self._failed(step, reply) if isinstance(reply, Exception) else reply

    @cached_property
    def _try_timeout_s(self) -> float:
        return try_timeout_s(self.connect().broker_timeout_s)

    @cached_property
    def _broker_redis(self) -> BrokerRedis:
        """The connections that enqueue: without redis-py's own retries (the enqueue flow
        retries, within its budget) and with a timeout on every try."""
        timeout_s = self._try_timeout_s
        settings = self.connect()
        target = endpoint(settings.broker, settings)
        return BrokerRedis.from_url(
            target.url,
            **target.ssl_options(),
            client_name="sibylq-producer",
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            socket_keepalive=True,
            retry=Retry(NoBackoff(), 0),
        )

    @cached_property
    def _push_script(self) -> Script:
        script: Script = self._broker_redis.register_script(PUSH_SCRIPT)
        return script

    async def ensure_worker_async(self, model: ModelRef, queue: str) -> None:
        """``ensure_worker`` off the event loop: the first use may start the embedded cluster
        and wait for a worker (up to a minute). One start per queue, however many wait."""
        if queue in self._served_queues:
            return
        self._before_starting()
        with self._starts_lock:
            start = self._starts.get(queue)
            if start is None or (start.done() and start.exception() is not None):
                start = _in_thread(lambda: self.ensure_worker(model, queue))
                self._starts[queue] = start
        await asyncio.wrap_future(start)

    async def ready_async(self) -> None:
        """Resolve the settings off the event loop (this may start the embedded cluster)."""
        if self._settings is None:
            self._before_starting()
            await asyncio.wrap_future(_in_thread(self.connect))

    def _before_starting(self) -> None:
        if self._configured.broker_url is None:  # the embedded cluster may start in a thread
            from embedded.cluster import install_sigterm_handler

            install_sigterm_handler()

    def forget(self, job_ids: list[str]) -> None:
        """Delete finished jobs' results and bookkeeping (once they are stored elsewhere)."""
        keys = [key for job_id in job_ids for key in _job_keys(job_id)]
        if keys:
            self.redis.delete(*keys)
            self._broker_redis.delete(*map(claim_key, job_ids))

    def read_result(self, job_id: str) -> bytes | None:
        raw = self.redis.get(result_key(job_id))
        return raw.encode() if isinstance(raw, str) else raw

    def workers_alive(self, queue: str) -> Any:
        try:
            return count_live(self.redis, queue, self.connect().heartbeat_interval_s) > 0
        except redis.RedisError:
            return UNREACHABLE

    def revoke(self, job_id: str) -> None:
        """Cancel a job, durably: its result becomes REVOKED unless it is final already, so its
        waiters hear at once and a worker that pops it later, one started after this too,
        skips it (a finished job is never run: ``workers.delivery``'s check-in). Then the
        running workers are told, so that a backend that can end a request midway does."""
        meta = result_meta(job_id, "REVOKED", _CANCELLED)
        try:
            self._store_unless_final(
                keys=[result_key(job_id)], args=[meta, self.connect().result_expires_s]
            )
            self.celery.control.revoke(job_id)
        except (redis.RedisError, OperationalError, OSError) as exc:
            raise BrokerUnavailableError(
                f"cannot cancel job {job_id}: {self._redacted(exc)}"
            ) from exc

    @cached_property
    def _store_unless_final(self) -> Script:
        script: Script = self.redis.register_script(STORE_UNLESS_FINAL)
        return script

    def _failed(self, step: EnqueueStep, exc: BaseException) -> Any:
        """A failed try's answer (``_failed``), redacted; a Redis that refuses this client
        (a wrong password, an ACL) fails the enqueue at once: waiting would not help."""
        if isinstance(exc, REFUSED):
            settings = self.connect()
            url = settings.result_url if isinstance(step, ReadCache | StoreHit) else None
            where = redact_url(url or settings.broker)
            raise BrokerUnavailableError(
                f"Redis at {where} refused this client: {self._redacted(exc)}. Check the "
                "URL's user and password, and the user's ACL (docs/security.md)"
            ) from None
        return _failed(step, self._redacted(exc))

    def _endpoint(self, url: str) -> Endpoint:
        return endpoint(url, self.connect())

    def _redacted(self, exc: BaseException) -> BrokerUnavailableError:
        """``exc`` as an error that holds none of the Redis passwords (``wire.redact``)."""
        settings = self.connect()
        secrets = secrets_of(settings.broker_url, settings.result_backend)
        return BrokerUnavailableError(redact(f"{type(exc).__name__}: {exc}", secrets))

    def subscription(self, job_id: str, *, fresh: bool = False) -> Subscription:
        """A blocking wait's subscription to ``job_id``'s result; ``fresh``: opened before
        the job was sent (see ``Subscription``)."""
        return Subscription(self.redis, job_id, self._pubsubs, fresh=fresh)

    def listener(self) -> ResultListener:
        """The result listener of the running event loop (one per loop)."""
        loop = asyncio.get_running_loop()
        listener = self._listeners.get(loop)
        if listener is None:
            listener = ResultListener(
                self.connect().result_url,
                heartbeat_interval_s=self.connect().heartbeat_interval_s,
                endpoint=self._endpoint,
            )
            self._listeners[loop] = listener
        return listener

    async def aclose_listener(self) -> None:
        """Close the running loop's result listener (before closing the loop itself)."""
        listener = self._listeners.pop(asyncio.get_running_loop(), None)
        if listener is not None:
            await listener.aclose()

    def close(self) -> None:
        self._pubsubs.close_all()
        if "redis" in self.__dict__:
            self.redis.close()
        if "_broker_redis" in self.__dict__:
            self._broker_redis.close()
        if "celery" in self.__dict__:
            self.celery.close()


def _job_keys(job_id: str) -> tuple[str, ...]:
    return (result_key(job_id), attempts_key(job_id))


#: Redis refused this client: a wrong password or user, or an ACL without a command or key.
REFUSED = (
    redis.AuthenticationError,
    redis.exceptions.AuthorizationError,
    redis.exceptions.NoPermissionError,
)


def _failed(step: EnqueueStep, exc: Exception) -> Any:
    """What a step answers when its try failed: a cache miss, a hit not stored (the job is
    enqueued instead), or the error (the push is retried)."""
    if isinstance(step, ReadCache):
        log.warning("answer cache unavailable (%s): running the job", exc)
        return None
    return False if isinstance(step, StoreHit) else exc


def _in_thread(function: Callable[[], T]) -> Future[T]:
    """Run ``function`` in a thread of its own; its outcome, awaitable from any event loop."""
    future: Future[T] = Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():  # cancelled already: no one waits
            return
        try:
            future.set_result(function())
        except BaseException as exc:  # handed to whoever waits
            future.set_exception(exc)

    threading.Thread(target=run, name="sibylq-start", daemon=True).start()
    return future


class _ThreadPubSubs:
    """One pub/sub connection per thread, kept between blocking waits: subscribing on an open
    connection is one command, opening one is a TCP handshake and two more round trips (and
    redis-py disconnects a PubSub when it is closed)."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: set[redis.client.PubSub] = set()

    def take(self, client: redis.Redis) -> redis.client.PubSub:
        pubsub: redis.client.PubSub | None = getattr(self._local, "pubsub", None)
        if pubsub is None:
            pubsub = client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
            self._local.pubsub = pubsub
            with self._lock:
                self._all.add(pubsub)
        return pubsub

    def discard(self, pubsub: redis.client.PubSub) -> None:
        """Drop a connection in an unknown state (an error mid-wait); the next wait opens one."""
        self._local.pubsub = None
        with self._lock:
            self._all.discard(pubsub)
        pubsub.close()

    def close_all(self) -> None:
        with self._lock:
            pubsubs, self._all = self._all, set()
        for pubsub in pubsubs:
            pubsub.close()


class Subscription:
    """A blocking wait for one job's result: subscribe, then read the stored value.

    The thread's pub/sub connection is reused: on leaving, the channel is unsubscribed and a
    message that was already on its way is told apart by its channel.

    A ``fresh`` subscription was opened before its job was sent, so the job's result is
    announced after it: its first wait listens at once, without reading the stored result
    first. Later waits read it (a safety net: every few seconds, see ``producer.waiting``).
    """

    def __init__(
        self, client: redis.Redis, job_id: str, pubsubs: _ThreadPubSubs, *, fresh: bool = False
    ) -> None:
        self._redis = client
        self._key = result_key(job_id)
        self._channel = self._key.encode()
        self._pubsubs = pubsubs
        self._pubsub = pubsubs.take(client)
        self._broken = False
        self._skip_read = fresh

    def __enter__(self) -> Subscription:
        self._subscribe()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        interrupted = kind is not None and not issubclass(kind, Exception)  # mid-read, maybe
        if not self._broken and not interrupted:
            try:
                self._pubsub.unsubscribe(self._key)  # type: ignore[no-untyped-call]
                return
            except redis.RedisError:
                pass
        self._pubsubs.discard(self._pubsub)

    def _subscribe(self) -> None:
        try:
            self._pubsub.subscribe(self._key)
        except redis.RedisError:  # wait() reports UNREACHABLE and retries
            self._broken = True

    def wait(self, seconds: float) -> Any:
        """The stored result (raw bytes), None if not there yet, or UNREACHABLE."""
        try:
            if self._broken:  # subscribed after the job was sent, if fresh: read first
                self._skip_read = False
                self._pubsubs.discard(self._pubsub)
                self._pubsub = self._pubsubs.take(self._redis)
                self._broken = False
                self._pubsub.subscribe(self._key)
            skip_read, self._skip_read = self._skip_read, False
            stored = None if skip_read else self._redis.get(self._key)
            if stored is not None:
                return stored
            return self._next_message(time.monotonic() + seconds)
        except redis.RedisError:
            self._broken = True
            time.sleep(min(seconds, 1.0))
            return UNREACHABLE

    def _next_message(self, deadline: float) -> Any:
        # get_message returns None for (un)subscribe confirmations too: keep reading until
        # this job's published value or the deadline, so a wait costs no extra round trips.
        while (left := deadline - time.monotonic()) > 0:
            message = self._pubsub.get_message(timeout=left)
            if message is not None and message["channel"] == self._channel:
                return message["data"]
        return None
