"""A remote-API worker end to end, against two OpenAI-compatible servers: the project's stub
and llama-cpp-python's own server (a real third-party implementation)."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import pytest

from producer import (
    BackendError,
    Client,
    Models,
    OutputValidationError,
    PromptTooLongError,
)
from tests.conftest import LLAMA_SERVER_QUEUE, Worker
from tests.openai_stub import OpenAIStub


@dataclasses.dataclass
class Person:
    name: str
    age: int


@pytest.fixture
def stub_model(client: Client, openai_worker: Worker) -> Any:
    def create(name: str = "stub") -> Any:
        return Models.create(f"openai:{name}", client=client)

    return create


class TestAgainstTheStub:
    def test_extract_through_json_schema(self, stub_model: Any) -> None:
        assert stub_model().extract(Person, "John, 42") == Person(name="fake", age=0)

    def test_text(self, stub_model: Any) -> None:
        assert stub_model().call("hello") == "stub reply: hello"

    @pytest.mark.parametrize("name", ["stub-no-json-schema", "stub-tools-only"])
    def test_falls_back_when_json_schema_is_refused(self, stub_model: Any, name: str) -> None:
        assert stub_model(name).classify(["a", "b"], "pick") == "a"
        assert stub_model(name).extract(list[int], "numbers") == [0]

    def test_truncated_output_is_a_validation_error(self, stub_model: Any) -> None:
        with pytest.raises(OutputValidationError) as caught:
            stub_model("stub-truncate").extract(Person, "John")
        assert caught.value.finish_reason == "length"

    def test_invalid_json_is_a_validation_error_with_the_raw_text(self, stub_model: Any) -> None:
        with pytest.raises(OutputValidationError) as caught:
            stub_model("stub-invalid").extract(Person, "John")
        assert caught.value.raw_text == "this is not json"

    def test_context_overflow(self, stub_model: Any) -> None:
        with pytest.raises(PromptTooLongError):
            stub_model("stub-context").call("long")

    def test_http_errors_come_back_typed_without_the_api_key(self, stub_model: Any) -> None:
        with pytest.raises(BackendError) as caught:
            stub_model("stub-status-401").call("hello")
        assert "401" in str(caught.value)
        assert "sk-test-secret" not in str(caught.value)

    async def test_many_jobs_at_once(self, stub_model: Any, openai_stub: OpenAIStub) -> None:
        import asyncio

        model = stub_model("stub-slow-200")
        results = await asyncio.gather(*(model.extract_async(int, f"q{i}") for i in range(64)))
        assert results == [0] * 64


class TestAgainstLlamaCppServer:
    @pytest.fixture
    def model(self, client: Client, llama_server_worker: Worker) -> Any:
        return Models.create(
            "openai:smollm2", client=client, queue=LLAMA_SERVER_QUEUE, genconf={"max_tokens": 128}
        )

    def test_classify(self, model: Any) -> None:
        label = model.classify(Literal["spam", "ham"], "WIN a FREE cruise, reply now!")
        assert label in ("spam", "ham")

    def test_extract_a_dataclass(self, model: Any) -> None:
        person = model.extract(Person, "John Smith is 42 years old.")
        assert isinstance(person, Person)
        assert isinstance(person.age, int)

    def test_text(self, model: Any) -> None:
        assert isinstance(model.call("Say hi.", genconf={"max_tokens": 8}), str)
