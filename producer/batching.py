"""The enqueue steps of one event loop, sent in batches: one pipeline, one round trip each.

A web backend's loop may start thousands of enqueues at once. Sent one by one they would queue
for the loop's few connections (and a try's timeout would count that queueing); batched, the
commands asked for while a batch is in flight go out together as the next one, on one
connection, so a loop's enqueues cost one round trip per batch and the loop never waits on
Redis. A batch is capped, so resuming its callers is a short stretch of the loop's time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from wire.outcome import stage_success

from .enqueue import PUSH_SCRIPT, RETRYABLE, StoreHit

#: Commands in one batch at most: resuming their callers is one stretch of the loop (~1 ms).
MAX_BATCH = 16

Stage = Callable[[Pipeline], Any]


class Batcher:
    """Runs single commands for many callers on one event loop, batched into pipelines."""

    def __init__(self, client: aioredis.Redis, *, try_timeout_s: float) -> None:
        self._client = client
        self._try_timeout_s = try_timeout_s
        self._waiting: list[tuple[Stage, asyncio.Future[Any]]] = []
        self._sending: asyncio.Task[None] | None = None

    async def run(self, stage: Stage) -> Any:
        """Queue one command (``stage`` adds it to a pipeline). Its reply, or the error of a
        batch that failed (a Redis error reply is returned, not raised)."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting.append((stage, future))
        if self._sending is None or self._sending.done():
            self._sending = asyncio.create_task(self._send(), name="sibylq-enqueue-batches")
        return await future

    async def _send(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting[:MAX_BATCH], self._waiting[MAX_BATCH:]
            outcome: list[Any] | Exception
            try:
                outcome = await self._execute([stage for stage, _ in batch])
            except asyncio.CancelledError:  # the loop is closing, and so are its callers
                for _, future in batch + self._waiting:
                    future.cancel()
                raise
            except Exception as exc:  # not Redis being away (that is a reply): callers raise it
                outcome = exc
            for index, (_, future) in enumerate(batch):
                if future.done():  # its caller was cancelled
                    continue
                if isinstance(outcome, Exception):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome[index])

    async def _execute(self, stages: list[Stage]) -> list[Any]:
        try:
            async with asyncio.timeout(self._try_timeout_s):
                async with self._client.pipeline(transaction=False) as pipe:
                    for stage in stages:
                        stage(pipe)
                    replies: list[Any] = await pipe.execute(raise_on_error=False)
                    return replies
        except RETRYABLE as exc:
            return [exc] * len(stages)


class LoopEnqueuer:
    """What an enqueue on an event loop sends its steps to (see ``producer.enqueue``)."""

    def __init__(self, *, results: Batcher, broker: Batcher, results_client: aioredis.Redis):
        self._results = results
        self._broker = broker
        self._results_client = results_client

    async def read_cache(self, key: str) -> Any:
        return await self._results.run(lambda pipe: pipe.get(key))

    async def push(self, keys: tuple[str, ...], args: tuple[str | int, ...]) -> Any:
        # EVAL, not EVALSHA: nothing to reload after a Redis restart; Redis caches the
        # compiled script by its digest.
        return await self._broker.run(lambda pipe: pipe.eval(PUSH_SCRIPT, len(keys), *keys, *args))

    async def store_hit(self, step: StoreHit, expires_s: int) -> None:
        async with self._results_client.pipeline(transaction=True) as pipe:
            stage_success(pipe, step.job_id, step.envelope.encode(), expires_s)  # type: ignore[arg-type]
            await pipe.execute()
