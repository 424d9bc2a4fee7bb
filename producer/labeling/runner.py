"""The labeling loop: stream rows in, keep at most N jobs in flight, stream results out.

Redis never holds more than ``max_in_flight`` of a run's jobs, whatever the input size. With
``ordered`` results leave in input order through a reorder buffer that counts against the
same bound.

Every row's outcome comes out: a result, failed rows included. Only what stops the whole run
(no worker serves the queue, Redis is unreachable, a key repeated in the input) is raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Iterable
from dataclasses import dataclass
from typing import Any

from pydantic_core import to_jsonable_python
from redis.exceptions import RedisError

from wire.contract import Envelope, GenConf, JobKind, Usage
from wire.errors import InvalidRequestError, JobCancelledError, JobFailedError, JobTimeoutError

from ..job import Job
from ..models import Model, merge_genconf
from ..targets import Target
from .ids import key_text, row_job_id, run_fingerprint
from .prompt import PromptTemplate
from .results import LabelResult, Previous, Skipped
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
    #: A classification's labels (the schema holds them too), to show in messages.
    labels: tuple[str, ...] | None = None

    @property
    def effective_genconf(self) -> GenConf:
        """The generation settings every row's job runs with: the model's, then the task's."""
        return merge_genconf(self.model.genconf, self.genconf)

    @property
    def fingerprint(self) -> str:
        return run_fingerprint(
            str(self.model.ref),
            str(self.kind),
            self.template.template,
            self.target.json_schema,
            self.effective_genconf,
            self.inst,
        )


@dataclass
class _Pending:
    row: Row
    job: Job[Any]
    retries: int
    started: float

    def failed(self, exc: Exception, envelope: Envelope | None) -> LabelResult:
        """The row's result for a job that failed (or whose output did not parse)."""
        if isinstance(exc, JobFailedError):
            kind, raw_text = exc.remote_type, exc.raw_text
            usage = envelope.usage if envelope is not None else exc.usage or Usage()
            attempts = envelope.attempts if envelope is not None else exc.attempts
        else:
            kind, raw_text, usage, attempts = type(exc).__name__, None, Usage(), 0
        return LabelResult(
            key=self.row.key,
            line=self.row.line,
            status="failed",
            error={"type": kind, "message": str(exc), "raw_text": raw_text},
            attempts=attempts,
            retries=self.retries,
            usage=usage,
            latency_s=time.monotonic() - self.started,
            job_id=self.job.id,
        )


async def label_rows(
    task: LabelTask,
    rows: Iterable[Row | BadRow],
    *,
    previous: Previous | None = None,
    retry_failed: bool = False,
    max_in_flight: int = 256,
    ordered: bool = False,
) -> AsyncGenerator[LabelResult | Skipped, None]:
    """Label ``rows``; yields each result as it completes, and ``Skipped`` for each row
    ``previous`` holds (done, or failed unless ``retry_failed``).

    Raises InvalidRequestError when a key comes twice (a key names one row), and what stops
    a wait for every row alike: NoWorkerError, BrokerUnavailableError."""
    previous = previous or Previous()
    fingerprint = task.fingerprint
    window = _Window(ordered)
    written = _Forgetter(task.model)
    seen: dict[str, int] = {}
    try:
        for sequence, row in enumerate(rows):
            key = key_text(row.key)
            _check_unique(seen, key, row)
            retried = previous.failed.get(key)
            if key in previous.done or (retried is not None and not retry_failed):
                yield Skipped(row.key, failed=key not in previous.done)
                continue
            while window.size >= max_in_flight:
                for result in await window.next_results():
                    yield result
                    written.add(result)
            retries = previous.retrying.get(key, 0) if retried is None else retried + 1
            window.add(sequence, _start(task, row, fingerprint, retries))
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


def _check_unique(seen: dict[str, int], key: str, row: Row | BadRow) -> None:
    """A key names one row: a repeated one would get the first row's answer (same job id)."""
    first = seen.setdefault(key, row.line)
    if first != row.line:
        raise InvalidRequestError(
            f"line {row.line} has the same key {row.key!r} as line {first}: keys must be "
            "unique (a row with no id, or that cannot be read, is keyed by its line number). "
            "Fix the input, or choose the key with --id-field"
        )


def _start(
    task: LabelTask, row: Row | BadRow, fingerprint: str, retries: int
) -> asyncio.Future[LabelResult]:
    """Submit the row's job (once per job id) and return a future of its result."""
    if isinstance(row, BadRow):
        return _done(_invalid(row.key, row.line, row.error, retries))
    try:
        query = task.template.render(row.fields)
        job = task.model.submit(
            task.kind,
            task.target,
            query,
            inst=task.inst,
            genconf=task.genconf,
            job_id=row_job_id(fingerprint, row.key, retries + 1),
            once=True,
            lane="bulk",
        )
    except InvalidRequestError as exc:
        return _done(_invalid(row.key, row.line, f"line {row.line}: {exc}", retries))
    return asyncio.ensure_future(_collect(_Pending(row, job, retries, time.monotonic())))


async def _collect(pending: _Pending) -> LabelResult:
    """The row's result. A failed, cancelled or timed-out job is a failed row; what stops
    every row alike (no worker, no Redis) propagates and stops the run."""
    job = pending.job
    envelope: Envelope | None = None
    try:
        envelope = await job.envelope_async()
        value = job.value_of(envelope)
    except (JobFailedError, JobCancelledError, JobTimeoutError) as exc:
        return pending.failed(exc, envelope)
    return LabelResult(
        key=pending.row.key,
        line=pending.row.line,
        status="done",
        result=to_jsonable_python(value),
        attempts=envelope.attempts,
        retries=pending.retries,
        usage=envelope.usage,
        latency_s=time.monotonic() - pending.started,
        job_id=job.id,
        label_probs=envelope.label_probs,
    )


def _invalid(key: Any, line: int, message: str, retries: int) -> LabelResult:
    """A row that could not become a job: nothing ran."""
    error = {"type": "InvalidRow", "message": message, "raw_text": None}
    return LabelResult(
        key=key, line=line, status="failed", error=error, attempts=0, retries=retries
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
        self.arrivals: asyncio.Queue[tuple[int, asyncio.Future[LabelResult]]] = asyncio.Queue()
        self.running: dict[int, asyncio.Future[LabelResult]] = {}
        self.finished: dict[int, LabelResult] = {}

    @property
    def size(self) -> int:
        return len(self.running) + len(self.finished)

    def add(self, sequence: int, future: asyncio.Future[LabelResult]) -> None:
        self.running[sequence] = future
        future.add_done_callback(lambda done: self._arrived(sequence, done))

    def _arrived(self, sequence: int, future: asyncio.Future[LabelResult]) -> None:
        if not future.cancelled():  # cancelled: by cancel(), when the run stops
            self.arrivals.put_nowait((sequence, future))

    async def next_results(self) -> list[LabelResult]:
        """Wait for at least one job, then the results that may leave now. A job whose wait
        raised raises here: the run stops (the other waits are cancelled by ``cancel``)."""
        futures = [await self.arrivals.get()]
        while not self.arrivals.empty():
            futures.append(self.arrivals.get_nowait())
        arrived = [(sequence, future.result()) for sequence, future in futures]
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
            if future.done() and not future.cancelled():
                future.exception()  # seen: no "exception was never retrieved" at exit
            future.cancel()
