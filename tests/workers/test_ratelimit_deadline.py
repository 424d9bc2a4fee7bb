"""docs/resilience.md, "Jobs run long": a backend ends its rate-limit wait by the job's time
limit. A request whose turn in the fleet's limits comes after the job's deadline does not sleep
until it: the job is parked at once (its next run has a limit of its own), and nothing is sent.
Against the real limiter (Redis) and the OpenAI stub, through the real SDK."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import openai
import pytest

from tests.openai_stub import OpenAIStub
from wire.contract import GenConf, Message
from wire.settings import RateLimit, Settings
from workers.backends.base import CompletionRequest, Deadline, RetryLater
from workers.backends.openai_api import OpenAIBackend

LIMIT_S = 1.0


@pytest.fixture(scope="module")
def stub() -> Iterator[OpenAIStub]:
    with OpenAIStub() as server:
        yield server


def request(deadline: Deadline) -> CompletionRequest:
    return CompletionRequest(
        model="stub",
        messages=(Message(role="user", content="Who is it?"),),
        json_schema=None,
        genconf=GenConf(),
        deadline=deadline,
    )


def test_a_rate_limit_turn_past_the_deadline_parks_the_job_at_once(
    stub: OpenAIStub, settings: Settings
) -> None:
    limited = settings.model_copy(
        update={"rate_limits": {"stub": RateLimit(rpm=6)}, "rate_limit_max_wait_s": 60.0}
    )  # one request every 10 s, and a worker would wait up to 60 s for its turn
    api_key = f"sk-test-deadline-{uuid.uuid4().hex}"  # a fresh limiter scope
    client = openai.OpenAI(base_url=stub.base_url, api_key=api_key, max_retries=0, timeout=5)
    backend = OpenAIBackend(limited, client=client)
    stub.clear()
    backend.complete(request(Deadline.after(30)))  # takes the turn: the next is 10 s away

    started = time.monotonic()
    with pytest.raises(RetryLater) as parked:
        backend.complete(request(Deadline.after(LIMIT_S)))
    waited_s = time.monotonic() - started

    assert waited_s < LIMIT_S + 0.5, waited_s  # not the 10 s to its turn
    assert "rate limit" in str(parked.value)
    assert len(stub.log) == 1  # the second request was never sent
