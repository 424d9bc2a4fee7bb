"""Dead letters: jobs that finally failed, listed and run again, against the session's real
Redis and real ``fake`` workers."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import redis

from producer import Client, ContractError, InvalidRequestError, Job, JobFailedError, JobStatus
from sibylq.deadletters import retry_dead
from tests.conftest import Worker, wait_for
from tests.dead_letters import EXPIRE_S, FAKE, PARKED, bury, dead_letter, undecodable_letter
from wire.constants import (
    DEAD_LETTERS_KEY,
    LANE_PRIORITIES,
    attempts_key,
    dead_letter_key,
    queue_list_keys,
    result_key,
)
from wire.contract import JobSpec
from wire.deadletters import (
    DeadLetter,
    list_dead,
    purge_dead,
    record,
    undecodable_id,
)


def ids(letters: list[DeadLetter]) -> list[str]:
    return [letter.job_id for letter in letters]


def waiting_message(broker: redis.Redis, queue: str, job_id: str) -> tuple[int, dict[str, object]]:
    """The priority step of the list holding ``job_id``'s message on ``queue``, and its
    kombu envelope."""
    for key in queue_list_keys(queue):
        for raw in broker.lrange(key, 0, -1):
            message = json.loads(raw)
            if message["headers"]["id"] == job_id:
                step = key.rsplit("\x16", 1)[1] if key != queue else "0"
                return int(step), message
    raise AssertionError(f"no message for {job_id} on {queue}")


class TestRecordAndList:
    def test_letters_come_back_newest_first_with_every_raw_output(
        self, dead_letters: redis.Redis
    ) -> None:
        middle, oldest, newest = (
            dead_letter("middle", ago_s=20),
            dead_letter("oldest", ago_s=30, raw_outputs=("a", "b", "c")),
            dead_letter("newest", ago_s=10),
        )
        for letter in (middle, oldest, newest):
            record(dead_letters, letter, EXPIRE_S)

        listed = list_dead(dead_letters)

        assert listed == [newest, middle, oldest]
        assert listed[-1].failure.raw_outputs == ("a", "b", "c")
        assert dead_letters.ttl(dead_letter_key("newest")) > EXPIRE_S - 60

    def test_a_queue_filter_and_a_limit_narrow_the_list(self, dead_letters: redis.Redis) -> None:
        for n in range(6):
            record(
                dead_letters,
                dead_letter(f"job-{n}", queue=(FAKE, PARKED)[n % 2], ago_s=10 - n),
                EXPIRE_S,
            )

        assert ids(list_dead(dead_letters, queue=PARKED)) == ["job-5", "job-3", "job-1"]
        assert ids(list_dead(dead_letters, queue=FAKE, limit=2)) == ["job-4", "job-2"]
        assert list_dead(dead_letters, queue="sibylq.nobody") == []
        assert len(list_dead(dead_letters, limit=None)) == 6

    def test_a_limit_below_one_is_refused(self, dead_letters: redis.Redis) -> None:
        with pytest.raises(InvalidRequestError, match="at least 1"):
            list_dead(dead_letters, limit=0)

    def test_recording_prunes_index_entries_older_than_the_expiry(
        self, dead_letters: redis.Redis
    ) -> None:
        record(dead_letters, dead_letter("two-hours-old", ago_s=7200), 10 * EXPIRE_S)
        record(dead_letters, dead_letter("fresh"), EXPIRE_S)

        assert dead_letters.zscore(DEAD_LETTERS_KEY, "two-hours-old") is None
        assert ids(list_dead(dead_letters)) == ["fresh"]

    def test_listing_skips_and_prunes_entries_whose_record_expired(
        self, dead_letters: redis.Redis
    ) -> None:
        for job_id in ("kept", "expiring"):
            record(dead_letters, dead_letter(job_id), EXPIRE_S)
        dead_letters.pexpire(dead_letter_key("expiring"), 1)
        wait_for(
            "the record to expire", lambda: not dead_letters.exists(dead_letter_key("expiring"))
        )

        assert ids(list_dead(dead_letters)) == ["kept"]
        assert dead_letters.zscore(DEAD_LETTERS_KEY, "expiring") is None

    def test_a_record_that_is_not_a_dead_letter_is_a_contract_error(
        self, dead_letters: redis.Redis
    ) -> None:
        dead_letters.set(dead_letter_key("garbled"), '{"job_id": "garbled"}')
        dead_letters.zadd(DEAD_LETTERS_KEY, {"garbled": 1.0})

        with pytest.raises(ContractError, match="not a valid DeadLetter") as caught:
            list_dead(dead_letters)
        assert caught.value.data == {"job_id": "garbled"}

    def test_purge_forgets_the_given_letters_or_all(self, dead_letters: redis.Redis) -> None:
        for job_id in ("a", "b", "c"):
            record(dead_letters, dead_letter(job_id), EXPIRE_S)

        assert purge_dead(dead_letters, ["a", "unknown"]) == 1
        assert sorted(ids(list_dead(dead_letters))) == ["b", "c"]
        assert purge_dead(dead_letters, None) == 2
        assert list_dead(dead_letters) == []
        assert not dead_letters.exists(DEAD_LETTERS_KEY, dead_letter_key("b"))


class TestRetry:
    def test_a_retried_job_runs_again_under_its_id_and_priority_and_succeeds(
        self,
        dead_letters: redis.Redis,
        client: Client,
        start_worker: Callable[..., Worker],
    ) -> None:
        letter = dead_letter("retried-bulk-job", queue=PARKED, priority=LANE_PRIORITIES["bulk"])
        bury(dead_letters, letter)
        job = Job.from_id(letter.job_id, client=client, queue=PARKED)
        with pytest.raises(JobFailedError, match="not valid JSON"):
            job.result(timeout=5)

        assert retry_dead(client, [letter.job_id]) == [letter.job_id]

        assert list_dead(dead_letters) == []
        assert not dead_letters.exists(result_key(letter.job_id), attempts_key(letter.job_id))
        step, _message = waiting_message(dead_letters, PARKED, letter.job_id)
        assert step == LANE_PRIORITIES["bulk"]
        start_worker("fake", "-Q", PARKED, queue=PARKED)
        assert job.result(timeout=30) == "fake output"
        assert job.status() is JobStatus.SUCCESS

    def test_retrying_none_reruns_every_dead_job(
        self, dead_letters: redis.Redis, client: Client, fake_worker: Worker
    ) -> None:
        letters = [dead_letter(f"rerun-{n}", ago_s=10 - n) for n in range(3)]
        for letter in letters:
            bury(dead_letters, letter)

        assert retry_dead(client, None) == ["rerun-0", "rerun-1", "rerun-2"]  # oldest first

        for letter in letters:
            assert Job.from_id(letter.job_id, client=client, queue=FAKE).result(30) == "fake output"
        assert list_dead(dead_letters) == []

    def test_an_unknown_id_is_refused_by_name_and_nothing_is_enqueued(
        self, dead_letters: redis.Redis, client: Client
    ) -> None:
        letter = dead_letter("still-dead", queue=PARKED)
        bury(dead_letters, letter)

        with pytest.raises(InvalidRequestError, match=r"no failed job no-such-job .*sibylq failed"):
            retry_dead(client, [letter.job_id, "no-such-job"])

        assert list_dead(dead_letters) == [letter]
        assert Job.from_id(letter.job_id, client=client).status() is JobStatus.FAILURE

    def test_a_job_that_fails_again_before_its_retry_finishes_stays_listed(
        self, dead_letters: redis.Redis, client: Client, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        first = dead_letter("fails-twice", queue=PARKED, ago_s=60)
        again = dead_letter("fails-twice", queue=PARKED, ago_s=0)
        bury(dead_letters, first)
        submit = client.submit

        def submit_then_fail_again(spec: JobSpec, queue: str, job_id: str, **kw: int) -> str:
            submitted = submit(spec, queue, job_id, **kw)
            record(dead_letters, again, EXPIRE_S)  # what its worker does when it fails at once
            return submitted

        monkeypatch.setattr(client, "submit", submit_then_fail_again)

        assert retry_dead(client, [first.job_id]) == [first.job_id]

        assert list_dead(dead_letters) == [again]


class TestUndecodableMessages:
    RAW = b"\x00\xff{not json, not UTF-8"

    def test_a_message_no_worker_could_decode_is_kept_byte_for_byte(
        self, dead_letters: redis.Redis
    ) -> None:
        record(dead_letters, undecodable_letter(self.RAW), EXPIRE_S)

        [letter] = list_dead(dead_letters)

        assert letter.job_id == undecodable_id(self.RAW)
        assert letter.job is None and letter.message is not None
        assert letter.message.raw() == self.RAW
        stored = json.loads(dead_letters.get(dead_letter_key(letter.job_id)) or "")
        assert (stored["version"], stored["job"]) == (2, None)

    def test_a_version_1_letter_keeps_the_shape_older_readers_know(
        self, dead_letters: redis.Redis
    ) -> None:
        letter = dead_letter("as-before")
        shape = {"version", "job_id", "queue", "priority", "job", "failure", "failed_at", "worker"}

        assert set(letter.encode()) == shape
        assert DeadLetter.decode(letter.encode()) == letter
        with pytest.raises(ContractError, match="raw message"):
            DeadLetter.decode({**letter.encode(), "version": 2})

    def test_retrying_one_is_refused_by_name_and_nothing_is_enqueued(
        self, dead_letters: redis.Redis, client: Client
    ) -> None:
        job = dead_letter("retryable", queue=PARKED)
        bury(dead_letters, job)
        record(dead_letters, undecodable_letter(self.RAW, "named-but-broken"), EXPIRE_S)

        with pytest.raises(InvalidRequestError, match=r"named-but-broken .*no worker could decode"):
            retry_dead(client, [job.job_id, "named-but-broken"])

        assert sorted(ids(list_dead(dead_letters))) == ["named-but-broken", "retryable"]
        assert Job.from_id(job.job_id, client=client).status() is JobStatus.FAILURE

    def test_retrying_every_dead_job_skips_them(
        self, dead_letters: redis.Redis, client: Client
    ) -> None:
        record(dead_letters, undecodable_letter(self.RAW), EXPIRE_S)

        assert retry_dead(client, None) == []
        assert ids(list_dead(dead_letters)) == [undecodable_id(self.RAW)]
