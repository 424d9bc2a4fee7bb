"""The worker's core: a completion becomes a checked JSON value, or a typed failure."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

import pytest

from producer.targets import target_for
from wire.contract import JobKind, JobSpec, Message, Usage
from wire.errors import JobTimeLimitError, OutputValidationError
from workers.backends.base import Completion, CompletionRequest, Deadline
from workers.execute import Progress, decode_output, execute

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


# -- re-asking invalid output ---------------------------------------------------------------


class ScriptedBackend:
    """A backend that answers from a script and keeps what it was asked: the core's contract
    with backends, without a model."""

    def __init__(self, *answers: tuple[str, str]) -> None:
        self.answers = list(answers)
        self.requests: list[CompletionRequest] = []

    def complete(self, request: CompletionRequest) -> Completion:
        self.requests.append(request)
        text, finish_reason = self.answers.pop(0)
        return Completion(
            text=text,
            finish_reason=finish_reason,
            usage=Usage(prompt_tokens=10, completion_tokens=2),
            model="m",
        )


def test_invalid_output_is_re_asked_with_the_error_and_the_tokens_add_up() -> None:
    backend = ScriptedBackend(("[1, 2", "stop"), ('{"output": [1, 2]}', "stop"))

    envelope = execute(_spec(), backend, "w", Progress(), reask_max=2)

    assert envelope.value == {"output": [1, 2]}
    assert envelope.attempts == 2
    assert envelope.usage == Usage(prompt_tokens=20, completion_tokens=4)
    reask = backend.requests[1].messages
    assert [message.role for message in reask] == ["user", "assistant", "user"]
    assert reask[1].content == "[1, 2"
    assert "not valid JSON" in reask[2].content


def test_after_the_last_re_ask_the_error_carries_every_raw_output() -> None:
    backend = ScriptedBackend(("no", "stop"), ('{"output": ["x"]}', "stop"), ("still no", "stop"))

    with pytest.raises(OutputValidationError, match="after 3 tries") as caught:
        execute(_spec(), backend, "w", Progress(), reask_max=2)

    assert caught.value.raw_outputs == ("no", '{"output": ["x"]}', "still no")
    assert caught.value.raw_text == "still no"


def test_output_cut_at_max_tokens_is_not_re_asked() -> None:
    backend = ScriptedBackend(('{"output": [1,', "length"), ('{"output": [1]}', "stop"))

    with pytest.raises(OutputValidationError, match="max_tokens"):
        execute(_spec(), backend, "w", Progress(), reask_max=2)

    assert len(backend.requests) == 1


def test_progress_survives_a_round_trip_through_json() -> None:
    progress = Progress(retries=2)
    progress.record(_completion("[1"))
    progress.started_at = datetime.now(UTC)

    again = Progress.decode(json.loads(json.dumps(progress.encode())))

    assert again == progress


# -- the job's time limit -------------------------------------------------------------------


class _Overrunning:
    """A backend that ignores the deadline (a blocking call nothing can interrupt)."""

    def __init__(self) -> None:
        self.requests: list[CompletionRequest] = []

    def complete(self, request: CompletionRequest) -> Completion:
        self.requests.append(request)
        assert request.deadline is not None
        time.sleep(request.deadline.remaining_s() + 0.05)  # returns past it
        return _completion("this is not json")


def test_an_answer_that_comes_back_past_the_deadline_is_refused_and_not_re_asked() -> None:
    deadline = Deadline.after(0.2)
    backend = _Overrunning()

    with pytest.raises(JobTimeLimitError, match=r"time limit of 0.2 s .*SIBYLQ_JOB_TIME_LIMIT_S"):
        execute(_spec(), backend, "w", Progress(), reask_max=2, deadline=deadline)
    assert [request.deadline for request in backend.requests] == [deadline]  # told, asked once
