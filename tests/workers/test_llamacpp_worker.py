"""A llama.cpp worker running the bundled SmolLM2: real generation, typed values.

SmolLM2-135M is a weak model: these tests check validity and types, never accuracy.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import pytest
import redis

from embedded.redis_server import RedisServer
from producer import (
    BackendError,
    Client,
    Job,
    JobCancelledError,
    JobKind,
    JobSpec,
    Message,
    Models,
    OutputValidationError,
    PromptTooLongError,
)
from tests.conftest import Worker, wait_for
from wire.constants import queue_name, result_key
from workers.cli import llama_threads


@dataclasses.dataclass
class Person:
    name: str
    age: int
    city: str


BATCH_QUEUE = queue_name("llamacpp", "batching")


@pytest.fixture
def model(client: Client, llama_worker: Worker) -> Any:
    return Models.create("llamacpp:smollm2", client=client, genconf={"max_tokens": 128})


@pytest.fixture(scope="module")
def batch_worker(start_worker: Callable[..., Worker]) -> Worker:
    """A worker decoding 8 jobs together in one process (``SIBYLQ_LLAMA_BATCH=8``)."""
    env = {"SIBYLQ_LLAMA_BATCH": "8"}
    return start_worker("llamacpp:smollm2", "-Q", BATCH_QUEUE, queue=BATCH_QUEUE, env=env)


@pytest.fixture
def batched(client: Client, batch_worker: Worker) -> Any:
    genconf = {"max_tokens": 128}
    return Models.create("llamacpp:smollm2", client=client, queue=BATCH_QUEUE, genconf=genconf)


def test_classify_returns_one_of_the_labels(model: Any) -> None:
    label = model.classify(["spam", "not spam"], "I am a Nigerian prince and will make you rich!")
    assert label in ("spam", "not spam")


def test_extract_a_dataclass(model: Any) -> None:
    person = model.extract(Person, "John Smith is 42 years old and lives in Paris.")
    assert isinstance(person, Person)
    assert isinstance(person.age, int)


async def test_extract_async_a_list(model: Any) -> None:
    job = model.extract_async(
        list[str], "Generate 3 English first names", genconf={"max_tokens": 96}
    )
    try:
        names = await job
    except OutputValidationError as exc:  # a 135M model may loop until max_tokens
        assert exc.finish_reason == "length"
    else:
        assert isinstance(names, list)
        assert all(isinstance(name, str) for name in names)


async def test_a_burst_of_classify_and_extract_jobs_runs_at_once_in_one_process(
    batched: Any, batch_worker: Worker
) -> None:
    model = batched
    jobs = [
        *(model.classify_async(["spam", "ham"], f"Is this SMS spam? Offer {n}!") for n in range(5)),
        *(model.extract_async(Person, f"Ann Lee is {n + 30} and lives in Rome.") for n in range(3)),
    ]
    envelopes = [await job.envelope_async(timeout=180) for job in jobs]
    values = [job.value_of(envelope) for job, envelope in zip(jobs, envelopes, strict=True)]
    assert all(value in ("spam", "ham") for value in values[:5])
    assert all(isinstance(value, Person) for value in values[5:])
    # One worker process (one model copy) ran every job, all at the same time.
    assert len({envelope.worker for envelope in envelopes}) == 1
    timings = [envelope.timings for envelope in envelopes]
    assert max(t.started_at for t in timings) < min(t.finished_at for t in timings)
    assert "llama batching engine: 8 sequences x n_ctx 2048 = 16384 KV cells" in batch_worker.log()


def test_a_revoked_job_ends_mid_generation(
    batched: Any, batch_worker: Worker, redis_server: RedisServer
) -> None:
    story = "Write a very long story about a dragon."
    job = batched.call_async(story, genconf={"max_tokens": 2000})
    store = redis.Redis.from_url(redis_server.url)

    def stored(job_id: str, status: str) -> bytes | None:
        raw = store.get(result_key(job_id))
        return raw if raw is not None and f'"{status}"'.encode() in raw else None

    wait_for("the job to start", lambda: stored(job.id, "STARTED"), 60)
    job.cancel()
    with pytest.raises(JobCancelledError):
        job.result(timeout=30)
    # The engine ended the sequence (2000 tokens would take minutes): the run ends ignored,
    # not succeeded, and the job stays revoked.
    ended = f"Task sibylq.run_job[{job.id}] ignored"
    wait_for("the run to end", lambda: ended in batch_worker.log(), 60)
    assert stored(job.id, "REVOKED")


def test_text_and_envelope(model: Any) -> None:
    envelope = model.call_async("Say hello.", genconf={"max_tokens": 16}).envelope(timeout=60)
    assert isinstance(envelope.value, str)
    assert envelope.usage.completion_tokens > 0
    assert envelope.usage.prompt_tokens > 0
    assert envelope.worker.startswith("sibylq-llamacpp-smollm2-")


def test_output_cut_at_max_tokens_is_a_validation_error(model: Any) -> None:
    with pytest.raises(OutputValidationError) as caught:
        model.extract(Person, "John Smith is 42 and lives in Paris.", genconf={"max_tokens": 3})
    assert caught.value.finish_reason == "length"
    assert caught.value.raw_text
    assert "max_tokens=3" in str(caught.value)


def test_prompt_longer_than_the_context_is_a_typed_error(model: Any) -> None:
    with pytest.raises(PromptTooLongError, match="context"):
        model.call("word " * 5000)


def test_the_worker_keeps_serving_after_failures(model: Any, llama_worker: Worker) -> None:
    for _ in range(2):
        with pytest.raises(PromptTooLongError):
            model.call("word " * 5000)
    assert model.classify(["yes", "no"], "Is the sky blue?") in ("yes", "no")
    assert llama_worker.process.poll() is None


def test_a_job_with_images_from_elsewhere_fails_typed(client: Client, model: Any) -> None:
    """Producers refuse images for llama.cpp models before enqueueing; a job sent around that
    check fails on the worker with a BackendError saying why, and the worker goes on."""
    image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    message = Message.model_validate({"role": "user", "content": [image]})
    spec = JobSpec(model="llamacpp:smollm2", kind=JobKind.TEXT, messages=(message,))
    queue = queue_name("llamacpp", "smollm2")
    job = Job.from_id(client.submit(spec, queue), model=spec.model, client=client)
    with pytest.raises(BackendError, match="takes no images"):
        job.result(timeout=60)
    assert model.classify(["yes", "no"], "Is the sky blue?") in ("yes", "no")


@pytest.mark.parametrize("processes", [1, 2, 64])
def test_llama_threads_default_to_the_usable_cpus_shared_by_the_processes(processes: int) -> None:
    cpus = len(os.sched_getaffinity(0))
    assert llama_threads(processes) == max(1, cpus // processes)


def test_the_worker_runs_llama_cpp_on_its_cpus(model: Any, llama_worker: Worker) -> None:
    model.classify(["yes", "no"], "Is water wet?")  # the model is loaded by now
    assert f"n_threads={llama_threads(1)}," in llama_worker.log()
