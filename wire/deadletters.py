"""Dead letters: jobs that finally failed, kept so they can be read and run again.

A worker ``record``\\ s a job once it fails for good (no retry left). Two keys hold it:

- ``sibylq:dead-letter:<job id>``: the ``DeadLetter`` as JSON (the job, its queue and
  priority, the failure with every raw output), expiring after ``dead_letters_expire_s``;
- ``sibylq:dead-letters``: the index, a sorted set of job ids by time of failure (unix s),
  pruned of entries older than that by every ``record``, and of entries whose record expired
  by every ``list_dead``.

A message that a worker could not even decode into a job (not Celery's format, not JSON, not
UTF-8, no job id...) is kept too, as a version-2 letter: no ``job``, but its ``message`` as
received (``RawMessage``: its bytes in base64, and why it was refused), under its job id when
it names one, else under ``undecodable_id`` of its bytes. It cannot be retried: there is no
job to run. Version-1 letters (a job that ran and failed) are stored exactly as before.

Re-enqueueing one is an operator's command (``sibylq.deadletters.retry_dead``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from itertools import islice
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator
from redis import Redis

from .constants import DEAD_LETTERS_KEY, dead_letter_key
from .contract import Failure, JobSpec, decode_model
from .errors import ContractError, InvalidRequestError

#: Index entries read per round trip while listing.
_PAGE = 500


class RawMessage(BaseModel):
    """A message a worker could not decode into a job, as it was received."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: Why the worker refused it.
    reason: str
    #: Its bytes, in base64: they may be anything (not JSON, not UTF-8).
    data: str

    @classmethod
    def of(cls, raw: bytes, reason: str) -> RawMessage:
        return cls(reason=reason, data=base64.b64encode(raw).decode("ascii"))

    def raw(self) -> bytes:
        return base64.b64decode(self.data)

    def text(self) -> str:
        """Its bytes as text, undecodable bytes replaced: for display only."""
        return self.raw().decode("utf-8", errors="replace")


def undecodable_id(raw: bytes) -> str:
    """The dead-letter id of an undecodable message that names no job: the same bytes, the same
    letter."""
    return f"undecodable-{hashlib.sha256(raw).hexdigest()[:16]}"


class DeadLetter(BaseModel):
    """A job that finally failed: what it was, where it ran, and how it failed. Version 2: a
    message that never became a job (``job`` None, ``message`` as received)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: Literal[1, 2] = 1
    job_id: str
    queue: str
    priority: int = 0
    job: JobSpec | None = None
    message: RawMessage | None = None
    failure: Failure
    failed_at: datetime
    #: The hostname of the worker it failed on.
    worker: str

    @model_validator(mode="after")
    def _job_or_message(self) -> DeadLetter:
        expected = 1 if self.message is None else 2
        if self.version != expected or (self.job is None) == (self.message is None):
            raise ValueError(
                "a version-1 dead letter holds its job, a version-2 one the raw message that "
                "never became a job"
            )
        return self

    @classmethod
    def undecodable(
        cls,
        *,
        job_id: str | None,
        queue: str,
        priority: int,
        message: RawMessage,
        failure: Failure,
        worker: str,
    ) -> DeadLetter:
        return cls(
            version=2,
            job_id=job_id or undecodable_id(message.raw()),
            queue=queue,
            priority=priority,
            message=message,
            failure=failure,
            failed_at=datetime.now(UTC),
            worker=worker,
        )

    def encode(self) -> dict[str, Any]:
        # A version-1 letter keeps its original shape: older readers forbid unknown keys.
        return self.model_dump(mode="json", exclude={"message"} if self.message is None else None)

    @classmethod
    def decode(cls, data: object) -> DeadLetter:
        return decode_model(cls, data)


def record(redis: Redis, letter: DeadLetter, expire_s: int) -> None:
    """Store ``letter`` for ``expire_s`` seconds and index it, in one MULTI/EXEC; index
    entries older than ``expire_s`` go at the same time. Redis errors propagate."""
    with redis.pipeline(transaction=True) as pipe:
        pipe.set(dead_letter_key(letter.job_id), json.dumps(letter.encode()), ex=expire_s)
        pipe.zadd(DEAD_LETTERS_KEY, {letter.job_id: _unix(letter.failed_at)})
        pipe.zremrangebyscore(DEAD_LETTERS_KEY, "-inf", f"({time.time() - expire_s}")
        pipe.expire(DEAD_LETTERS_KEY, expire_s)  # every record is gone by then too
        pipe.execute()


def list_dead(
    redis: Redis,
    *,
    queue: str | None = None,
    limit: int | None = 100,
    unreadable: list[str] | None = None,
) -> list[DeadLetter]:
    """Dead letters, newest first (only ``queue``'s when given; all of them with ``limit``
    None). Index entries whose record expired are skipped and pruned; the ids of records that
    cannot be read go to ``unreadable`` (when given) instead of stopping the listing."""
    if limit is not None and limit < 1:
        raise InvalidRequestError(f"the limit must be at least 1, not {limit}")
    return [letter for letter, _ in islice(scan(redis, queue, unreadable), limit)]


def purge_dead(redis: Redis, job_ids: Sequence[str] | None) -> int:
    """Forget the dead letters ``job_ids`` (None: all); returns how many there were."""
    if job_ids is None:
        job_ids = [_text(member) for member in redis.zrange(DEAD_LETTERS_KEY, 0, -1)]
    if not job_ids:
        return 0
    with redis.pipeline(transaction=True) as pipe:
        pipe.delete(*[dead_letter_key(job_id) for job_id in job_ids])
        pipe.zrem(DEAD_LETTERS_KEY, *job_ids)
        deleted, _ = pipe.execute()
    return int(deleted)


def scan(
    redis: Redis, queue: str | None, unreadable: list[str] | None = None
) -> Iterator[tuple[DeadLetter, bytes | str]]:
    """Every live dead letter (and its stored JSON), newest first, a page at a time. A record
    that cannot be read (garbled, or a newer sibylq's) raises ContractError, unless
    ``unreadable`` is given: then its id goes there and the scan goes on."""
    offset = 0
    seen: set[str] = set()  # a record() meanwhile shifts the index down: skip repeats
    while page := [
        _text(member) for member in redis.zrevrange(DEAD_LETTERS_KEY, offset, offset + _PAGE - 1)
    ]:
        stored = redis.mget([dead_letter_key(job_id) for job_id in page])
        expired = [job_id for job_id, raw in zip(page, stored, strict=True) if raw is None]
        if expired:
            redis.zrem(DEAD_LETTERS_KEY, *expired)
        offset += len(page) - len(expired)
        for job_id, raw in zip(page, stored, strict=True):
            if raw is not None and job_id not in seen:
                seen.add(job_id)
                try:
                    letter = _parse(raw)
                except ContractError:
                    if unreadable is None:
                        raise
                    unreadable.append(job_id)
                    continue
                if queue is None or letter.queue == queue:
                    yield letter, raw


def load(redis: Redis, job_ids: Sequence[str]) -> list[tuple[DeadLetter, bytes | str]]:
    """The dead letters ``job_ids`` (and their stored JSON); raises ``InvalidRequestError``
    naming the ids that are none."""
    unique = list(dict.fromkeys(job_ids))
    stored = redis.mget([dead_letter_key(job_id) for job_id in unique]) if unique else []
    missing = [job_id for job_id, raw in zip(unique, stored, strict=True) if raw is None]
    if missing:
        raise InvalidRequestError(
            f"no failed job {', '.join(missing)} (retried, purged or expired?): "
            "`sibylq failed` lists the failed jobs"
        )
    return [(_parse(raw), raw) for raw in stored if raw is not None]


def _parse(raw: bytes | str) -> DeadLetter:
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ContractError(f"not a valid DeadLetter: {exc}", raw) from exc
    return DeadLetter.decode(data)


def _unix(moment: datetime) -> float:
    return (moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)).timestamp()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
