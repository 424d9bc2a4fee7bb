"""A job's token budget on a worker: Sibila's rule for ``max_tokens`` 0 and negative values,
the job's ``ctx_len`` against the model's context, and ``max_tokens_limit``."""

from __future__ import annotations

import pytest

from wire.contract import GenConf, JobKind, JobSpec, Message
from wire.errors import BackendError, ContextUnavailableError, PromptTooLongError
from workers.backends.base import Completion, CompletionRequest, ModelContext
from workers.backends.fake import FAKE_CTX_LEN, FakeBackend
from workers.budget import UNLIMITED, job_context, needs_budget, resolve_max_tokens

KNOWN = ModelContext(ctx_len=1000)
UNKNOWN = ModelContext(ctx_len=None)


@pytest.mark.parametrize(
    ("max_tokens", "expected"),
    [
        (0, 900),  # all of the context the prompt leaves
        (-20, 200),  # 20% of the context
        (-100, 900),  # 100%, cut to what the prompt leaves
        (50, 50),
        (5000, 900),  # cut to what the prompt leaves
    ],
)
def test_a_known_context_resolves_as_sibila_does(max_tokens: int, expected: int) -> None:
    assert resolve_max_tokens(max_tokens, KNOWN, prompt_tokens=100) == expected


def test_a_percentage_is_at_least_one_token() -> None:
    assert resolve_max_tokens(-1, ModelContext(ctx_len=50), prompt_tokens=10) == 1


@pytest.mark.parametrize(("max_tokens", "expected"), [(0, UNLIMITED), (-50, UNLIMITED), (70, 70)])
def test_an_unknown_context_sends_no_limit_for_zero_and_percentages(
    max_tokens: int, expected: int
) -> None:
    assert resolve_max_tokens(max_tokens, UNKNOWN, prompt_tokens=0) == expected


def test_max_tokens_limit_caps_every_value() -> None:
    limited = ModelContext(ctx_len=None, max_tokens_limit=300)
    assert resolve_max_tokens(0, limited, prompt_tokens=0) == 300
    assert resolve_max_tokens(500, limited, prompt_tokens=0) == 300
    assert resolve_max_tokens(0, ModelContext(1000, 300), prompt_tokens=100) == 300


def test_a_prompt_that_fills_the_context_is_too_long() -> None:
    with pytest.raises(PromptTooLongError, match="no room"):
        resolve_max_tokens(0, KNOWN, prompt_tokens=1000)


def _spec(**fields: object) -> JobSpec:
    return JobSpec(
        model="fake",
        kind=JobKind.TEXT,
        messages=(Message(role="user", content="hello there"),),
        **fields,  # type: ignore[arg-type]
    )


def test_the_job_context_is_the_models_narrowed_by_the_job() -> None:
    backend = FakeBackend()
    assert job_context(_spec(), backend, "fake") == ModelContext(FAKE_CTX_LEN, FAKE_CTX_LEN)
    assert job_context(_spec(ctx_len=1000), backend, "fake") == ModelContext(1000, 1000)
    narrowed = job_context(_spec(ctx_len=1000, max_tokens_limit=10), backend, "fake")
    assert narrowed == ModelContext(1000, 10)


def test_a_job_asking_for_more_context_than_the_model_has_is_refused() -> None:
    with pytest.raises(ContextUnavailableError, match=f"{FAKE_CTX_LEN} on this worker"):
        job_context(_spec(ctx_len=FAKE_CTX_LEN + 1), FakeBackend(), "fake")


def test_only_settings_that_depend_on_the_context_need_a_budget() -> None:
    assert not needs_budget(_spec(genconf=GenConf(max_tokens=50)))
    assert needs_budget(_spec(genconf=GenConf(max_tokens=0)))
    assert needs_budget(_spec(ctx_len=100))
    assert needs_budget(_spec(max_tokens_limit=100))


class _CompleteOnly:
    def complete(self, request: CompletionRequest) -> Completion:
        raise AssertionError("never called")


def test_a_backend_that_cannot_measure_says_what_to_do() -> None:
    with pytest.raises(BackendError, match="positive max_tokens"):
        job_context(_spec(ctx_len=100), _CompleteOnly(), "fake")
