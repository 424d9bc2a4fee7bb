"""The one Celery task: decode a job, run it on this process's backend, store the envelope."""

from __future__ import annotations

from functools import cache
from typing import Any

from celery import Task

from producer.contract import Failure, JobSpec, Usage
from producer.errors import JobFailedError, SibylqError
from producer.modelref import parse_model_ref
from producer.outcome import FAILURE_CARRIER
from producer.settings import Settings, get_settings

from .backends import Backend, create_backend
from .execute import execute


class JobFailure(Exception):  # noqa: N818 - the name is part of the result contract
    """Carries a ``Failure`` (a JSON dict) to the result backend; the name is the contract."""

    def __init__(self, failure: dict[str, Any]) -> None:
        super().__init__(failure)


assert JobFailure.__name__ == FAILURE_CARRIER


@cache
def backend_for(provider: str, settings: Settings) -> Backend:
    """One backend per provider per worker process: models and HTTP clients load once."""
    return create_backend(provider, settings)


def run_job(task: Task[Any, Any], payload: dict[str, Any]) -> dict[str, Any]:
    """Celery entry point. Known failures become a JobFailure the producer can type."""
    try:
        spec = JobSpec.decode(payload)
        backend = backend_for(parse_model_ref(spec.model).provider, get_settings())
        envelope = execute(spec, backend, worker=task.request.hostname or "unknown")
    except SibylqError as exc:
        raise JobFailure(_failure(exc).encode()) from exc
    return envelope.encode()


def _failure(exc: SibylqError) -> Failure:
    if isinstance(exc, JobFailedError):
        return Failure(
            type=type(exc).__name__,
            message=str(exc),
            raw_text=exc.raw_text,
            finish_reason=exc.finish_reason,
            usage=Usage(),
        )
    return Failure(type=type(exc).__name__, message=str(exc))
