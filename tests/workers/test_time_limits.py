"""A remote-API job's time limit holds on a threads pool, where Celery enforces none: the request
is cut at the limit, the job fails typed, and it is neither retried nor run again."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable

import pytest

from producer import Client, JobTimeLimitError, Models
from tests.conftest import HEARTBEAT_S, Worker, wait_for
from tests.openai_stub import OpenAIStub
from wire.constants import attempts_key

QUEUE = "sibylq.test-time-limits"
LIMIT_S = 2.0
STALL_S = 4 * LIMIT_S


@pytest.fixture(scope="module")
def limited_worker(
    start_worker: Callable[..., Worker], openai_stub: OpenAIStub, client: Client
) -> Worker:
    env = {
        "OPENAI_BASE_URL": openai_stub.base_url,
        "OPENAI_API_KEY": "sk-test-time-limits",
        "SIBYLQ_JOB_TIME_LIMIT_S": str(LIMIT_S),
        "SIBYLQ_OPENAI_TIMEOUT_S": str(10 * STALL_S),  # only the time limit can cut it short
        "SIBYLQ_VISIBILITY_TIMEOUT_S": str(4 * HEARTBEAT_S),  # a lease shorter than the limit
    }
    worker = start_worker("openai", "-c", "4", "-Q", QUEUE, queue=QUEUE, env=env)
    # The first job loads the backend (imports the openai SDK: seconds on a busy machine), which
    # counts towards its time limit: it may fail, the jobs after it start at once.
    with contextlib.suppress(JobTimeLimitError):
        Models.create("openai:stub", client=client, queue=QUEUE).call("warm up", timeout=30)
    return worker


def test_a_request_past_the_time_limit_fails_the_job_typed_and_is_not_retried(
    client: Client, limited_worker: Worker, openai_stub: OpenAIStub
) -> None:
    prompt = f"take your time {uuid.uuid4()}"
    model = Models.create(f"openai:stub-slow-{int(STALL_S * 1000)}", client=client, queue=QUEUE)
    started = time.monotonic()
    job = model.call_async(prompt)

    with pytest.raises(JobTimeLimitError, match=r"time limit of 2 s .*SIBYLQ_JOB_TIME_LIMIT_S"):
        job.result(timeout=30)

    assert time.monotonic() - started < STALL_S  # cut at the limit, not at the answer
    asked = [e for e in openai_stub.log if prompt in str(e.body["messages"])]
    assert len(asked) == 1  # not retried, not parked, not run again
    assert int(client.redis.get(attempts_key(job.id)) or 0) == 1
    wait_for(
        "its message to be acknowledged: nothing left to deliver again",
        lambda: not any(job.id.encode() in entry for entry in client.redis.hvals("unacked")),
    )
    assert int(client.redis.get(attempts_key(job.id)) or 0) == 1
