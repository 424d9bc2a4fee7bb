"""A failure crosses from worker to caller as the name of the exception that carries it: the
worker's ``JobFailure`` must keep the name the caller's decoder looks for."""

from __future__ import annotations

from wire.contract import Failure
from wire.errors import OutputValidationError
from wire.outcome import FAILURE_CARRIER, failure_error
from workers.delivery import JobFailure


def test_the_carrier_keeps_the_name_the_caller_decodes() -> None:
    assert JobFailure.__name__ == FAILURE_CARRIER


def test_a_carried_failure_comes_back_typed() -> None:
    failure = Failure(
        type="OutputValidationError", message="cut", raw_text="{", finish_reason="length"
    )
    carried = JobFailure(failure.encode())
    stored = {"exc_type": type(carried).__name__, "exc_message": list(carried.args)}
    error = failure_error(stored, "job-1")
    assert isinstance(error, OutputValidationError)
    assert (error.raw_text, error.finish_reason) == ("{", "length")
