"""The answer cache: identical temperature-0 requests are answered from Redis, by the producer
before enqueueing or by a worker for duplicates already queued, and never when it's off."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest

from producer import Models
from producer.client import Client
from producer.messages import build_messages
from producer.targets import target_for
from tests.conftest import Worker
from wire.cache import CACHE_WORKER, cache_digest
from wire.constants import cache_key
from wire.contract import JobKind, JobSpec
from wire.settings import Settings

QUEUE = "sibylq.test-cache"
TTL_S = 600


@pytest.fixture(scope="module")
def cache_worker(start_worker: Callable[..., Worker]) -> Worker:
    env = {"SIBYLQ_CACHE": "true", "SIBYLQ_CACHE_TTL_S": str(TTL_S)}
    return start_worker("fake", "-c", "2", "-Q", QUEUE, queue=QUEUE, env=env)


@pytest.fixture(scope="module")
def cached(settings: Settings) -> Iterator[Client]:
    client = Client(settings.model_copy(update={"cache": True, "cache_ttl_s": TTL_S}))
    yield client
    client.close()


def _prompt() -> str:
    return f"is this spam? {uuid.uuid4()}"


def test_an_identical_request_is_answered_from_the_cache(
    cached: Client, cache_worker: Worker
) -> None:
    model = Models.create("fake", client=cached, queue=QUEUE)
    prompt = _prompt()

    first = model.classify_async(["spam", "ham"], prompt).envelope(timeout=30)
    second = model.classify_async(["spam", "ham"], prompt).envelope(timeout=30)

    assert not first.cached and first.usage.total_tokens > 0
    assert second.cached and second.worker == CACHE_WORKER
    assert second.value == first.value and second.raw_text == first.raw_text
    assert second.usage.total_tokens == 0 and second.attempts == 0


def test_cached_answers_expire_after_the_ttl(cached: Client, cache_worker: Worker) -> None:
    model = Models.create("fake", client=cached, queue=QUEUE)
    prompt = _prompt()
    model.extract_async(int, prompt).result(timeout=30)

    ttl = cached.redis.ttl(cache_key(_digest(int, prompt)))

    assert 0 < ttl <= TTL_S


def test_a_request_with_temperature_is_never_cached(cached: Client, cache_worker: Worker) -> None:
    model = Models.create("fake", client=cached, queue=QUEUE, genconf={"temperature": 0.7})
    prompt = _prompt()

    envelopes = [model.extract_async(int, prompt).envelope(timeout=30) for _ in range(2)]

    assert [envelope.cached for envelope in envelopes] == [False, False]


def test_a_worker_answers_a_queued_duplicate_from_the_cache(
    cached: Client, client: Client, cache_worker: Worker
) -> None:
    prompt = _prompt()
    Models.create("fake", client=cached, queue=QUEUE).extract_async(str, prompt).result(30)

    # A producer with its cache off enqueues the duplicate all the same: the worker knows it.
    duplicate = Models.create("fake", client=client, queue=QUEUE).extract_async(str, prompt)
    envelope = duplicate.envelope(timeout=30)

    assert envelope.cached
    assert envelope.worker != CACHE_WORKER  # answered by the worker, without the model


def test_with_the_cache_off_nothing_is_cached_or_read(
    client: Client, start_worker: Callable[..., Worker]
) -> None:
    queue = "sibylq.test-no-cache"
    start_worker("fake", "-Q", queue, queue=queue, env={"SIBYLQ_CACHE": "false"})
    model = Models.create("fake", client=client, queue=queue)
    prompt = _prompt()

    envelopes = [model.extract_async(str, prompt).envelope(timeout=30) for _ in range(2)]

    assert [envelope.cached for envelope in envelopes] == [False, False]
    assert not client.redis.exists(cache_key(_digest(str, prompt)))


def _digest(target: object, prompt: str) -> str:
    """The cache digest of the job ``Model.extract_async(target, prompt)`` sends."""
    spec = JobSpec(
        model="fake",
        kind=JobKind.EXTRACT,
        messages=build_messages(prompt, None),
        json_schema=target_for(target).json_schema,
    )
    digest = cache_digest(spec)
    assert digest is not None
    return digest
