"""One shared asyncio pub/sub listener per event loop resolves every pending job handle.

Each handle costs a future, not a thread or a connection: the listener holds one pub/sub
connection and one command connection. It subscribes to a job's result channel, then reads
the stored result (a result stored before the subscription is caught there). Every new watch
is followed by such a read, also of a job whose channel is subscribed already: its result may
have been announced before that watch (a handle awaited again right after its first await).
After a lost connection it reconnects, resubscribes everything pending and re-reads every
pending key, so results published while Redis was away are not missed. A connection that went
silently dead (a partition that drops its packets and sends no RST) is found out too: a pub/sub
connection quiet for ``_IDLE_S`` is sent a PING, and one that does not answer within another
``_IDLE_S`` is given up; a command waits ``_COMMAND_TIMEOUT_S`` at most.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from wire.connections import Endpoint, plain_endpoint
from wire.constants import job_id_from_result_key, result_key
from wire.liveness import count_live

from .batching import Batcher, LoopEnqueuer
from .waiting import UNREACHABLE, ready_meta

log = logging.getLogger(__name__)

_BATCH = 1000
#: Stored results read in one MGET: small enough that a reply of large results arrives well
#: within ``_COMMAND_TIMEOUT_S`` (a read cut by it would be sent again, and cut again).
_READ_BATCH = 100
_RETRY_DELAYS_S = (0.1, 0.25, 0.5, 1.0, 2.0)
#: A pub/sub connection quiet this long is PINGed; one quiet this long again is dead.
_IDLE_S = 5.0
#: The longest a command (MGET, ZCOUNT, an enqueue's push) waits for its answer.
_COMMAND_TIMEOUT_S = 10.0


class ResultListener:
    """Resolves ``watch(job_id)`` futures with the job's stored result (raw JSON bytes)."""

    def __init__(
        self,
        url: str,
        *,
        heartbeat_interval_s: float,
        presence_ttl_s: float = 1.0,
        endpoint: Callable[[str], Endpoint] = plain_endpoint,
    ) -> None:
        # ``endpoint``: a URL with the TLS options its clients need (``wire.connections``).
        # No retries or reconnects inside redis-py (supported_errors=()): one made on its own
        # would resubscribe but skip re-reading the keys stored meanwhile, and a reconnect
        # from a subscribe call would read the handshake while the reader task reads. Errors
        # end the session instead; the next one resubscribes and re-reads everything.
        self._url = url
        self._endpoint = endpoint
        self._redis = _client(url, "sibylq-listener", endpoint)
        self._enqueuer: LoopEnqueuer | None = None
        self._broker: aioredis.Redis | None = None  # when it is not the result Redis
        self._waiters: dict[str, set[asyncio.Future[bytes]]] = {}
        self._subscribed: set[str] = set()
        self._unread: set[str] = set()  # watched since their stored result was last read
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._presence: dict[str, tuple[float, bool]] = {}
        self._presence_asks: dict[str, asyncio.Future[Any]] = {}
        self._presence_ttl_s = presence_ttl_s
        self._heartbeat_interval_s = heartbeat_interval_s
        self.broken = False  # the last session ended in an error, and none has started since

    # -- what handles call -------------------------------------------------------------

    def watch(self, job_id: str) -> asyncio.Future[bytes]:
        """A future resolved with the job's result once it is stored."""
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(job_id, set()).add(future)
        self._unread.add(job_id)
        future.add_done_callback(lambda done: self._unwatch(job_id, done))
        self._changed.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="sibylq-result-listener")
        return future

    async def workers_alive(self, queue: str) -> Any:
        """Whether a live worker serves ``queue``. Thousands of handles ask: one query per
        queue is in flight at a time and its answer is cached briefly."""
        cached = self._presence.get(queue)
        if cached is not None and time.monotonic() - cached[0] < self._presence_ttl_s:
            return cached[1]
        asking = self._presence_asks.get(queue)
        if asking is None or asking.done():
            asking = asyncio.ensure_future(self._ask_presence(queue))
            self._presence_asks[queue] = asking
        return await asyncio.shield(asking)

    async def _ask_presence(self, queue: str) -> Any:
        try:
            alive = await count_live(self._redis, queue, self._heartbeat_interval_s) > 0
        except RedisError:
            return UNREACHABLE
        self._presence[queue] = (time.monotonic(), alive)
        return alive

    async def wait(self, future: asyncio.Future[bytes], seconds: float) -> Any:
        """The job's result if it arrives within ``seconds``; None, or UNREACHABLE while
        Redis is away."""
        done, _ = await asyncio.wait({future}, timeout=seconds)
        if done:
            return future.result()
        return UNREACHABLE if self.broken else None

    @property
    def pending(self) -> int:
        return len(self._waiters)

    def enqueuer(self, broker_url: str, *, try_timeout_s: float) -> LoopEnqueuer:
        """This loop's enqueueing, batched: over the listener's own command connections when
        the broker is the result Redis (a loop then uses 3 connections in all)."""
        if self._enqueuer is None:
            results = Batcher(self._redis, try_timeout_s=try_timeout_s)
            broker = results
            if broker_url != self._url:
                self._broker = _client(broker_url, "sibylq-producer", self._endpoint)
                broker = Batcher(self._broker, try_timeout_s=try_timeout_s)
            self._enqueuer = LoopEnqueuer(
                results=results, broker=broker, results_client=self._redis
            )
        return self._enqueuer

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._broker is not None:
            await self._broker.aclose()
        await self._redis.aclose()

    # -- the loop ----------------------------------------------------------------------

    def _unwatch(self, job_id: str, future: asyncio.Future[bytes]) -> None:
        futures = self._waiters.get(job_id)
        if futures is not None:
            futures.discard(future)
            if not futures:
                del self._waiters[job_id]
                self._changed.set()

    async def _run(self) -> None:
        failures = 0
        while self._waiters:
            try:
                await self._session()
                failures = 0
            except (RedisError, OSError) as exc:
                self.broken = True
                delay = _RETRY_DELAYS_S[min(failures, len(_RETRY_DELAYS_S) - 1)]
                failures += 1
                log.warning("result listener lost Redis (%s); reconnecting in %.2fs", exc, delay)
                await asyncio.sleep(delay)

    async def _session(self) -> None:
        """One connection's life: subscribe and read until nothing is pending or it breaks."""
        self._subscribed.clear()
        pubsub = self._redis.pubsub()
        reader: asyncio.Task[None] | None = None
        try:
            while self._waiters:
                await self._sync_subscriptions(pubsub)
                self.broken = False
                if reader is None and pubsub.subscribed:
                    reader = asyncio.create_task(self._read(pubsub))
                await self._next_change(reader)
        finally:
            if reader is not None:
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)
            await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _next_change(self, reader: asyncio.Task[None] | None) -> None:
        """Wait until handles come or go, or the reader dies (its error is re-raised)."""
        changed = asyncio.ensure_future(self._changed.wait())
        waits: set[asyncio.Future[Any]] = {changed} if reader is None else {changed, reader}
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            changed.cancel()
        if reader is not None and reader.done():
            reader.result()
            raise ConnectionError("result listener's reader stopped")
        self._changed.clear()

    async def _sync_subscriptions(self, pubsub: aioredis.client.PubSub) -> None:
        """Subscribe to the jobs newly watched and drop the others; then read the stored
        result of every job watched since the last read, once its channel is subscribed."""
        gone = [job_id for job_id in self._subscribed if job_id not in self._waiters]
        new = [job_id for job_id in self._waiters if job_id not in self._subscribed]
        unread, self._unread = self._unread, set()
        for chunk in _chunks(gone):
            await pubsub.unsubscribe(*map(result_key, chunk))
            self._subscribed.difference_update(chunk)
        for chunk in _chunks(new):
            await pubsub.subscribe(*map(result_key, chunk))
            self._subscribed.update(chunk)
        # A watch made meanwhile is in the next _unread: read again after its subscription.
        watched = (job_id for job_id in unread.union(new) if job_id in self._waiters)
        for chunk in _chunks(watched, _READ_BATCH):
            await self._read_stored(chunk)

    async def _read_stored(self, job_ids: list[str]) -> None:
        values = await self._redis.mget([result_key(job_id) for job_id in job_ids])
        for job_id, raw in zip(job_ids, values, strict=True):
            self._deliver(job_id, raw)

    async def _read(self, pubsub: aioredis.client.PubSub) -> None:
        probing = False  # a PING was sent and nothing came back since
        while True:
            # Every reply counts as a sign of life (confirmations too): None is a timeout.
            message = await pubsub.get_message(ignore_subscribe_messages=False, timeout=_IDLE_S)
            if message is None:
                if probing:
                    raise ConnectionError(f"no answer to a PING on pub/sub within {_IDLE_S:g} s")
                await pubsub.ping()  # its answer comes back as a message (type "pong")
                probing = True
                continue
            probing = False
            if message["type"] == "message":
                channel = message["channel"].decode()
                self._deliver(job_id_from_result_key(channel), message["data"])
                # Buffered messages are read without a pause: let the woken handle run
                # first, so a burst of results is a row of short loop turns, not one long one.
                await asyncio.sleep(0)

    def _deliver(self, job_id: str, raw: bytes | str | None) -> None:
        if ready_meta(raw) is None or raw is None:
            return
        for future in list(self._waiters.get(job_id, ())):
            if not future.done():
                future.set_result(raw if isinstance(raw, bytes) else raw.encode())


def _client(url: str, name: str, endpoint: Callable[[str], Endpoint]) -> aioredis.Redis:
    """At most 3 connections: for the listener, the pub/sub one and two for commands (MGET,
    ZCOUNT, and pushes when the broker is the same Redis). No retries or reconnects inside
    redis-py (see ``ResultListener``); callers bound each command's time themselves."""
    target = endpoint(url)  # wire.connections' TLS policy
    pool = aioredis.BlockingConnectionPool.from_url(
        target.url,
        **target.ssl_options(),
        max_connections=3,
        timeout=None,
        client_name=name,
        socket_connect_timeout=2,
        # Commands' reads; pub/sub reads pass their own timeout (``_read``).
        socket_timeout=_COMMAND_TIMEOUT_S,
        retry=Retry(NoBackoff(), 0, supported_errors=()),
    )
    return aioredis.Redis(connection_pool=pool)


def _chunks(items: Iterable[str], size: int = _BATCH) -> Iterable[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
