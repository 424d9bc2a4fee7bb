"""Model references and the queues they map to."""

from __future__ import annotations

import pytest

from producer import Models
from wire.errors import ConfigurationError, UnknownModelError
from wire.modelref import fake_delay_s, parse_model_ref, serves


@pytest.mark.parametrize(
    ("ref", "queue"),
    [
        ("openai:gpt-4o-mini", "sibylq.openai"),
        ("llamacpp:smollm2", "sibylq.llamacpp.smollm2"),
        ("llamacpp:/models/Qwen2.5-0.5B.Q4_K_M.gguf", "sibylq.llamacpp.Qwen2.5-0.5B.Q4_K_M"),
        ("fake", "sibylq.fake"),
        ("fake:delay=0.2", "sibylq.fake"),
    ],
)
def test_queues(ref: str, queue: str) -> None:
    assert parse_model_ref(ref).queue == queue


def test_options_and_round_trip() -> None:
    ref = parse_model_ref("fake:delay=0.2")
    assert ref.options == {"delay": "0.2"}
    assert str(ref) == "fake:delay=0.2"
    assert str(parse_model_ref("llamacpp:/m/x.gguf")) == "llamacpp:/m/x.gguf"


@pytest.mark.parametrize(
    "ref",
    ["", "gpt-4", "cohere:command-r", "openai", "groq", "llamacpp:", "openai:a,b", "fake:delay="],
)
def test_bad_references(ref: str) -> None:
    with pytest.raises(UnknownModelError):
        parse_model_ref(ref)


def test_a_worker_may_serve_every_model_of_an_api() -> None:
    assert parse_model_ref("openai", any_api_model=True).queue == "sibylq.openai"


@pytest.mark.parametrize(
    ("worker_model", "job_model", "served"),
    [
        ("openai", "openai:gpt-4o-mini", True),
        ("openai:gpt-4o-mini", "openai:gpt-4o-mini", True),
        ("openai:gpt-4o-mini", "openai:gpt-4o", True),  # one queue carries every model
        ("openai", "fake:delay=1", False),
        ("groq", "groq:llama-3.1-8b-instant", True),
        ("openai", "groq:llama-3.1-8b-instant", False),  # another endpoint, another key
        ("groq:llama-3.1-8b-instant", "mistral:mistral-small-latest", False),
        ("fake", "fake:delay=1", True),
        ("fake", "openai:gpt-4o-mini", False),
        ("llamacpp:/models/smollm2.gguf", "llamacpp:smollm2", True),
        ("llamacpp:smollm2", "llamacpp:qwen", False),
        ("llamacpp:smollm2", "fake", False),
    ],
)
def test_a_worker_serves_its_own_models_only(
    worker_model: str, job_model: str, served: bool
) -> None:
    assert serves(worker_model, job_model) is served


@pytest.mark.parametrize(
    "options", [{"delay": "-1"}, {"delay": "soon"}, {"delay": "nan"}, {"x": "1"}]
)
def test_fake_options_are_checked_in_one_place(options: dict[str, str]) -> None:
    with pytest.raises(ConfigurationError, match="fake"):
        fake_delay_s(options)
    with pytest.raises(ConfigurationError, match="fake"):
        Models.create("fake:" + ",".join(f"{k}={v}" for k, v in options.items()))


def test_a_fake_delay_is_seconds() -> None:
    assert fake_delay_s({"delay": "0.25"}) == 0.25
    assert fake_delay_s({}) == 0.0
