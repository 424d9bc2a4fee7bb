"""The ``openai`` backend against a real HTTP server (the stub), through the real ``openai`` SDK.

The stub's behaviour is picked by the model name: see ``tests/openai_stub.py``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import openai
import pytest

from tests.openai_stub import MODELS, OpenAIStub
from wire.contract import GenConf, Message
from wire.errors import BackendError, JobTimeLimitError, PromptTooLongError
from wire.providers import PLACEHOLDER_API_KEY
from wire.settings import Settings
from workers.backends.base import CompletionRequest, Deadline, RetryLater
from workers.backends.openai_api import OpenAIBackend, build_client

API_KEY = "sk-test-0123456789abcdefghijklmnop"

PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}
PERSON_EXAMPLE = {"name": "fake", "age": 0}


@pytest.fixture(scope="module")
def stub() -> Iterator[OpenAIStub]:
    with OpenAIStub() as server:
        yield server


@pytest.fixture(autouse=True)
def _fresh(stub: OpenAIStub) -> None:
    stub.clear()


@pytest.fixture
def client(stub: OpenAIStub) -> openai.OpenAI:
    return openai.OpenAI(base_url=stub.base_url, api_key=API_KEY, max_retries=0, timeout=5)


@pytest.fixture
def backend(client: openai.OpenAI, settings: Settings) -> OpenAIBackend:
    return OpenAIBackend(settings, client=client)


def request(
    model: str = "stub",
    schema: dict[str, Any] | None = None,
    *,
    system: str | None = None,
    genconf: GenConf | None = None,
) -> CompletionRequest:
    messages = [Message(role="user", content="Who is it?")]
    if system is not None:
        messages.insert(0, Message(role="system", content=system))
    return CompletionRequest(
        model=model,
        messages=tuple(messages),
        json_schema=schema,
        genconf=genconf or GenConf(),
    )


def modes_sent(bodies: list[dict[str, Any]]) -> list[str]:
    """The structured output mode of each request the stub received."""
    return [
        "tools" if "tools" in body else body.get("response_format", {}).get("type", "text")
        for body in bodies
    ]


# -- text ---------------------------------------------------------------------------------------


def test_a_text_job_is_a_plain_chat_completion(backend: OpenAIBackend, stub: OpenAIStub) -> None:
    completion = backend.complete(request())

    assert completion.text == "stub reply: Who is it?"
    assert completion.finish_reason == "stop"
    assert completion.model == "stub"
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (3, 5)
    (sent,) = stub.requests
    assert "response_format" not in sent
    assert "tools" not in sent


def test_genconf_maps_to_request_parameters(backend: OpenAIBackend, stub: OpenAIStub) -> None:
    genconf = GenConf(max_tokens=50, temperature=0.5, top_p=0.9, stop=("###",), seed=7)

    backend.complete(request(genconf=genconf))

    (sent,) = stub.requests
    assert sent["model"] == "stub"
    assert sent["messages"] == [{"role": "user", "content": "Who is it?"}]
    assert (sent["max_tokens"], sent["temperature"], sent["top_p"]) == (50, 0.5, 0.9)
    assert (sent["stop"], sent["seed"]) == (["###"], 7)


def test_empty_stop_and_unset_seed_are_not_sent(backend: OpenAIBackend, stub: OpenAIStub) -> None:
    backend.complete(request())

    (sent,) = stub.requests
    assert "stop" not in sent
    assert "seed" not in sent


# -- structured output modes --------------------------------------------------------------------


def test_a_structured_job_uses_json_schema_first(backend: OpenAIBackend, stub: OpenAIStub) -> None:
    completion = backend.complete(request("gpt-4o-mini", PERSON))

    assert json.loads(completion.text) == PERSON_EXAMPLE
    assert completion.finish_reason == "stop"
    (sent,) = stub.requests
    assert sent["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": PERSON, "strict": False},
    }
    assert backend.remembered_mode("gpt-4o-mini") == "json_schema"


@pytest.mark.parametrize("model", ["stub-no-json-schema", "stub-tools-only"])
def test_it_falls_back_to_a_forced_tool_call_and_remembers_it(
    backend: OpenAIBackend, stub: OpenAIStub, model: str
) -> None:
    first = backend.complete(request(model, PERSON))
    second = backend.complete(request(model, PERSON))

    assert json.loads(first.text) == json.loads(second.text) == PERSON_EXAMPLE
    assert first.finish_reason == "stop"  # "tool_calls", normalized
    assert modes_sent(stub.requests) == ["json_schema", "tools", "tools"]
    tool_request = stub.requests[-1]
    assert tool_request["tools"] == [
        {"type": "function", "function": {"name": "output", "parameters": PERSON}}
    ]
    assert tool_request["tool_choice"] == {"type": "function", "function": {"name": "output"}}
    assert backend.remembered_mode(model) == "tools"


def test_the_remembered_mode_is_per_model(backend: OpenAIBackend, stub: OpenAIStub) -> None:
    backend.complete(request("stub-tools-only", PERSON))
    backend.complete(request("stub", PERSON))

    assert modes_sent(stub.requests) == ["json_schema", "tools", "json_schema"]


def test_the_remembered_mode_belongs_to_its_backend(
    client: openai.OpenAI, stub: OpenAIStub, settings: Settings
) -> None:
    first, second = OpenAIBackend(settings, client=client), OpenAIBackend(settings, client=client)
    first.complete(request("stub-no-json-schema", PERSON))
    second.complete(request("stub-no-json-schema", PERSON))

    assert modes_sent(stub.requests) == ["json_schema", "tools", "json_schema", "tools"]


def test_json_object_is_the_last_resort(
    monkeypatch: pytest.MonkeyPatch, backend: OpenAIBackend, stub: OpenAIStub
) -> None:
    refuse_tools(monkeypatch)

    completion = backend.complete(request("stub-no-json-schema", PERSON, system="Be brief."))

    assert json.loads(completion.text) == PERSON_EXAMPLE
    assert modes_sent(stub.requests) == ["json_schema", "tools", "json_object"]
    sent = stub.requests[-1]
    assert sent["response_format"] == {"type": "json_object", "schema": PERSON}
    system, user = sent["messages"]
    assert system["role"] == "system"
    assert system["content"].startswith("Be brief.\n\n")
    assert json.dumps(PERSON) in system["content"]
    assert user == {"role": "user", "content": "Who is it?"}


def test_json_object_adds_a_system_message_when_there_is_none(
    monkeypatch: pytest.MonkeyPatch, backend: OpenAIBackend, stub: OpenAIStub
) -> None:
    refuse_tools(monkeypatch)

    backend.complete(request("stub-no-json-schema", PERSON))

    system, user = stub.requests[-1]["messages"]
    assert system["role"] == "system"
    assert json.dumps(PERSON) in system["content"]
    assert user["role"] == "user"


def test_when_every_mode_is_refused_it_says_which_were_tried(
    monkeypatch: pytest.MonkeyPatch, backend: OpenAIBackend
) -> None:
    refuse_tools(monkeypatch)

    with pytest.raises(BackendError) as raised:
        backend.complete(request("stub-tools-only", PERSON))

    message = str(raised.value)
    assert "json_schema, tools, json_object" in message
    assert "400" in message
    assert "response_format" in message


def refuse_tools(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the stub answer tool calls with a 400, as a server without tool support does."""
    import tests.openai_stub as stub_module

    original = stub_module._forced_tool

    def no_tools(body: dict[str, Any]) -> Any:
        if body.get("tools"):
            raise stub_module.StubError(400, "tools are not supported", param="tools")
        return original(body)

    monkeypatch.setattr(stub_module, "_forced_tool", no_tools)


# -- output the task layer must judge -----------------------------------------------------------


def test_truncated_output_comes_back_with_finish_reason_length(backend: OpenAIBackend) -> None:
    completion = backend.complete(request("stub-truncate", PERSON))

    assert completion.finish_reason == "length"
    assert completion.text == json.dumps(PERSON_EXAMPLE)[: len(json.dumps(PERSON_EXAMPLE)) // 2]


def test_truncated_tool_call_arguments_also_finish_with_length(
    backend: OpenAIBackend, stub: OpenAIStub
) -> None:
    backend.complete(request("stub-tools-only", PERSON))  # settles on tools for this model
    completion = backend.complete(request("stub-truncate", PERSON))

    assert completion.finish_reason == "length"


def test_invalid_output_is_returned_as_is(backend: OpenAIBackend) -> None:
    completion = backend.complete(request("stub-invalid", PERSON))

    assert completion.text == "this is not json"
    assert completion.finish_reason == "stop"


# -- errors -------------------------------------------------------------------------------------


def test_a_context_length_error_is_prompt_too_long(
    backend: OpenAIBackend, stub: OpenAIStub
) -> None:
    with pytest.raises(PromptTooLongError, match="maximum context length is 16 tokens"):
        backend.complete(request("stub-context", PERSON))

    assert len(stub.requests) == 1  # never a reason to try another mode


def test_a_context_length_error_on_a_text_job_is_prompt_too_long(backend: OpenAIBackend) -> None:
    with pytest.raises(PromptTooLongError):
        backend.complete(request("stub-context"))


@pytest.mark.parametrize(
    ("status", "schema"),
    # A 400 on a structured request reads as a refused mode (tested above).
    [(400, None), *((status, schema) for status in (401, 403, 404) for schema in (None, PERSON))],
)
def test_client_errors_fail_at_once_without_the_key(
    backend: OpenAIBackend, stub: OpenAIStub, status: int, schema: dict[str, Any] | None
) -> None:
    model = f"stub-status-{status}"
    with pytest.raises(BackendError) as raised:
        backend.complete(request(model, schema))

    message = str(raised.value)
    assert message.startswith(f"{status} from {stub.base_url}/chat/completions: ")
    assert API_KEY not in message
    assert API_KEY not in repr(raised.value.args)
    assert len(stub.requests) == 1


def test_a_key_echoed_by_the_server_is_redacted(
    monkeypatch: pytest.MonkeyPatch, backend: OpenAIBackend
) -> None:
    import tests.openai_stub as stub_module

    monkeypatch.setattr(stub_module, "_masked_key", lambda authorization: authorization)

    with pytest.raises(BackendError) as raised:
        backend.complete(request("stub-status-401"))

    assert API_KEY not in str(raised.value)
    assert "***" in str(raised.value)


@pytest.mark.parametrize("status", [408, 409, 500, 502, 503, 504])
@pytest.mark.parametrize("schema", [None, PERSON])
def test_transient_http_errors_ask_for_a_retry_after_one_request(
    backend: OpenAIBackend, stub: OpenAIStub, status: int, schema: dict[str, Any] | None
) -> None:
    with pytest.raises(RetryLater) as raised:
        backend.complete(request(f"stub-status-{status}", schema))

    assert raised.value.reason.startswith(f"{status} from {stub.base_url}/chat/completions: ")
    assert raised.value.counts
    assert API_KEY not in raised.value.reason
    assert len(stub.requests) == 1  # the SDK's own retries are off: sibylq retries, fleet-wide


@pytest.mark.parametrize("kind", ["html", "truncated", "bytes"])
@pytest.mark.parametrize("schema", [None, PERSON])
def test_a_body_that_is_no_chat_completion_asks_for_a_retry(
    backend: OpenAIBackend, stub: OpenAIStub, kind: str, schema: dict[str, Any] | None
) -> None:
    with pytest.raises(RetryLater, match="answered with a body that is no chat completion"):
        backend.complete(request(f"stub-garbled-{kind}", schema))


def test_a_choice_without_a_message_is_a_typed_error(backend: OpenAIBackend) -> None:
    with pytest.raises(BackendError, match="with no message"):
        backend.complete(request("stub-garbled-no-message"))


def test_a_usage_without_counts_counts_none(backend: OpenAIBackend) -> None:
    completion = backend.complete(request("stub-garbled-bad-usage"))

    assert completion.text
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (0, 0)


def test_an_unreachable_endpoint_asks_for_a_retry(settings: Settings) -> None:
    with OpenAIStub() as gone:
        base_url = gone.base_url
    client = openai.OpenAI(base_url=base_url, api_key=API_KEY, max_retries=0, timeout=5)

    with pytest.raises(RetryLater, match="cannot reach") as raised:
        OpenAIBackend(settings, client=client).complete(request())

    assert API_KEY not in raised.value.reason


def test_a_timeout_asks_for_a_retry(stub: OpenAIStub, settings: Settings) -> None:
    client = openai.OpenAI(base_url=stub.base_url, api_key=API_KEY, max_retries=0, timeout=0.2)
    quick = settings.model_copy(update={"openai_timeout_s": 0.2})

    with pytest.raises(RetryLater, match=r"no answer .* within 0\.2 s"):
        OpenAIBackend(quick, client=client).complete(request("stub-slow-1000"))


def test_a_body_sent_a_byte_at_a_time_ends_at_the_jobs_time_limit(settings: Settings) -> None:
    with OpenAIStub() as dripping:  # its own: a dripping answer holds a handler thread
        client = build_client(settings.model_copy(update={"openai_base_url": dripping.base_url}))
        started = time.monotonic()
        with pytest.raises(JobTimeLimitError):
            OpenAIBackend(settings, client=client).complete(
                replace(request("stub-drip-40"), deadline=Deadline.after(1.0))
            )
        assert time.monotonic() - started < 2.5  # the whole body would take ~10 s


def test_a_body_sent_a_byte_at_a_time_is_a_timeout_like_any_other(settings: Settings) -> None:
    quick = settings.model_copy(update={"openai_timeout_s": 1.0})
    with OpenAIStub() as dripping:
        client = build_client(quick.model_copy(update={"openai_base_url": dripping.base_url}))
        started = time.monotonic()
        with pytest.raises(RetryLater, match=r"no answer .* within 1 s"):
            OpenAIBackend(quick, client=client).complete(request("stub-drip-40"))
        assert time.monotonic() - started < 2.5


# -- the default client -------------------------------------------------------------------------


def test_the_default_client_is_built_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, stub: OpenAIStub, settings: Settings
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", stub.base_url)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    configured = settings.model_copy(update={"openai_timeout_s": 7, "openai_max_retries": 5})

    first = OpenAIBackend(configured)

    assert first._client.api_key == PLACEHOLDER_API_KEY
    # The SDK never retries: sibylq does (SIBYLQ_OPENAI_MAX_RETRIES), fleet-wide.
    assert (first._client.timeout, first._client.max_retries) == (7, 0)
    assert first.complete(request()).text == "stub reply: Who is it?"


# -- the stub itself, through the SDK -----------------------------------------------------------


def test_stub_lists_its_models(client: openai.OpenAI) -> None:
    models = client.models.list()

    assert [model.id for model in models] == list(MODELS)
    assert client.models.retrieve("anything").id == "anything"


def test_stub_answers_a_forced_tool_call_in_openai_shape(
    client: openai.OpenAI, stub: OpenAIStub
) -> None:
    response = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "one two three"}],
        tools=[{"type": "function", "function": {"name": "person", "parameters": PERSON}}],
        tool_choice={"type": "function", "function": {"name": "person"}},
    )

    assert response.object == "chat.completion"
    assert response.id.startswith("chatcmpl-")
    (choice,) = response.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.role == "assistant"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.type == "function"
    assert call.id.startswith("call_")
    assert call.function.name == "person"
    assert json.loads(call.function.arguments) == PERSON_EXAMPLE
    assert response.usage is not None
    assert response.usage.prompt_tokens == 3
    assert response.usage.total_tokens == 3 + response.usage.completion_tokens
    assert stub.requests[-1]["model"] == "gpt-4o-mini"


def test_stub_mimics_llama_cpp_server_refusing_json_schema(client: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as raised:
        client.chat.completions.create(
            model="stub-no-json-schema",
            messages=[{"role": "user", "content": "hi"}],
            response_format={"type": "json_schema", "json_schema": {"name": "o", "schema": {}}},
        )

    assert raised.value.status_code == 500
    body = raised.value.body
    assert isinstance(body, dict)
    assert body["type"] == "internal_server_error"
    assert "'text' or 'json_object'" in body["message"]


def test_stub_json_object_needs_the_word_json_as_openai_does(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="must contain the word 'json'"):
        client.chat.completions.create(
            model="stub",
            messages=[{"role": "user", "content": "hi"}],
            response_format={"type": "json_object"},
        )

    response = client.chat.completions.create(
        model="stub",
        messages=[{"role": "user", "content": "answer in JSON"}],
        response_format={"type": "json_object"},
    )
    assert response.choices[0].message.content == "{}"


def test_stub_cuts_output_at_max_tokens(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model="stub",
        messages=[{"role": "user", "content": "a b c d e"}],
        max_tokens=3,
    )

    assert response.choices[0].message.content == "stub reply: a"
    assert response.choices[0].finish_reason == "length"


def test_stub_errors_have_openai_shape(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(
            model="stub-status-404", messages=[{"role": "user", "content": "hi"}]
        )

    body = raised.value.body
    assert isinstance(body, dict)
    assert set(body) == {"message", "type", "param", "code"}
    assert body["code"] == "model_not_found"


# -- label probabilities from logprobs ---------------------------------------------------------

LABELS = {
    "type": "object",
    "properties": {"output": {"enum": ["spam", "ham", "maybe"], "type": "string"}},
    "required": ["output"],
}


def test_a_classification_reads_label_probabilities_from_logprobs(
    backend: OpenAIBackend, stub: OpenAIStub
) -> None:
    completion = backend.complete(request(schema=LABELS))
    assert json.loads(completion.text) == {"output": "spam"}
    # The stub gives its label 0.5 at the label's first token, the others 0.25 each.
    assert completion.label_probs == pytest.approx({"spam": 0.5, "ham": 0.25, "maybe": 0.25})
    assert stub.requests[-1]["logprobs"] is True
    assert stub.requests[-1]["top_logprobs"] == 20


def test_only_classifications_ask_for_logprobs(backend: OpenAIBackend, stub: OpenAIStub) -> None:
    for schema in (PERSON, None):
        assert backend.complete(request(schema=schema)).label_probs is None
        assert "logprobs" not in stub.requests[-1]


def test_an_endpoint_refusing_logprobs_still_classifies_and_is_not_asked_again(
    backend: OpenAIBackend, stub: OpenAIStub
) -> None:
    first = backend.complete(request("stub-no-logprobs", LABELS))
    assert json.loads(first.text) == {"output": "spam"}
    assert first.label_probs is None
    assert [body.get("logprobs") for body in stub.requests] == [True, None]
    assert backend.remembered_mode("stub-no-logprobs") == "json_schema"  # no mode was refused
    stub.clear()
    backend.complete(request("stub-no-logprobs", LABELS))
    assert [body.get("logprobs") for body in stub.requests] == [None]


def test_a_tool_call_answer_has_no_label_probabilities(
    backend: OpenAIBackend, stub: OpenAIStub
) -> None:
    completion = backend.complete(request("stub-tools-only", LABELS))
    assert completion.label_probs is None
    assert "logprobs" not in stub.requests[-1]  # a tool call's arguments have no logprobs


def test_a_provider_without_logprobs_is_not_asked_for_them(
    client: openai.OpenAI, settings: Settings, stub: OpenAIStub
) -> None:
    from wire.providers import API_PROVIDERS

    groq = OpenAIBackend(settings, client=client, provider=API_PROVIDERS["groq"])
    assert groq.complete(request(schema=LABELS)).label_probs is None
    assert "logprobs" not in stub.requests[-1]


def test_llama_cpp_server_classifies_through_a_tool_call_without_label_probabilities(
    llama_server: str, settings: Settings
) -> None:
    """llama_cpp.server (a real third-party server) refuses ``json_schema`` and answers a
    forced tool call, whose arguments have no ``logprobs``: no label probabilities."""
    client = openai.OpenAI(base_url=llama_server, api_key="sk-none", max_retries=0, timeout=120)
    backend = OpenAIBackend(settings, client=client)
    job = request("smollm2", LABELS, genconf=GenConf(max_tokens=32))
    for _ in range(2):
        completion = backend.complete(job)
        assert json.loads(completion.text)["output"] in ("spam", "ham", "maybe")
    assert completion.label_probs is None
    assert backend.remembered_mode("smollm2") == "tools"


def test_a_500_naming_logprobs_is_a_refusal_not_a_retry(
    backend: OpenAIBackend, stub: OpenAIStub
) -> None:
    """llama_cpp.server without ``logits_all`` refuses logprobs with a 500: the request is
    sent again without them at once, not parked for a retry that would fail the same way."""
    completion = backend.complete(request("stub-no-logprobs-500", LABELS))
    assert json.loads(completion.text) == {"output": "spam"}
    assert completion.label_probs is None
    assert [body.get("logprobs") for body in stub.requests] == [True, None]


def test_logprobs_without_alternatives_give_no_label_probabilities(
    backend: OpenAIBackend,
) -> None:
    completion = backend.complete(request("stub-no-alternatives", LABELS))
    assert json.loads(completion.text) == {"output": "spam"}
    assert completion.label_probs is None


def test_a_null_top_logprobs_never_fails_the_answer() -> None:
    """Some servers send ``top_logprobs: null``; the SDK passes it through unvalidated."""
    from types import SimpleNamespace

    from workers.backends.openai_api import _label_probs

    tokens = [
        SimpleNamespace(token=piece, logprob=0.0, top_logprobs=None)
        for piece in ('{"', "output", '":', ' "', "spam", '"}')
    ]
    choice: Any = SimpleNamespace(logprobs=SimpleNamespace(content=tokens))
    assert _label_probs(choice, request(schema=LABELS), '{"output": "spam"}') is None
