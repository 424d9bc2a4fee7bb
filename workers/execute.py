"""Run one job on a backend and package the outcome: the worker's pure core, no Celery here."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from jsonschema import Draft202012Validator

from producer.contract import Envelope, JobSpec, Timings
from producer.errors import OutputValidationError
from producer.modelref import parse_model_ref

from .backends.base import Backend, Completion, CompletionRequest


def execute(spec: JobSpec, backend: Backend, worker: str) -> Envelope:
    """Complete ``spec`` with ``backend``; raises a SibylqError subclass when it fails."""
    started = datetime.now(UTC)
    ref = parse_model_ref(spec.model)
    completion = backend.complete(
        CompletionRequest(
            model=ref.name,
            messages=spec.messages,
            json_schema=spec.json_schema,
            genconf=spec.genconf,
            options=ref.options,
        )
    )
    return Envelope(
        value=decode_output(spec, completion),
        raw_text=completion.text,
        finish_reason=completion.finish_reason,
        usage=completion.usage,
        model=completion.model,
        worker=worker,
        timings=Timings(
            created_at=spec.created_at, started_at=started, finished_at=datetime.now(UTC)
        ),
    )


def decode_output(spec: JobSpec, completion: Completion) -> Any:
    """The completion's JSON value, checked against the job's schema (text jobs: the text)."""
    if spec.json_schema is None:
        return completion.text
    if completion.finish_reason == "length":
        raise _invalid(
            f"output was cut at max_tokens={spec.genconf.max_tokens} before the JSON was "
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


@lru_cache(maxsize=256)
def _validator(schema_json: str) -> Draft202012Validator:
    return Draft202012Validator(json.loads(schema_json))


def _invalid(message: str, completion: Completion) -> OutputValidationError:
    return OutputValidationError(
        message, raw_text=completion.text, finish_reason=completion.finish_reason
    )
