"""The labeling loop: stream rows in, keep at most N jobs in flight, stream results out.

Redis never holds more than ``max_in_flight`` of a run's jobs, whatever the input size. With
``ordered`` results leave in input order through a reorder buffer that counts against the
same bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

from pydantic_core import to_jsonable_python
from redis.exceptions import RedisError

from wire.contract import GenConf, JobKind, Usage
from wire.errors import InvalidRequestError, JobFailedError

from ..job import Job
from ..models import Model
from ..targets import Target
from .ids import key_text, row_job_id, run_fingerprint
from .output import Previous
from .prompt import PromptTemplate
from .results import LabelResult
from .rows import BadRow, Row


@dataclass(frozen=True)
class LabelTask:
    """What to ask of every row."""

    model: Model
    kind: JobKind
    target: Target
    template: PromptTemplate
    inst: str | None = None
    genconf: GenConf | None = None

    @property
    def fingerprint(self) -> str:
        genconf = self.genconf or self.model.genconf
        return run_fingerprint(
            str(self.model.ref), self.template.template, self.target.json_schema, genconf, self.inst
        )


@dataclass
class _Pending:
    row: Row
    job: Job[Any]
    attempt: int
    started: float


async def label_rows(
    task: LabelTask,
    rows: Iterable[Row | BadRow],
    *,
    previous: Previous | None = None,
    max_in_flight: int = 256,
    ordered: bool = False,
) -> AsyncIterator[LabelResult | None]:
    """Label ``rows``; yields each result as it completes, and None for each row skipped
    because ``previous`` already holds it."""
    previous = previous or Previous()
    fingerprint = task.fingerprint
    window = _Window(ordered)
    written = _Forgetter(task.model)
    try:
        for sequence, row in enumerate(rows):
            if key_text(row.key) in previous.done:
                yield None
                continue
            while window.size >= max_in_flight:
                for result in await window.next_results():
                    yield result
                    written.add(result)
            attempt = previous.failed.get(key_text(row.key), 0) + 1
            window.add(sequence, _start(task, row, fingerprint, attempt))
        while window.size:
            for result in await window.next_results():
                yield result
                written.add(result)
    finally:
        window.cancel()  # on Ctrl-C: stop waiting; the jobs themselves finish on the workers
        written.flush()


class _Forgetter:
    """Once the consumer has taken a row's result (the generator resumed after yielding it),
    its Redis keys go: Redis then holds only the rows in flight, whatever the input size."""

    def __init__(self, model: Model, batch: int = 256) -> None:
        self._model = model
        self._batch = batch
        self._job_ids: list[str] = []

    def add(self, result: LabelResult) -> None:
        if result.job_id is not None:
            self._job_ids.append(result.job_id)
        if len(self._job_ids) >= self._batch:
            self.flush()

    def flush(self) -> None:
        job_ids, self._job_ids = self._job_ids, []
        with contextlib.suppress(RedisError):  # they expire anyway
            self._model.client.forget(job_ids)


def _start(
    task: LabelTask, row: Row | BadRow, fingerprint: str, attempt: int
) -> asyncio.Future[LabelResult]:
    """Submit the row's job (once per job id) and return a future of its result."""
    if isinstance(row, BadRow):
        return _done(_failed(row.key, row.line, "InvalidRow", row.error, attempt))
    try:
        query = task.template.render(row.fields)
        job = task.model.submit(
            task.kind,
            task.target,
            query,
            inst=task.inst,
            genconf=task.genconf,
            job_id=row_job_id(fingerprint, row.key, attempt),
            once=True,
            lane="bulk",
        )
    except InvalidRequestError as exc:
        return _done(_failed(row.key, row.line, "InvalidRow", f"line {row.line}: {exc}", attempt))
    return asyncio.ensure_future(_collect(_Pending(row, job, attempt, time.monotonic())))


async def _collect(pending: _Pending) -> LabelResult:
    row, job = pending.row, pending.job
    try:
        envelope = await job.envelope_async()
        value = job.value_of(envelope)
    except JobFailedError as exc:
        failed = _failed(
            row.key, row.line, exc.remote_type, str(exc), pending.attempt, job.id, exc.raw_text
        )
        return dataclasses.replace(failed, usage=exc.usage or Usage())
    return LabelResult(
        key=row.key,
        line=row.line,
        status="done",
        result=to_jsonable_python(value),
        attempts=pending.attempt,
        usage=envelope.usage,
        latency_s=time.monotonic() - pending.started,
        job_id=job.id,
    )


def _failed(
    key: Any,
    line: int,
    kind: str,
    message: str,
    attempt: int,
    job_id: str | None = None,
    raw_text: str | None = None,
) -> LabelResult:
    error = {"type": kind, "message": message, "raw_text": raw_text}
    return LabelResult(
        key=key, line=line, status="failed", error=error, attempts=attempt, job_id=job_id
    )


def _done(result: LabelResult) -> asyncio.Future[LabelResult]:
    future: asyncio.Future[LabelResult] = asyncio.get_running_loop().create_future()
    future.set_result(result)
    return future


class _Window:
    """The jobs in flight, plus (when ordered) finished results waiting for their turn.

    Finished jobs report to a queue, so waiting costs O(1) per result whatever the window.
    """

    def __init__(self, ordered: bool) -> None:
        self.ordered = ordered
        self.arrivals: asyncio.Queue[tuple[int, LabelResult]] = asyncio.Queue()
        self.running: dict[int, asyncio.Future[LabelResult]] = {}
        self.finished: dict[int, LabelResult] = {}

    @property
    def size(self) -> int:
        return len(self.running) + len(self.finished)

    def add(self, sequence: int, future: asyncio.Future[LabelResult]) -> None:
        self.running[sequence] = future
        future.add_done_callback(lambda done: self._arrived(sequence, done))

    def _arrived(self, sequence: int, future: asyncio.Future[LabelResult]) -> None:
        if not future.cancelled():
            self.arrivals.put_nowait((sequence, future.result()))

    async def next_results(self) -> list[LabelResult]:
        """Wait for at least one job, then the results that may leave now."""
        arrived = [await self.arrivals.get()]
        while not self.arrivals.empty():
            arrived.append(self.arrivals.get_nowait())
        for sequence, _ in arrived:
            del self.running[sequence]
        if not self.ordered:
            return [result for _, result in arrived]
        self.finished.update(arrived)
        return self._release_in_order()

    def _release_in_order(self) -> list[LabelResult]:
        released: list[LabelResult] = []
        first_running = min(self.running, default=None)
        for sequence in sorted(self.finished):
            if first_running is not None and sequence > first_running:
                break
            released.append(self.finished.pop(sequence))
        return released

    def cancel(self) -> None:
        for future in self.running.values():
            future.cancel()
