"""The worker's core: a completion becomes a checked JSON value, or a typed failure."""

from __future__ import annotations

import pytest

from producer.contract import JobKind, JobSpec, Message, Usage
from producer.errors import OutputValidationError
from producer.targets import target_for
from workers.backends.base import Completion
from workers.execute import decode_output

SCHEMA = target_for(list[int]).json_schema


def _spec() -> JobSpec:
    return JobSpec(
        model="fake",
        kind=JobKind.EXTRACT,
        messages=(Message(role="user", content="numbers"),),
        json_schema=SCHEMA,
    )


def _completion(text: str, finish_reason: str = "stop") -> Completion:
    return Completion(text=text, finish_reason=finish_reason, usage=Usage(), model="m")


def test_valid_output_is_decoded() -> None:
    assert decode_output(_spec(), _completion('{"output": [1, 2]}')) == {"output": [1, 2]}


@pytest.mark.parametrize(
    ("text", "finish_reason", "message"),
    [
        ('{"output": [1, 2', "length", "cut at max_tokens"),
        ("[1, 2", "stop", "not valid JSON"),
        ('{"output": ["x"]}', "stop", "does not match the schema at output/0"),
        ('{"other": 1}', "stop", "'output' is a required property"),
    ],
)
def test_invalid_output_is_a_validation_error_keeping_the_raw_text(
    text: str, finish_reason: str, message: str
) -> None:
    with pytest.raises(OutputValidationError, match=message) as caught:
        decode_output(_spec(), _completion(text, finish_reason))
    assert caught.value.raw_text == text
    assert caught.value.finish_reason == finish_reason


def test_text_jobs_return_the_text_even_when_cut() -> None:
    spec = _spec().model_copy(update={"json_schema": None, "kind": JobKind.TEXT})
    assert decode_output(spec, _completion("Once upon a", "length")) == "Once upon a"
