"""The facade end to end: typed values through Redis and a real Celery worker (fake backend)."""

from __future__ import annotations

import asyncio
import dataclasses
import enum
from datetime import date, datetime
from typing import Annotated, Any, Literal, Optional

import pydantic
import pytest
from typing_extensions import TypedDict

from producer import (
    Client,
    ConfigurationError,
    Envelope,
    InvalidRequestError,
    JobStatus,
    Models,
    UnknownModelError,
    UnsupportedTargetError,
)
from tests.conftest import Worker


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


@dataclasses.dataclass
class Address:
    city: str
    zip_code: Optional[str] = None  # noqa: UP045 - Optional is part of the spec


@dataclasses.dataclass
class Person:
    name: str
    age: int
    address: Address


class Invoice(pydantic.BaseModel):
    number: str
    issued: date
    lines: list[Person]


class Point(TypedDict):
    x: int
    y: int


TARGETS: list[Any] = [
    str,
    int,
    float,
    bool,
    list[str],
    dict[str, int],
    Literal["yes", "no"],
    Color,
    Optional[int],  # noqa: UP045
    int | str,
    Annotated[list[str], "English first names"],
    Person,
    Invoice,
    Point,
    datetime,
    date,
]


@pytest.fixture
def model(client: Client, fake_worker: Worker) -> Any:
    return Models.create("fake", client=client)


def _is_instance(value: Any, target: Any) -> bool:
    return bool(pydantic.TypeAdapter(target).validate_python(value) == value)


class TestSync:
    @pytest.mark.parametrize("target", TARGETS, ids=str)
    def test_extract_returns_the_requested_type(self, model: Any, target: Any) -> None:
        value = model.extract(target, "anything")
        assert _is_instance(value, target)
        if dataclasses.is_dataclass(target) or (
            isinstance(target, type) and issubclass(target, pydantic.BaseModel)
        ):
            assert type(value) is target

    def test_classify_returns_one_of_the_labels(self, model: Any) -> None:
        assert model.classify(["spam", "ham"], "Win a prize!") in ("spam", "ham")
        assert isinstance(model.classify(Color, "grass"), Color)
        assert model.classify(Literal["a", "b"], "pick") in ("a", "b")

    def test_json_dataclass_pydantic_and_text(self, model: Any) -> None:
        assert model.json("give me an object") == {}
        schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
        assert model.json("n?", json_schema=schema) == {"n": 0}
        assert isinstance(model.dataclass(Person, "John, 42, Paris"), Person)
        assert isinstance(model.pydantic(Invoice, "invoice"), Invoice)
        assert model.call("hello") == "fake output"
        assert model("hello", inst="be brief") == "fake output"

    def test_query_may_be_a_list_of_messages(self, model: Any) -> None:
        messages = [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "a number?"},
        ]
        assert model.extract(int, messages) == 0


class TestAsync:
    async def test_await_gives_the_typed_value(self, model: Any) -> None:
        assert isinstance(await model.extract_async(Person, "John"), Person)
        assert await model.classify_async(["x", "y"], "q") == "x"
        assert await model.call_async("hi") == "fake output"

    async def test_handles_work_with_gather_as_completed_and_wait_for(self, model: Any) -> None:
        jobs = [model.extract_async(int, f"number {i}") for i in range(50)]
        assert await asyncio.gather(*jobs) == [0] * 50
        done = [await job for job in asyncio.as_completed([model.call_async("a") for _ in "abc"])]
        assert done == ["fake output"] * 3
        assert await asyncio.wait_for(model.extract_async(list[int], "q"), timeout=30) == [0]

    async def test_envelope_describes_the_run(self, model: Any) -> None:
        envelope = await model.extract_async(int, "how many?").envelope_async()
        assert isinstance(envelope, Envelope)
        assert envelope.value == {"output": 0}
        assert envelope.raw_text == '{"output": 0}'
        assert envelope.finish_reason == "stop"
        assert envelope.usage.prompt_tokens > 0
        assert envelope.worker.startswith("sibylq-fake-")
        assert envelope.timings.run_s >= 0


class TestJobHandle:
    def test_status_goes_from_pending_to_success(self, client: Client, fake_worker: Worker) -> None:
        job = Models.create("fake:delay=0.5", client=client).call_async("slow")
        assert job.status() in (JobStatus.PENDING, JobStatus.STARTED)
        job.result(timeout=30)
        assert job.status() is JobStatus.SUCCESS

    def test_result_times_out_with_a_typed_error(self, client: Client, fake_worker: Worker) -> None:
        from producer import JobTimeoutError

        job = Models.create("fake:delay=3", client=client).call_async("slow")
        with pytest.raises(JobTimeoutError, match=job.id):
            job.result(timeout=0.3)
        assert job.result(timeout=30) == "fake output"

    def test_no_worker_is_reported_with_the_command_to_start_one(self, client: Client) -> None:
        from producer import NoWorkerError

        job = Models.create("llamacpp:nobody-serves-this", client=client).call_async("hi")
        with pytest.raises(NoWorkerError) as caught:
            job.result(timeout=60)
        assert caught.value.queue == "sibylq.llamacpp.nobody-serves-this"
        assert "sibylq worker llamacpp:nobody-serves-this" in str(caught.value)

    async def test_no_worker_is_reported_to_awaiters_too(self, client: Client) -> None:
        from producer import NoWorkerError

        with pytest.raises(NoWorkerError):
            await Models.create("llamacpp:nobody", client=client).call_async("hi")

    def test_cancel_stops_a_queued_job(self, client: Client, fake_worker: Worker) -> None:
        from producer import JobCancelledError

        model = Models.create("fake:delay=1", client=client)
        blockers = [model.call_async("busy") for _ in range(8)]  # fill the worker's 8 threads
        queued = model.call_async("never runs")
        queued.cancel()
        with pytest.raises(JobCancelledError):
            queued.result(timeout=30)
        assert [job.result(timeout=30) for job in blockers] == ["fake output"] * 8

    def test_from_id_reattaches_in_another_process(
        self, client: Client, fake_worker: Worker, worker_env: dict[str, str]
    ) -> None:
        import subprocess
        import sys

        job = Models.create("fake", client=client).extract_async(Person, "John")
        code = (
            "import sys; from producer import Job; "
            "print(Job.from_id(sys.argv[1], model='fake').result(timeout=30))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code, job.id], env=worker_env, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "{'name': 'fake', 'age': 0, 'address': {'city': 'fake'}}"

    def test_from_id_with_a_target_gives_the_typed_value(
        self, client: Client, fake_worker: Worker
    ) -> None:
        from producer import Job

        job_id = Models.create("fake", client=client).extract_async(Person, "John").id
        assert isinstance(Job.from_id(job_id, target=Person, client=client).result(30), Person)


class TestBadInput:
    """Bad input fails in the caller's process, before anything is enqueued."""

    def test_unknown_provider(self, client: Client) -> None:
        with pytest.raises(UnknownModelError, match="unknown provider 'gpt'"):
            Models.create("gpt:4", client=client)

    def test_bad_fake_option(self, client: Client) -> None:
        with pytest.raises(ConfigurationError, match="delay"):
            Models.create("fake:delay=-1", client=client)

    def test_unsupported_type(self, model: Any) -> None:
        class Opaque:
            pass

        with pytest.raises(UnsupportedTargetError):
            model.extract(Opaque, "x")
        with pytest.raises(TypeError):  # it is a TypeError too
            model.dataclass(dict, "x")

    @pytest.mark.parametrize("labels", [[], ["a", 3], ["a", ""], "spam,ham", ["a", "a"]])
    def test_bad_labels(self, model: Any, labels: Any) -> None:
        with pytest.raises(InvalidRequestError):
            model.classify(labels, "x")

    @pytest.mark.parametrize("query", ["", "   ", [], [{"role": "user", "content": " "}]])
    def test_empty_query(self, model: Any, query: Any) -> None:
        with pytest.raises(InvalidRequestError):
            model.call(query)

    def test_invalid_json_schema(self, model: Any) -> None:
        with pytest.raises(InvalidRequestError, match="not a valid JSON schema"):
            model.json("x", json_schema={"type": "no-such-type"})
        with pytest.raises(InvalidRequestError, match="not valid JSON"):
            model.json("x", json_schema="{broken")

    def test_invalid_genconf(self, model: Any) -> None:
        # 0 is all of the context left, -1 to -100 a percentage of it (Sibila): -101 is wrong
        with pytest.raises(InvalidRequestError, match="max_tokens"):
            model.call("x", genconf={"max_tokens": -101})
