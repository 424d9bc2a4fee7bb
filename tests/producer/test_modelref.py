"""Model references and the queues they map to."""

from __future__ import annotations

import pytest

from wire.errors import UnknownModelError
from wire.modelref import parse_model_ref


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
    "ref", ["", "gpt-4", "anthropic:claude", "openai", "llamacpp:", "openai:a,b", "fake:delay="]
)
def test_bad_references(ref: str) -> None:
    with pytest.raises(UnknownModelError):
        parse_model_ref(ref)


def test_a_worker_may_serve_every_model_of_an_api() -> None:
    assert parse_model_ref("openai", any_api_model=True).queue == "sibylq.openai"
