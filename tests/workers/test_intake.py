"""The screen every popped queue entry goes through (``workers.intake``), and the rule every
stored result follows (the first final result wins), against the session's real Redis.

Entries are real ones, as the producer and the parking promoter send them, broken on purpose.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import redis

from producer import Client, Settings
from wire.constants import queue_name, result_key
from wire.contract import Envelope, Failure, JobKind, JobSpec, Message, Timings, Usage
from wire.outcome import envelope_from_meta
from workers.celery_app import create_app
from workers.delivery import store_failure, store_success
from workers.intake import MAX_NESTING, screen

QUEUE = queue_name("fake", "intake")  # served by no worker: entries wait there to be read


@pytest.fixture
def entries(client: Client) -> Iterator[redis.Redis]:
    """The broker, with ``QUEUE`` empty before and after the test."""
    broker = redis.Redis.from_url(client.connect().broker)
    broker.delete(QUEUE)
    yield broker
    broker.delete(QUEUE)
    broker.close()


def sent(entries: redis.Redis, send: Callable[[], object]) -> dict[str, Any]:
    """The queue entry that ``send`` pushed, decoded."""
    send()
    raw = entries.rpop(QUEUE)
    assert raw is not None
    return dict(json.loads(raw))


def job() -> JobSpec:
    return JobSpec(
        model="fake", kind=JobKind.TEXT, messages=(Message(role="user", content="hello"),)
    )


@pytest.fixture
def entry(client: Client, entries: redis.Redis) -> dict[str, Any]:
    return sent(entries, lambda: client.submit(job(), QUEUE))


def encoded(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode()


def with_body(message: dict[str, Any], body: Any) -> dict[str, Any]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return {**message, "body": base64.b64encode(raw).decode()}


def with_properties(message: dict[str, Any], **changed: Any) -> dict[str, Any]:
    """``message`` with properties changed (None: removed)."""
    properties = {**message["properties"], **changed}
    return {**message, "properties": {k: v for k, v in properties.items() if v is not None}}


def body_of(message: dict[str, Any]) -> Any:
    return json.loads(base64.b64decode(message["body"]))


def nested(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = [value]
    return value


class TestWhatPasses:
    def test_a_job_as_the_producer_sends_it(self, entry: dict[str, Any]) -> None:
        assert screen(encoded(entry)) is None

    def test_a_parked_job_sent_again_with_its_progress(
        self, client: Client, entries: redis.Redis
    ) -> None:
        progress = {"retries": 1, "calls": 2, "usage": {"prompt_tokens": 3}, "raw_outputs": []}
        again = sent(
            entries,
            lambda: client.celery.send_task(
                "sibylq.run_job",
                args=[job().encode()],
                kwargs={"carry": progress},
                queue=QUEUE,
                routing_key=QUEUE,
            ),
        )
        assert screen(encoded(again)) is None


class TestWhatIsRefused:
    @pytest.mark.parametrize(
        ("raw", "reason"),
        [
            (b"\x00not json\xff", "not UTF-8 JSON"),
            (b"[1, 2, 3]", "not a JSON object"),
            (b'"a string"', "not a JSON object"),
        ],
    )
    def test_an_entry_that_is_no_message_names_no_job(self, raw: bytes, reason: str) -> None:
        refusal = screen(raw)
        assert refusal is not None and reason in refusal.reason and refusal.job_id is None

    @pytest.mark.parametrize(
        ("break_it", "reason"),
        [
            (lambda m: with_body(m, {"a": 1}), "not Celery's [args, kwargs, embed]"),
            (lambda m: with_body(m, b"not json{"), "the body is not JSON"),
            (lambda m: with_body(m, b'[[{"a": "\xff"}], {}, {}]'), "not base64 of UTF-8"),
            (lambda m: {**m, "body": "*not base64*"}, "not base64"),
            (lambda m: {k: v for k, v in m.items() if k != "body"}, "no body"),
            (lambda m: {k: v for k, v in m.items() if k != "properties"}, "no properties"),
            (lambda m: {k: v for k, v in m.items() if k != "headers"}, "no headers"),
            (lambda m: {**m, "content-type": "application/x-python-serialize"}, "JSON only"),
            (lambda m: {**m, "headers": {**m["headers"], "task": "os.system"}}, "is not"),
            (lambda m: {**m, "headers": {**m["headers"], "eta": "2030-01-01"}}, "no ETA"),
            (lambda m: {**m, "headers": {**m["headers"], "timelimit": "x"}}, "time limits"),
            (lambda m: {**m, "headers": {**m["headers"], "group": {"a": 1}}}, "strings"),
            (lambda m: with_body(m, [[], {}, {}]), "not one job object"),
            (lambda m: with_body(m, [[{}], {"x": 1}, {}]), "keyword arguments"),
            (lambda m: with_body(m, [[{}], {"carry": {"calls": "many"}}, {}]), "progress"),
            (lambda m: with_body(m, [[{}], {}, {"callbacks": [{}]}]), "callbacks"),
            (lambda m: with_body(m, [[{"deep": nested(MAX_NESTING)}], {}, {}]), "levels deep"),
            (lambda m: with_properties(m, delivery_info=None), "no exchange and routing key"),
            (lambda m: with_properties(m, delivery_info={"exchange": ""}), "no exchange and"),
            (lambda m: with_properties(m, correlation_id=[1]), "correlation id"),
            (lambda m: {**m, "headers": {**m["headers"], "x": nested(MAX_NESTING)}}, "nest more"),
            (lambda m: with_properties(m, x={"deep": nested(MAX_NESTING)}), "nest more"),
        ],
    )
    def test_a_broken_message_names_its_job(
        self, entry: dict[str, Any], break_it: Callable[[dict[str, Any]], Any], reason: str
    ) -> None:
        refusal = screen(encoded(break_it(entry)))

        assert refusal is not None and reason in refusal.reason
        assert refusal.job_id == entry["headers"]["id"]

    def test_without_an_id_header_the_correlation_id_names_the_job(
        self, entry: dict[str, Any]
    ) -> None:
        headers = {k: v for k, v in entry["headers"].items() if k != "id"}
        refusal = screen(encoded({**entry, "headers": headers}))
        assert refusal is not None and refusal.job_id == entry["properties"]["correlation_id"]

    def test_a_body_nested_just_within_the_limit_passes_the_screen(
        self, entry: dict[str, Any]
    ) -> None:
        args, kwargs, embed = body_of(entry)
        deep = {**args[0], "json_schema": {"x": nested(MAX_NESTING - 5)}}
        assert screen(encoded(with_body(entry, [[deep], kwargs, embed]))) is None


# -- the first final result stored wins -------------------------------------------------------


def envelope(value: str) -> Envelope:
    now = datetime.now(UTC)
    return Envelope(
        value=value,
        raw_text=value,
        finish_reason="stop",
        usage=Usage(),
        model="fake",
        worker="test",
        timings=Timings(created_at=now, started_at=now, finished_at=now),
    )


@pytest.fixture
def results(settings: Settings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(settings.result_url)
    yield client
    client.close()


def stored(results: redis.Redis, job_id: str) -> dict[str, Any]:
    raw = results.get(result_key(job_id))
    assert raw is not None
    return dict(json.loads(raw))


def announcements(results: redis.Redis, job_id: str, act: Callable[[], None]) -> list[Any]:
    """What ``act`` PUBLISHed on the job's channel."""
    channel = results.pubsub(ignore_subscribe_messages=True)
    channel.subscribe(result_key(job_id))
    channel.get_message(timeout=1)  # the subscription's confirmation
    act()
    heard = []
    while (message := channel.get_message(timeout=0.5)) is not None:
        heard.append(json.loads(message["data"]))
    channel.close()
    return heard


def test_a_second_success_neither_replaces_nor_announces_the_first(
    settings: Settings, results: redis.Redis
) -> None:
    job_id = f"first-wins-{uuid.uuid4()}"

    def both() -> None:
        assert store_success(job_id, job(), envelope("run 1"), settings)
        assert not store_success(job_id, job(), envelope("run 2"), settings)

    heard = announcements(results, job_id, both)

    assert envelope_from_meta(stored(results, job_id), job_id).value == "run 1"
    assert [envelope_from_meta(meta, job_id).value for meta in heard] == ["run 1"]


def test_celerys_own_writes_never_replace_a_final_result(
    settings: Settings, results: redis.Redis
) -> None:
    backend = create_app(settings).backend
    failed, succeeded = f"failed-{uuid.uuid4()}", f"succeeded-{uuid.uuid4()}"
    assert store_failure(failed, Failure(type="BackendError", message="run 1"), settings)
    assert store_success(succeeded, job(), envelope("run 1"), settings)

    for job_id in (failed, succeeded):
        before = stored(results, job_id)

        def late_writes(job_id: str = job_id) -> None:
            backend.mark_as_failure(job_id, RuntimeError("run 2"))
            backend.store_result(job_id, None, "RETRY")

        assert announcements(results, job_id, late_writes) == []
        assert stored(results, job_id) == before

    fresh = f"fresh-{uuid.uuid4()}"
    backend.mark_as_failure(fresh, RuntimeError("the only run"))
    assert stored(results, fresh)["status"] == "FAILURE"
    assert not store_success(fresh, job(), envelope("too late"), settings)
