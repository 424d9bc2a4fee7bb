"""``sibylq retry``: run dead letters again.

``retry_dead`` re-enqueues a dead job under its own id, queue and priority, so whoever waits
on or later reads that id gets the new result. The steps are ordered so that a crash midway
never loses the job: the failed result and the delivery count are deleted (a worker drops a
delivery whose result is final, and refuses one delivered too often), the job is enqueued,
and only then is its dead letter removed. A crash before that removal leaves the job both
enqueued and listed; retrying it again only runs it twice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from redis import Redis, WatchError

from producer.client import Client
from wire.constants import DEAD_LETTERS_KEY, attempts_key, dead_letter_key, result_key
from wire.deadletters import DeadLetter, load, scan
from wire.errors import InvalidRequestError


def retry_dead(
    client: Client,
    job_ids: Sequence[str] | None,
    on_retried: Callable[[str], None] = lambda job_id: None,
) -> list[str]:
    """Re-enqueue the dead jobs ``job_ids`` (None: every one that can run again, oldest first)
    under their own ids, queues and priorities; returns the ids, each also told to
    ``on_retried`` as soon as it is enqueued (so that a failure midway, Redis going away, say,
    leaves the caller knowing which ones went). Raises ``InvalidRequestError``, before
    enqueueing anything, naming the ids that are not dead letters or that hold a message no
    worker could decode (there is no job to run)."""
    if job_ids is None:
        found = [(letter, raw) for letter, raw in scan(client.redis, None) if letter.job][::-1]
    else:
        found = load(client.redis, job_ids)
        _refuse_undecodable([letter for letter, _ in found])
    for letter, raw in found:
        _retry(client, letter, raw)
        on_retried(letter.job_id)
    return [letter.job_id for letter, _ in found]


def _refuse_undecodable(letters: Sequence[DeadLetter]) -> None:
    refused = [f"{one.job_id} ({one.message.reason})" for one in letters if one.message]
    if refused:
        raise InvalidRequestError(
            f"cannot retry {', '.join(refused)}: no worker could decode the message, so there is "
            "no job to run. `sibylq failed --json` shows it as received (base64); submit the job "
            "again, or forget it with `sibylq failed --purge`"
        )


def _retry(client: Client, letter: DeadLetter, raw: bytes | str) -> None:
    if letter.job is None:  # refused by retry_dead
        raise InvalidRequestError(f"dead letter {letter.job_id} holds no job")
    client.redis.delete(result_key(letter.job_id), attempts_key(letter.job_id))
    # A fresh created_at: its queue wait (metrics, `sibylq status`) starts now.
    job = letter.job.model_copy(update={"created_at": datetime.now(UTC)})
    client.submit(job, letter.queue, letter.job_id, priority=letter.priority)
    _remove_unless_changed(client.redis, letter.job_id, raw)


def _remove_unless_changed(redis: Redis, job_id: str, raw: bytes | str) -> None:
    """Remove the dead letter read as ``raw``: not a newer one, recorded if the retried job
    already failed again."""
    key = dead_letter_key(job_id)
    with redis.pipeline(transaction=True) as pipe:
        try:
            pipe.watch(key)  # type: ignore[no-untyped-call]
            if pipe.get(key) != raw:
                return
            pipe.multi()
            pipe.delete(key)
            pipe.zrem(DEAD_LETTERS_KEY, job_id)
            pipe.execute()
        except WatchError:
            return  # recorded again between the GET and the EXEC
