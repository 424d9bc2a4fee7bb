"""The one interface every backend implements: a completion request in, a completion out."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from wire.contract import GenConf, Message, Usage
from wire.errors import JobTimeLimitError


@dataclass(frozen=True)
class Deadline:
    """When a job's time on this worker is up (``SIBYLQ_JOB_TIME_LIMIT_S``), on the monotonic
    clock. Backends end their waits and requests by it: Celery enforces time limits on prefork
    pools only, and a thread cannot be killed."""

    limit_s: float
    at: float

    @classmethod
    def after(cls, limit_s: float) -> Deadline:
        return cls(limit_s, time.monotonic() + limit_s)

    def remaining_s(self) -> float:
        return self.at - time.monotonic()

    def check(self) -> None:
        """Raise ``JobTimeLimitError`` once the time is up."""
        if self.remaining_s() <= 0:
            raise self.error()

    def error(self) -> JobTimeLimitError:
        return JobTimeLimitError(
            f"the job ran past its time limit of {self.limit_s:g} s on the worker and was "
            "stopped (SIBYLQ_JOB_TIME_LIMIT_S)"
        )


@dataclass(frozen=True)
class CompletionRequest:
    model: str
    messages: tuple[Message, ...]
    json_schema: dict[str, Any] | None
    genconf: GenConf
    options: Mapping[str, str] = field(default_factory=dict)
    deadline: Deadline | None = None
    #: The job's id, and whether it was revoked meanwhile (backends that can end a request
    #: midway, such as the llama batching engine, free its place and raise
    #: ``JobCancelledError``).
    job_id: str | None = None
    cancelled: Callable[[], bool] | None = None


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str
    usage: Usage
    model: str
    #: A classification's probability of each label at the choice point
    #: (``workers.label_probs``), where the backend could read it.
    label_probs: dict[str, float] | None = None


class RetryLater(Exception):  # noqa: N818 - a signal, not an error
    """A transient failure (rate limit, timeout, 5xx) or no capacity yet: run the job again later.

    ``delay_s`` is what the server (``Retry-After``) or the rate limiter asked for; None lets
    the caller back off exponentially. ``counts`` is False when nothing failed (the fleet's
    rate limiter had no capacity yet): such a wait never uses up the job's retries.
    """

    def __init__(self, reason: str, *, delay_s: float | None = None, counts: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.delay_s = delay_s
        self.counts = counts


class Backend(Protocol):
    """Runs one completion. Raises wire.errors.JobFailedError subclasses on failure
    (``JobTimeLimitError`` when the request's deadline passes), and ``RetryLater`` when the same
    request may succeed later."""

    def complete(self, request: CompletionRequest) -> Completion: ...


@dataclass(frozen=True)
class ModelContext:
    """The context a model offers (None: unknown) and the most output tokens one request may
    ask for (None: no limit but the context)."""

    ctx_len: int | None
    max_tokens_limit: int | None = None


@dataclass(frozen=True)
class TokenCount:
    """Tokens a request's prompt takes; ``exact`` is False for an estimate."""

    tokens: int
    exact: bool


@runtime_checkable
class Measuring(Protocol):
    """A backend that knows its model's context and counts a prompt's tokens: what resolving
    ``max_tokens`` 0 or negative, a job's ``ctx_len`` and ``INFO`` jobs need
    (``workers.budget``). Every bundled backend is one."""

    def context(self, model: str) -> ModelContext: ...

    def count_tokens(self, request: CompletionRequest) -> TokenCount: ...


#: What a backend tells the model when it asks for JSON following a schema. Small models follow
#: a grammar or a response format far better when told what it is for.
SCHEMA_INSTRUCTION = "Answer only with a JSON object that follows this JSON schema:\n{schema}"


def with_schema_instruction(
    messages: list[dict[str, Any]], schema: dict[str, Any]
) -> list[dict[str, Any]]:
    """``messages`` with ``SCHEMA_INSTRUCTION`` appended to the first system message (or as a
    system message of its own, first). A system message in content parts gets a text part."""
    instruction = SCHEMA_INSTRUCTION.format(schema=json.dumps(schema))
    for index, message in enumerate(messages):
        if message["role"] == "system":
            content: Any = message["content"]
            if isinstance(content, str):
                content = f"{content}\n\n{instruction}"
            else:
                content = [*content, {"type": "text", "text": instruction}]
            system = {"role": "system", "content": content}
            return [*messages[:index], system, *messages[index + 1 :]]
    return [{"role": "system", "content": instruction}, *messages]
