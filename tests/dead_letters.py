"""Dead letters made by hand, as a worker leaves them when a job finally fails: for the tests
that list, purge and retry them (the library's and the ``sibylq`` command's)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import redis

from wire.constants import attempts_key, queue_name, result_key
from wire.contract import Failure, JobKind, JobSpec, Message
from wire.deadletters import DeadLetter, RawMessage, purge_dead, record

EXPIRE_S = 3600
FAKE = queue_name("fake")
#: No worker serves it until the test that needs one starts it: retried jobs wait there.
PARKED = queue_name("fake", "dead-letters")


def without_dead_letters(url: str) -> Iterator[redis.Redis]:
    results = redis.Redis.from_url(url)
    purge_dead(results, None)
    yield results
    purge_dead(results, None)
    results.close()


def dead_letter(
    job_id: str,
    *,
    queue: str = FAKE,
    priority: int = 0,
    ago_s: float = 1.0,
    raw_outputs: tuple[str, ...] = ('{"name": 1}', '{"name": "Ann"'),
) -> DeadLetter:
    """A fake job that failed ``ago_s`` seconds ago, after re-asks that wrote ``raw_outputs``."""
    return DeadLetter(
        job_id=job_id,
        queue=queue,
        priority=priority,
        job=JobSpec(
            model="fake",
            kind=JobKind.TEXT,
            messages=(Message(role="user", content=f"say something for {job_id}"),),
        ),
        failure=Failure(
            type="OutputValidationError",
            message="the output is not valid JSON for the schema: Expecting ',' delimiter",
            raw_text=raw_outputs[-1] if raw_outputs else None,
            finish_reason="length",
            raw_outputs=raw_outputs,
            attempts=len(raw_outputs),
        ),
        failed_at=datetime.now(UTC) - timedelta(seconds=ago_s),
        worker="celery@test-host",
    )


def undecodable_letter(raw: bytes, job_id: str | None = None, *, queue: str = FAKE) -> DeadLetter:
    """A message a worker could not decode, as ``workers.intake`` keeps it."""
    reason = "the body is not JSON"
    return DeadLetter.undecodable(
        job_id=job_id,
        queue=queue,
        priority=0,
        message=RawMessage.of(raw, reason),
        failure=Failure(type="ContractError", message=f"could not be decoded: {reason}"),
        worker="test-host",
    )


def bury(results: redis.Redis, letter: DeadLetter, max_deliveries: int = 3) -> None:
    """What a worker leaves when a job finally fails: the dead letter, the FAILURE result
    (Celery's format) and a delivery count at the limit."""
    record(results, letter, EXPIRE_S)
    meta = {
        "status": "FAILURE",
        "result": {
            "exc_type": "JobFailure",
            "exc_message": [letter.failure.encode()],
            "exc_module": "workers.task",
        },
        "traceback": None,
        "children": [],
        "date_done": letter.failed_at.isoformat(),
        "task_id": letter.job_id,
    }
    results.set(result_key(letter.job_id), json.dumps(meta), ex=EXPIRE_S)
    results.set(attempts_key(letter.job_id), max_deliveries, ex=EXPIRE_S)
