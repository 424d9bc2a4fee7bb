"""Remote-API workers under real provider limits, against the stub with fault injection:
429s with Retry-After, 5xx, stalls past the timeout, invalid JSON; a fleet-wide pause after a
429; retries that wait in Redis, not in a worker; dead letters for what finally fails."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from embedded.redis_server import RedisServer
from producer import Models
from producer.client import Client
from producer.job import JobStatus
from producer.models import Model
from tests.conftest import Worker, wait_for
from tests.openai_stub import Chaos, Exchange, OpenAIStub
from wire.constants import rate_limit_keys
from wire.deadletters import list_dead
from wire.errors import BackendError, OutputValidationError
from wire.settings import Settings
from workers.ratelimit import scope_for

API_KEY = "sk-test-retries"
QUEUE = "sibylq.test-retries"
STRICT_QUEUE = "sibylq.test-retries-strict"
LABELS = ["spam", "ham"]


@pytest.fixture(scope="module")
def stub() -> Iterator[OpenAIStub]:
    with OpenAIStub(chaos=Chaos(retry_after_s=0.3, stall_s=3.0)) as server:
        yield server


def _env(stub: OpenAIStub, **settings: str) -> dict[str, str]:
    return {
        "OPENAI_BASE_URL": stub.base_url,
        "OPENAI_API_KEY": API_KEY,
        "SIBYLQ_OPENAI_TIMEOUT_S": "1",
        "SIBYLQ_RETRY_BACKOFF_S": "0.05",
        "SIBYLQ_RETRY_BACKOFF_MAX_S": "0.5",
        **{f"SIBYLQ_{name.upper()}": value for name, value in settings.items()},
    }


@pytest.fixture(scope="module")
def workers(start_worker: Callable[..., Worker], stub: OpenAIStub) -> list[Worker]:
    """Two remote workers sharing the endpoint and key: a fleet."""
    env = _env(stub, openai_max_retries="30")
    return [start_worker("openai", "-c", "16", "-Q", QUEUE, queue=QUEUE, env=env) for _ in "ab"]


@pytest.fixture(scope="module")
def strict(settings: Settings, redis_server: RedisServer) -> Iterator[Client]:
    """A producer for ``strict_worker``'s Redis database."""
    client = Client(settings.model_copy(update={"broker_url": _strict_url(redis_server)}))
    yield client
    client.close()


@pytest.fixture(scope="module")
def strict_worker(
    start_worker: Callable[..., Worker], stub: OpenAIStub, redis_server: RedisServer
) -> Worker:
    """One slot, one retry, and a lease (visibility timeout) shorter than the waits it is told.
    On its own Redis database: workers sharing a database must share their lease."""
    env = _env(stub, openai_max_retries="1", visibility_timeout_s="2")
    env["SIBYLQ_BROKER_URL"] = _strict_url(redis_server)
    return start_worker("openai", "-c", "1", "-Q", STRICT_QUEUE, queue=STRICT_QUEUE, env=env)


def _strict_url(redis_server: RedisServer) -> str:
    return redis_server.url.rsplit("/", 1)[0] + "/1"


def _prompt() -> str:
    return f"Is this spam? {uuid.uuid4()}"


async def test_every_job_finishes_through_429s_500s_and_stalls_and_none_retries_early(
    client: Client, workers: list[Worker], stub: OpenAIStub
) -> None:
    model = Models.create("openai:stub-chaos", client=client, queue=QUEUE)

    jobs = [model.classify_async(LABELS, _prompt()) for _ in range(60)]
    envelopes = await asyncio.wait_for(asyncio.gather(*(job.envelope_async() for job in jobs)), 120)

    assert all(envelope.value["output"] in LABELS for envelope in envelopes)
    faults = [exchange.fault for exchange in stub.log if exchange.model == "stub-chaos"]
    assert {"rate_limit", "server_error", "stall"} <= set(faults)  # it was really exercised
    assert stub.violations == []  # no request came before its Retry-After had passed
    # Each job's tokens are those of the call that answered it (failed calls bill none).
    assert all(envelope.usage.total_tokens > 0 for envelope in envelopes)


def test_a_429_pauses_every_worker_sharing_the_key_and_model(
    client: Client, workers: list[Worker], stub: OpenAIStub
) -> None:
    name = f"stub-ratelimit-first-{uuid.uuid4().hex[:8]}"
    model = Models.create(f"openai:{name}", client=client, queue=QUEUE)
    first = model.classify_async(LABELS, _prompt())
    limited = wait_for("the 429", lambda: _exchanges(stub, name, status=429), timeout_s=15)[0]
    pause_key = rate_limit_keys(scope_for(stub.base_url, API_KEY, name))[2]
    wait_for("the fleet-wide pause", lambda: client.redis.exists(pause_key), timeout_s=5)

    others = [model.classify_async(LABELS, _prompt()) for _ in range(6)]
    for job in [first, *others]:
        assert job.result(timeout=30) in LABELS

    later = [e for e in _exchanges(stub, name) if e.received_at > limited.received_at]
    assert len(later) == 7
    assert limited.retry_after_s is not None
    assert min(e.received_at for e in later) >= limited.received_at + limited.retry_after_s


def test_invalid_json_is_re_asked_with_the_error_and_then_succeeds(
    client: Client, workers: list[Worker], stub: OpenAIStub
) -> None:
    prompt = _prompt()
    envelope = (
        Models.create("openai:stub-invalid-once", client=client, queue=QUEUE)
        .classify_async(LABELS, prompt)
        .envelope(timeout=30)
    )

    assert envelope.value["output"] in LABELS
    assert envelope.attempts == 2
    asked = [e.body for e in stub.log if prompt in str(e.body["messages"])]
    assert len(asked) == 2
    reask = asked[1]["messages"]
    assert reask[-2] == {"role": "assistant", "content": "this is not json"}
    assert "not valid JSON" in reask[-1]["content"]
    # Tokens over both calls, as the stub counts them (words).
    prompt_words = sum(len(m["content"].split()) for body in asked for m in body["messages"])
    answer_words = len(["this", "is", "not", "json"]) + len(envelope.raw_text.split())
    assert envelope.usage.prompt_tokens == prompt_words
    assert envelope.usage.completion_tokens == answer_words


def test_output_still_invalid_after_the_re_asks_is_a_dead_letter_with_every_output(
    client: Client, workers: list[Worker], settings: Settings
) -> None:
    job = Models.create("openai:stub-invalid", client=client, queue=QUEUE).classify_async(
        LABELS, _prompt()
    )

    with pytest.raises(OutputValidationError, match="after 3 tries") as raised:
        job.result(timeout=30)

    assert raised.value.raw_outputs == ("this is not json",) * 3  # SIBYLQ_REASK_MAX=2
    letter = next(letter for letter in list_dead(client.redis) if letter.job_id == job.id)
    assert letter.queue == QUEUE and letter.failure.type == "OutputValidationError"
    assert letter.failure.raw_outputs == ("this is not json",) * 3
    assert letter.failure.attempts == 3 and letter.failure.usage.total_tokens > 0


def test_a_client_error_fails_at_once_and_is_a_dead_letter(
    client: Client, workers: list[Worker], stub: OpenAIStub
) -> None:
    prompt = _prompt()
    job = Models.create("openai:stub-status-401", client=client, queue=QUEUE).call_async(prompt)

    with pytest.raises(BackendError, match="401"):
        job.result(timeout=30)

    assert len([e for e in stub.log if prompt in str(e.body["messages"])]) == 1
    assert any(letter.job_id == job.id for letter in list_dead(client.redis))


def test_retries_are_used_up_then_the_job_fails(
    strict: Client, strict_worker: Worker, stub: OpenAIStub
) -> None:
    prompt = _prompt()
    job = _strict(strict, "stub-status-503").call_async(prompt)

    with pytest.raises(
        BackendError, match=r"gave up after 1 retries \(SIBYLQ_OPENAI_MAX_RETRIES\)"
    ):
        job.result(timeout=30)

    assert len([e for e in stub.log if prompt in str(e.body["messages"])]) == 2


def test_a_job_waiting_for_its_retry_holds_no_worker_slot(
    strict: Client, strict_worker: Worker, stub: OpenAIStub
) -> None:
    waiting = _strict(strict, "stub-ratelimit-3000").call_async(_prompt())
    wait_for("the retry wait", lambda: waiting.status() == JobStatus.RETRY, timeout_s=15)

    started = time.monotonic()
    answer = _strict(strict, "stub").call(_prompt(), timeout=30)  # the worker's only slot

    assert answer.startswith("stub reply:")
    assert time.monotonic() - started < 2.5
    assert waiting.status() == JobStatus.RETRY


def test_a_parked_job_is_not_redelivered_by_the_visibility_timeout(
    strict: Client, strict_worker: Worker, stub: OpenAIStub
) -> None:
    # Told to wait 4 s, longer than the 2 s lease: the job waits parked, its message acked,
    # and asks exactly twice.
    prompt = _prompt()
    job = _strict(strict, "stub-ratelimit-4000").call_async(prompt)

    with pytest.raises(BackendError, match="gave up after 1 retries"):
        job.result(timeout=30)

    asked = [e for e in stub.log if prompt in str(e.body["messages"])]
    assert len(asked) == 2
    assert asked[1].received_at - asked[0].received_at >= 4.0
    assert stub.violations == []


def test_with_an_rpm_limit_four_workers_together_keep_to_it(
    client: Client, start_worker: Callable[..., Worker], stub: OpenAIStub
) -> None:
    queue, rpm = "sibylq.test-rpm", 600
    env = _env(stub, rate_limits=f'{{"stub-paced": {{"rpm": {rpm}}}}}')
    for _ in range(4):
        start_worker("openai", "-c", "8", "-Q", queue, queue=queue, env=env)
    model = Models.create("openai:stub-paced", client=client, queue=queue)

    jobs = [model.call_async(_prompt()) for _ in range(120)]
    for job in jobs:
        job.result(timeout=60)

    arrivals = sorted(e.received_at for e in _exchanges(stub, "stub-paced"))
    observed_rpm = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0]) * 60
    assert len(arrivals) == 120
    assert abs(observed_rpm - rpm) <= 0.05 * rpm, observed_rpm


def _strict(strict: Client, name: str) -> Model:
    return Models.create(f"openai:{name}", client=strict, queue=STRICT_QUEUE)


def _exchanges(stub: OpenAIStub, model: str, status: int | None = None) -> list[Exchange]:
    return [e for e in stub.log if e.model == model and (status is None or e.status == status)]
