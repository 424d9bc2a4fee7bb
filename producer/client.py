"""A producer's connections: a Celery app that only sends, and Redis for results and liveness.

The sending app has no result backend on purpose: Celery's client would otherwise subscribe
to every task's result channel at send time and leak those subscriptions (celery #4707,
#6963). Results are read straight from Redis by ``ResultListener`` (async) and
``Subscription`` (sync).
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
import weakref
from functools import cached_property
from types import TracebackType
from typing import TYPE_CHECKING, Any

import redis
from celery import Celery
from kombu.exceptions import OperationalError

from wire import cache
from wire.constants import TASK_NAME, attempts_key, claim_key, result_key
from wire.contract import Envelope, JobSpec
from wire.errors import BrokerUnavailableError, ConfigurationError
from wire.liveness import count_live
from wire.modelref import ModelRef
from wire.settings import Settings, get_settings

from .listener import ResultListener
from .waiting import UNREACHABLE

if TYPE_CHECKING:
    from embedded.cluster import EmbeddedCluster


class Client:
    """Sends jobs and reads their results. One per process is plenty; it is thread-safe."""

    def __init__(self, settings: Settings | None = None) -> None:
        self._configured = settings or get_settings()
        self._cluster: EmbeddedCluster | None = None
        self._served_queues: set[str] = set()
        self._listeners: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, ResultListener]
        self._listeners = weakref.WeakKeyDictionary()
        self._pubsubs = _ThreadPubSubs()

    @cached_property
    def settings(self) -> Settings:
        """The settings in force. With no broker configured, this starts the embedded
        cluster (a private Redis, and workers on demand) on first use."""
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
        self.settings  # noqa: B018 - resolving the settings starts the cluster if there is one
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
        app = Celery("sibylq-producer", broker=self.settings.broker_url, set_as_current=False)
        app.conf.update(
            task_serializer="json",
            accept_content=["json"],
            result_backend=None,
            broker_connection_retry_on_startup=True,
            broker_transport_options={"visibility_timeout": self.settings.visibility_timeout_s},
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
        return redis.Redis.from_url(
            self.settings.result_url,
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
        hit = cache.lookup(self.redis, spec) if self.settings.cache else None
        self._enqueue(spec, queue, job_id, priority, hit)
        return job_id

    def submit_once(self, spec: JobSpec, queue: str, job_id: str, *, priority: int = 0) -> bool:
        """Enqueue unless this job id was enqueued before; True if it was enqueued now.

        The claim is recorded after the enqueue: a crash between the two can enqueue a job
        twice (the second delivery finds the stored result and is dropped), never lose one.
        The claim and the cache are read in one round trip.
        """
        key = claim_key(job_id)
        entry = cache.entry_key(spec) if self.settings.cache else None
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.exists(key)
                if entry is not None:
                    pipe.get(entry)
                claimed, *cached = pipe.execute()
            if claimed:
                return False
            hit = cache.decode_hit(cached[0], spec) if cached and cached[0] is not None else None
            self._enqueue(spec, queue, job_id, priority, hit)
            self.redis.set(key, "1", ex=self.settings.result_expires_s)
        except redis.RedisError as exc:
            raise BrokerUnavailableError(f"cannot reach Redis to enqueue {job_id}: {exc}") from exc
        return True

    def _enqueue(
        self, spec: JobSpec, queue: str, job_id: str, priority: int, hit: Envelope | None
    ) -> None:
        """Send the job, or store ``hit`` (its cached answer) as its result instead."""
        if hit is not None and self._answer_from_cache(job_id, hit):
            return
        try:
            self.celery.send_task(
                TASK_NAME,
                args=[spec.encode()],
                task_id=job_id,
                queue=queue,
                routing_key=queue,
                priority=priority,
                # Celery would saferepr() the whole job for logs and Flower: slow, and noisy.
                argsrepr=f"<{spec.kind} job for {spec.model}>",
                kwargsrepr="{}",
            )
        except (OperationalError, OSError) as exc:
            raise BrokerUnavailableError(
                f"cannot enqueue to {self.settings.broker_url!r}: {exc}. Is Redis running "
                "and SIBYLQ_BROKER_URL right?"
            ) from exc

    def _answer_from_cache(self, job_id: str, hit: Envelope) -> bool:
        try:
            cache.store_as_result(self.redis, job_id, hit, self.settings.result_expires_s)
        except redis.RedisError:
            return False
        return True

    def forget(self, job_ids: list[str]) -> None:
        """Delete finished jobs' results and bookkeeping (once they are stored elsewhere)."""
        keys = [key for job_id in job_ids for key in _job_keys(job_id)]
        if keys:
            self.redis.delete(*keys)

    def read_result(self, job_id: str) -> bytes | None:
        raw = self.redis.get(result_key(job_id))
        return raw.encode() if isinstance(raw, str) else raw

    def workers_alive(self, queue: str) -> Any:
        try:
            return count_live(self.redis, queue, self.settings.heartbeat_interval_s) > 0
        except redis.RedisError:
            return UNREACHABLE

    def revoke(self, job_id: str) -> None:
        try:
            self.celery.control.revoke(job_id)
        except (OperationalError, OSError) as exc:
            raise BrokerUnavailableError(f"cannot cancel job {job_id}: {exc}") from exc

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
                self.settings.result_url,
                heartbeat_interval_s=self.settings.heartbeat_interval_s,
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
        if "celery" in self.__dict__:
            self.celery.close()


def _job_keys(job_id: str) -> tuple[str, ...]:
    return (result_key(job_id), claim_key(job_id), attempts_key(job_id))


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
