"""Run one job on a backend and package the outcome: the worker's pure core, no Celery here.

Output that is not valid JSON for the job's schema is re-asked up to ``reask_max`` times: the
model sees its answer and the validation error, and tries again. Every call's tokens are
summed in ``Progress``, which also survives a job parked for a retry (``workers.parking``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, Literal

from jsonschema import Draft202012Validator
from pydantic import BaseModel, ConfigDict, Field

from wire.contract import (
    Envelope,
    JobKind,
    JobSpec,
    Message,
    ModelFacts,
    Timings,
    Usage,
    decode_model,
)
from wire.errors import OutputValidationError
from wire.modelref import parse_model_ref

from .backends.base import Backend, Completion, CompletionRequest, Deadline
from .budget import budgeted, job_context, measuring, needs_budget

REASK_INSTRUCTION = (
    "Your answer above is not valid: {error}. Answer again with only the corrected JSON value, "
    "following the schema."
)


class Progress(BaseModel):
    """What a job's calls so far cost and produced; carried across parked retries as JSON
    (a versioned payload: a job parked by one release may run on the next)."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    retries: int = 0
    calls: int = 0
    usage: Usage = Field(default_factory=Usage)
    raw_outputs: list[str] = Field(default_factory=list)
    started_at: datetime | None = None

    def record(self, completion: Completion) -> None:
        self.calls += 1
        self.usage = self.usage + completion.usage
        self.raw_outputs.append(completion.text)

    def encode(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def decode(cls, data: object) -> Progress:
        """The progress carried by a delivery (none: a first run); raises ContractError."""
        return cls() if data is None else decode_model(cls, data)


def execute(
    spec: JobSpec,
    backend: Backend,
    worker: str,
    progress: Progress,
    reask_max: int = 0,
    deadline: Deadline | None = None,
    cancelled: Callable[[], bool] | None = None,
    job_id: str | None = None,
) -> Envelope:
    """Complete ``spec`` with ``backend``; raises a SibylqError subclass when it fails, and
    ``RetryLater`` (from the backend) when it should run again later. Past ``deadline`` the
    job fails with ``JobTimeLimitError``: backends end their calls by it, and an answer that
    comes back later anyway is refused. ``cancelled`` says whether the job (``job_id``) was
    revoked meanwhile, for backends that can end a request midway."""
    if progress.started_at is None:
        progress.started_at = datetime.now(UTC)
    ref = parse_model_ref(spec.model)
    if spec.kind == JobKind.INFO:
        return _facts_envelope(spec, backend, ref.name, worker, progress)
    context = job_context(spec, backend, ref.name) if needs_budget(spec) else None
    messages = spec.messages
    for reask in range(reask_max + 1):
        request = CompletionRequest(
            model=ref.name,
            messages=messages,
            json_schema=spec.json_schema,
            genconf=spec.genconf,
            options=ref.options,
            deadline=deadline,
            job_id=job_id,
            cancelled=cancelled,
        )
        if context is not None:  # each re-ask's prompt is longer: resolve it again
            request = budgeted(request, backend, context)
        completion = backend.complete(request)
        progress.record(completion)
        if deadline is not None:
            deadline.check()
        try:
            value = decode_output(spec, completion, max_tokens=request.genconf.max_tokens)
        except OutputValidationError as exc:
            # Output cut at max_tokens would be cut again: only a bigger budget helps.
            if reask == reask_max or completion.finish_reason == "length":
                raise _with_attempts(exc, progress) from None
            messages = reask_messages(messages, completion.text, exc.remote_message)
            continue
        return _envelope(spec, completion, value, worker, progress)
    raise AssertionError("unreachable: the last re-ask returns or raises")


def model_facts(spec: JobSpec, backend: Backend, model: str) -> ModelFacts:
    """What an ``INFO`` job answers: the context the job gets here and its messages' length
    (refused like any job when its ``ctx_len`` is more than the model has)."""
    context = job_context(spec, backend, model)
    request = CompletionRequest(
        model=model, messages=spec.messages, json_schema=spec.json_schema, genconf=spec.genconf
    )
    count = measuring(backend).count_tokens(request)
    return ModelFacts(
        ctx_len=context.ctx_len,
        max_tokens_limit=context.max_tokens_limit,
        token_len=count.tokens,
        token_len_exact=count.exact,
    )


def _facts_envelope(
    spec: JobSpec, backend: Backend, model: str, worker: str, progress: Progress
) -> Envelope:
    facts = model_facts(spec, backend, model)
    text = facts.model_dump_json()
    return _envelope(
        spec, Completion(text, "stop", Usage(), model), facts.model_dump(), worker, progress
    )


def reask_messages(messages: tuple[Message, ...], answer: str, error: str) -> tuple[Message, ...]:
    """The conversation extended by the model's invalid answer and what was wrong with it."""
    return (
        *messages,
        Message(role="assistant", content=answer),
        Message(role="user", content=REASK_INSTRUCTION.format(error=error)),
    )


def decode_output(spec: JobSpec, completion: Completion, *, max_tokens: int | None = None) -> Any:
    """The completion's JSON value, checked against the job's schema (text jobs: the text).
    ``max_tokens``: the request's resolved budget (default: the job's)."""
    if spec.json_schema is None:
        return completion.text
    if completion.finish_reason == "length":
        budget = spec.genconf.max_tokens if max_tokens is None else max_tokens
        raise _invalid(
            f"output was cut at max_tokens={budget} before the JSON was "
            "complete; raise genconf max_tokens or ask for less",
            completion,
        )
    try:
        value = json.loads(completion.text)
    except json.JSONDecodeError as exc:
        raise _invalid(f"output is not valid JSON: {exc}", completion) from exc
    errors = sorted(_validator(json.dumps(spec.json_schema)).iter_errors(value), key=str)
    if errors:
        where = "/".join(map(str, errors[0].absolute_path)) or "(root)"
        raise _invalid(
            f"output does not match the schema at {where}: {errors[0].message}", completion
        )
    return value


def _envelope(
    spec: JobSpec, completion: Completion, value: Any, worker: str, progress: Progress
) -> Envelope:
    assert progress.started_at is not None
    return Envelope(
        value=value,
        raw_text=completion.text,
        finish_reason=completion.finish_reason,
        usage=progress.usage,
        model=completion.model,
        worker=worker,
        timings=Timings(
            created_at=spec.created_at,
            started_at=progress.started_at,
            finished_at=datetime.now(UTC),
        ),
        attempts=progress.calls,
        label_probs=completion.label_probs,
    )


@lru_cache(maxsize=256)
def _validator(schema_json: str) -> Draft202012Validator:
    return Draft202012Validator(json.loads(schema_json))


def _invalid(message: str, completion: Completion) -> OutputValidationError:
    return OutputValidationError(
        message, raw_text=completion.text, finish_reason=completion.finish_reason
    )


def _with_attempts(exc: OutputValidationError, progress: Progress) -> OutputValidationError:
    calls = progress.calls
    message = exc.remote_message if calls == 1 else f"{exc.remote_message} (after {calls} tries)"
    return OutputValidationError(
        message,
        raw_text=exc.raw_text,
        finish_reason=exc.finish_reason,
        raw_outputs=tuple(progress.raw_outputs),
    )
