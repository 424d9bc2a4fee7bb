"""Sibila's call shapes side by side with sibylq's: labels and choices beyond strings,
generation settings, model facts, and ``typing.TypedDict`` (issue 14, items 2, 3, 4 and 8).

Each test names the Sibila call, what Sibila returns, and checks what sibylq returns: on the
``fake`` model (a deterministic worker: it answers the first label, ``0``, ``"fake"``...), on
the bundled llama model where the real tokenizer or context matters, and on the OpenAI stub
where what reaches the server matters.
"""

from __future__ import annotations

import enum
import typing
from typing import Annotated, Any, Literal

import pytest
from pydantic import TypeAdapter

from producer import (
    Client,
    ContextUnavailableError,
    GenConf,
    InvalidRequestError,
    JobSpec,
    Message,
    Models,
    NoWorkerError,
    UnsupportedTargetError,
)
from producer.typeddicts import is_typing_typeddict, rebuild_typeddict
from tests.conftest import Worker
from tests.openai_stub import OpenAIStub

TIMEOUT = 60


class Size(enum.IntEnum):
    SMALL = 1
    LARGE = 2


class Ratio(float, enum.Enum):
    HALF = 0.5
    WHOLE = 1.0


@pytest.fixture
def fake(client: Client, fake_worker: Worker) -> Any:
    return Models.create("fake", client=client)


def sent(stub: OpenAIStub, marker: str) -> dict[str, Any]:
    """The last request the stub received whose last message holds ``marker``."""
    for body in reversed(stub.requests):
        if marker in str(body["messages"][-1]["content"]):
            return dict(body)
    raise AssertionError(f"the stub received no request with {marker!r}")


# -- 2. labels and choices beyond strings -----------------------------------------------------


class TestLabels:
    """Sibila: ``classify([1, 2, 3], q)`` -> ``1`` (an int), ``classify([True, False], q)`` ->
    ``True``, ``classify(Literal[...]/Enum, q)`` -> a value / a member; labels of mixed types
    raise TypeError. ``extract(["red", "blue"], q)`` is the same choice (its
    ``get_enum_type`` takes a list of values as an enumeration) -> ``"red"``."""

    @pytest.mark.parametrize(
        ("labels", "expected"),
        [
            ([1, 2, 3], 1),
            ([True, False], True),
            ([0.5, 1.5], 0.5),
            (["spam", "ham"], "spam"),
            (Literal[1, 2, 3], 1),
            (Literal[True, False], True),
            (Size, Size.SMALL),
            (Ratio, Ratio.HALF),
        ],
        ids=str,
    )
    def test_classify_returns_the_label_in_its_own_type(
        self, fake: Any, labels: Any, expected: Any
    ) -> None:
        value = fake.classify(labels, "pick one", timeout=TIMEOUT)
        assert value == expected and type(value) is type(expected)

    def test_extract_with_a_list_of_values_picks_one(self, fake: Any) -> None:
        assert fake.extract(["red", "blue"], "the sky?", timeout=TIMEOUT) == "red"
        value = fake.extract([2, 4, 8], "a power of two", timeout=TIMEOUT)
        assert value == 2 and type(value) is int

    @pytest.mark.parametrize("labels", [[1, True], [1, "a"], [1, 2.0], [], [float("nan")], [[1]]])
    def test_labels_of_mixed_or_unusable_types_are_refused(self, fake: Any, labels: Any) -> None:
        # Sibila: TypeError; sibylq: InvalidRequestError (a ValueError), before anything is sent
        with pytest.raises(InvalidRequestError, match="labels"):
            fake.classify(labels, "pick")

    @pytest.mark.parametrize(
        "labels",
        [Literal[float("nan"), 1.0], Literal["", " "], Literal[1, "a"], Literal[1, True]],
    )
    def test_literal_labels_are_checked_as_a_lists_are(self, fake: Any, labels: Any) -> None:
        with pytest.raises(InvalidRequestError, match="labels"):
            fake.classify(labels, "pick")

    def test_a_schema_with_nan_or_infinity_is_refused(self, fake: Any) -> None:
        # JSON has neither: the worker would have been sent null in its place
        with pytest.raises(InvalidRequestError, match="not JSON"):
            fake.json("a number", json_schema={"type": "number", "maximum": float("inf")})

    def test_an_enum_whose_values_are_no_json_is_an_unsupported_target(self, fake: Any) -> None:
        class Opaque(enum.Enum):
            ONE = object()
            TWO = object()

        with pytest.raises(UnsupportedTargetError):
            fake.classify(Opaque, "pick")

    def test_a_worker_refuses_a_label_of_the_wrong_type(self) -> None:
        # JSON true is not the label 1: the job's schema keeps bool and int apart
        from jsonschema import Draft202012Validator

        from producer.targets import classify_target

        schema = classify_target([1, 2, 3]).json_schema
        assert schema is not None
        assert not Draft202012Validator(schema).is_valid({"output": True})
        assert Draft202012Validator(schema).is_valid({"output": 2})

    def test_llama_answers_with_an_int_label(self, client: Client, llama_worker: Worker) -> None:
        model = Models.create("llamacpp:smollm2", client=client, genconf={"max_tokens": 16})
        value = model.classify([1, 2, 3, 4], "How many wheels does a tricycle have?")
        assert value in (1, 2, 3, 4) and type(value) is int
        answer = model.classify([True, False], "Is water wet?", timeout=TIMEOUT)
        assert type(answer) is bool

    def test_openai_answers_with_a_bool_label(self, client: Client, openai_worker: Worker) -> None:
        model = Models.create("openai:stub", client=client)
        assert model.classify([False, True], "Is it?", timeout=TIMEOUT) is False


# -- 3. generation settings ---------------------------------------------------------------------


class TestGenConf:
    """Sibila's ``GenConf`` is a mutable dataclass: ``GenConf(max_tokens=0)`` (the default:
    all of the context), ``genconf(temperature=0.5)`` a changed copy (KeyError for an unknown
    field), ``clone()``, ``stop="###"``. sibylq's is immutable with the same calls; bad values
    raise InvalidRequestError however they are given."""

    def test_copy_with_changes_as_in_sibila(self) -> None:
        base = GenConf(max_tokens=100, special={"a": 1})
        changed = base(temperature=0.5, special={"b": 2})
        assert (changed.max_tokens, changed.temperature) == (100, 0.5)
        assert changed.special == {"a": 1, "b": 2}  # merged key by key, as Sibila does
        assert base.temperature == 0.0 and base.special == {"a": 1}
        assert base.clone() == base and base.clone() is not base
        assert GenConf.from_dict(changed.as_dict()) == changed

    def test_stop_may_be_one_string(self) -> None:
        assert GenConf(stop="###").stop == ("###",)
        assert GenConf(stop=["a", "b"]).stop == ("a", "b")

    @pytest.mark.parametrize(
        ("fields", "field"),
        [
            ({"max_tokens": -101}, "max_tokens"),
            ({"temperature": 3}, "temperature"),
            ({"top_p": 0}, "top_p"),
            ({"format": "xml"}, "format"),
            ({"no_such_field": 1}, "no_such_field"),
        ],
    )
    def test_bad_values_raise_invalid_request_naming_the_field(
        self, fake: Any, fields: dict[str, Any], field: str
    ) -> None:
        with pytest.raises(InvalidRequestError, match=field):
            GenConf(**fields)
        with pytest.raises(InvalidRequestError, match=field):
            fake.call("x", genconf=fields)
        with pytest.raises(InvalidRequestError, match=field):
            GenConf()(**fields)

    def test_format_json_makes_call_return_json_text(self, fake: Any) -> None:
        # Sibila: model.call(q, genconf=GenConf(format="json", json_schema=...)) -> JSON text
        schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
        genconf = GenConf(format="json", json_schema=schema)
        assert fake.call("n?", genconf=genconf, timeout=TIMEOUT) == '{"n": 0}'
        assert fake.call("any", genconf=GenConf(format="json"), timeout=TIMEOUT) == "{}"
        # json() without its own schema follows the genconf's
        assert fake.json("n?", genconf=genconf, timeout=TIMEOUT) == {"n": 0}

    def test_special_is_refused(self, fake: Any) -> None:
        with pytest.raises(InvalidRequestError, match="special"):
            fake.call("x", genconf=GenConf(special={"openai": {"logprobs": True}}))

    def test_a_job_without_new_settings_keeps_the_first_contract(self) -> None:
        # what a worker of an earlier release decodes: no ctx_len, no format/json_schema/special
        spec = JobSpec(
            model="fake", kind="text", messages=(Message(role="user", content="hi"),)
        ).encode()
        assert "ctx_len" not in spec and "max_tokens_limit" not in spec
        assert set(spec["genconf"]) == {"max_tokens", "temperature", "top_p", "stop", "seed"}


class TestMaxTokens:
    """Sibila: ``max_tokens=0`` is all of the context the prompt leaves, ``-20`` 20% of the
    context, any value cut to what is left and to ``max_tokens_limit``. sibylq: the same,
    resolved by the worker against the context it has."""

    def test_known_openai_model_gets_its_budget(
        self, client: Client, openai_worker: Worker, openai_stub: OpenAIStub
    ) -> None:
        model = Models.create("openai:gpt-4o-mini", client=client)  # 128000, at most 16384 out
        model.call("budget-zero", genconf={"max_tokens": 0}, timeout=TIMEOUT)
        assert sent(openai_stub, "budget-zero")["max_tokens"] == 16384
        model.call("budget-percent", genconf={"max_tokens": -10}, timeout=TIMEOUT)
        assert sent(openai_stub, "budget-percent")["max_tokens"] == 12800

    def test_one_stop_string_reaches_the_server_as_a_list(
        self, client: Client, openai_worker: Worker, openai_stub: OpenAIStub
    ) -> None:
        model = Models.create("openai:stub", client=client)
        model.call("stop-one", genconf=GenConf(stop="###"), timeout=TIMEOUT)
        assert sent(openai_stub, "stop-one")["stop"] == ["###"]

    def test_unknown_openai_model_sends_no_max_tokens(
        self, client: Client, openai_worker: Worker, openai_stub: OpenAIStub
    ) -> None:
        model = Models.create("openai:stub", client=client)
        model.call("budget-unknown", genconf={"max_tokens": 0}, timeout=TIMEOUT)
        assert "max_tokens" not in sent(openai_stub, "budget-unknown")

    def test_ctx_len_and_max_tokens_limit_from_create_are_honoured(
        self, client: Client, openai_worker: Worker, openai_stub: OpenAIStub
    ) -> None:
        # Sibila: Models.create("openai:...", ctx_len=1000) for a model it has no figures for
        model = Models.create("openai:stub", client=client, ctx_len=1000)
        model.call("budget-ctx", genconf={"max_tokens": 0}, timeout=TIMEOUT)
        left = 1000 - model.token_len("budget-ctx", timeout=TIMEOUT)
        assert sent(openai_stub, "budget-ctx")["max_tokens"] == left
        model.call("budget-half", genconf={"max_tokens": -50}, timeout=TIMEOUT)
        assert sent(openai_stub, "budget-half")["max_tokens"] == 500
        limited = Models.create("openai:stub", client=client, max_tokens_limit=100)
        limited.call("budget-limit", genconf={"max_tokens": 0}, timeout=TIMEOUT)
        assert sent(openai_stub, "budget-limit")["max_tokens"] == 100
        assert limited.max_tokens_limit == 100

    def test_llama_percentage_of_its_context(self, client: Client, llama_worker: Worker) -> None:
        model = Models.create("llamacpp:smollm2", client=client)
        job = model.call_async("Write a long story about a dragon.", genconf={"max_tokens": -1})
        envelope = job.envelope(TIMEOUT)  # 1% of n_ctx 2048: 20 tokens
        assert (envelope.usage.completion_tokens, envelope.finish_reason) == (20, "length"), (
            envelope
        )

    def test_a_worker_refuses_a_context_it_cannot_give(
        self, client: Client, fake_worker: Worker, llama_worker: Worker
    ) -> None:
        with pytest.raises(ContextUnavailableError, match="ctx_len"):
            Models.create("fake", client=client, ctx_len=1_000_000).call("x", timeout=TIMEOUT)
        llama = Models.create("llamacpp:smollm2", client=client, ctx_len=100_000)
        with pytest.raises(ContextUnavailableError, match="SIBYLQ_LLAMA_N_CTX"):
            llama.call("x", timeout=TIMEOUT)

    @pytest.mark.parametrize("value", [0, -5, 1.5, True])
    def test_bad_ctx_len_is_refused_at_create(self, client: Client, value: Any) -> None:
        with pytest.raises(InvalidRequestError, match="ctx_len"):
            Models.create("fake", client=client, ctx_len=value)


class TestUnknownArguments:
    """Sibila's ``schemaconf=`` (and any other argument sibylq does not take) raise
    InvalidRequestError naming the method, before anything is sent."""

    def test_generation_methods(self, fake: Any) -> None:
        with pytest.raises(InvalidRequestError, match=r"extract\(\).*schemaconf.*JSchemaConf"):
            fake.extract(int, "q", schemaconf=None)
        with pytest.raises(InvalidRequestError, match=r"classify_async\(\).*colour"):
            fake.classify_async(["a"], "q", colour=1)
        with pytest.raises(InvalidRequestError, match=r"call\(\).*temperature"):
            fake.call("q", temperature=0.5)

    def test_create(self, client: Client) -> None:
        with pytest.raises(InvalidRequestError, match=r"Models.create\(\).*n_ctx"):
            Models.create("fake", client=client, n_ctx=4096)  # type: ignore[arg-type]


# -- 4. model facts ------------------------------------------------------------------------------


class TestModelFacts:
    """Sibila: ``model.ctx_len``, ``model.max_tokens_limit`` (attributes) and
    ``model.token_len(thread_or_text)``. sibylq asks a worker serving the model, once per
    Model object (token lengths once per distinct prompt)."""

    def test_fake_counts_words_as_its_usage_does(self, fake: Any) -> None:
        assert fake.ctx_len == 4096 and fake.max_tokens_limit == 4096  # at most the context
        assert fake.token_len("one two three", timeout=TIMEOUT) == 3
        envelope = fake.call_async("one two three").envelope(TIMEOUT)
        assert envelope.usage.prompt_tokens == 3

    def test_answers_are_kept_per_model(self, client: Client, fake_worker: Worker) -> None:
        model = Models.create("fake", client=client)
        assert model.ctx_len == 4096 and model.token_len("kept", timeout=TIMEOUT) == 1
        model.queue = "sibylq.nobody-serves-this"  # any new question would find no worker
        assert model.ctx_len == 4096 and model.token_len("kept", timeout=TIMEOUT) == 1
        with pytest.raises(NoWorkerError):
            model.token_len("a new prompt", timeout=TIMEOUT)

    def test_llama_counts_with_its_tokenizer_and_chat_template(
        self, client: Client, llama_worker: Worker
    ) -> None:
        model = Models.create("llamacpp:smollm2", client=client, genconf={"max_tokens": 1})
        assert model.ctx_len == 2048 and model.max_tokens_limit == 2048  # as in Sibila
        thread = [
            {"role": "system", "content": "You answer in one word."},
            {"role": "user", "content": "What colour is the sky on a clear day?"},
        ]
        counted = model.token_len(thread, timeout=TIMEOUT)
        envelope = model.call_async(thread).envelope(TIMEOUT)
        assert counted == envelope.usage.prompt_tokens
        assert model.facts(thread, timeout=TIMEOUT).token_len_exact

    def test_openai_context_is_known_or_said_unknown(
        self, client: Client, openai_worker: Worker
    ) -> None:
        known = Models.create("openai:gpt-4o", client=client)
        assert (known.ctx_len, known.max_tokens_limit) == (128_000, 16_384)
        unknown = Models.create("openai:stub", client=client)
        assert (unknown.ctx_len, unknown.max_tokens_limit) == (None, None)
        given = Models.create("openai:stub", client=client, ctx_len=8000)
        assert (given.ctx_len, given.max_tokens_limit) == (8000, 8000)
        facts = unknown.facts("how long is this prompt?", timeout=TIMEOUT)
        assert facts.token_len is not None and facts.token_len > 0
        assert not facts.token_len_exact  # no tokenizer for a remote model: an estimate


# -- 8. typing.TypedDict --------------------------------------------------------------------------


class Inner(typing.TypedDict):
    x: int


class Movie(typing.TypedDict, total=False):
    """A film."""

    title: typing.Required[Annotated[str, "The film's title"]]
    year: int
    cast: list[Inner]


class TestTypingTypedDict:
    """Sibila takes a ``typing.TypedDict`` only where pydantic does (Python 3.12+); sibylq
    rebuilds it as a ``typing_extensions.TypedDict`` on every Python."""

    def test_the_rebuild_keeps_fields_totality_and_required_keys(self) -> None:
        assert is_typing_typeddict(Movie)
        rebuilt = rebuild_typeddict(Movie)
        assert rebuilt.__name__ == "Movie" and rebuilt.__doc__ == "A film."
        assert rebuilt.__total__ is False  # type: ignore[attr-defined]
        assert rebuilt.__required_keys__ == {"title"}  # type: ignore[attr-defined]
        assert rebuilt.__optional_keys__ == {"year", "cast"}  # type: ignore[attr-defined]
        schema = TypeAdapter(rebuilt).json_schema()
        assert schema["required"] == ["title"]
        assert schema["properties"]["cast"]["items"] == {"$ref": "#/$defs/Inner"}

    def test_extract_accepts_it_end_to_end(self, fake: Any) -> None:
        assert fake.extract(Movie, "Casablanca, 1942", timeout=TIMEOUT) == {"title": "fake"}
        assert fake.extract(list[Inner], "numbers", timeout=TIMEOUT) == [{"x": 0}]

    def test_its_field_descriptions_reach_the_schema(self) -> None:
        from producer.targets import target_for

        schema = target_for(Movie).json_schema
        assert schema is not None
        assert schema["properties"]["title"]["description"] == "The film's title"
