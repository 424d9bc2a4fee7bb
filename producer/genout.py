"""Sibila's result objects for sibylq jobs: ``GenRes``, ``GenOut`` and the ``gen_*`` methods.

Sibila's ``gen``, ``gen_json``, ``gen_dataclass``, ``gen_pydantic`` and ``gen_extract`` return
a ``GenOut`` (a result code, the model's text, the JSON dict, the typed value) instead of
raising when the model's output is unusable. Here a ``GenOut`` is read off what a job already
gives: its ``Envelope`` when it succeeded, its ``JobFailedError`` when it failed on the
worker. Errors that are not the model's answer (a request refused before enqueueing, no
worker, a wait that timed out, a cancelled job) still raise, as in Sibila.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Awaitable
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, Any, Protocol

from wire.contract import Envelope
from wire.errors import JobFailedError, OutputValidationError

if TYPE_CHECKING:
    from .job import Job
    from .messages import Query


class GenRes(IntEnum):
    """A generation's result, with Sibila's names and values."""

    OK_STOP = 1  #: complete
    OK_LENGTH = 0  #: stopped at max_tokens
    ERROR_JSON = -1  #: the output is not JSON (often: JSON cut at max_tokens)
    ERROR_JSON_SCHEMA_VAL = -2  #: JSON, but not of the requested shape
    ERROR_JSON_SCHEMA_ERROR = -2  #: Sibila's alias of ERROR_JSON_SCHEMA_VAL
    ERROR_MODEL = -3  #: the model or its backend failed

    @staticmethod
    def from_finish_reason(finish: str) -> GenRes:
        """Sibila's mapping of a chat completion's finish reason."""
        return _FINISH_REASONS.get(finish, GenRes.ERROR_MODEL)

    @staticmethod
    def as_text(res: GenRes) -> str:
        return _TEXTS[res]


_FINISH_REASONS = {
    "stop": GenRes.OK_STOP,
    "length": GenRes.OK_LENGTH,
    "!json": GenRes.ERROR_JSON,
    "!json_schema_val": GenRes.ERROR_JSON_SCHEMA_VAL,
    "!json_schema_error": GenRes.ERROR_JSON_SCHEMA_ERROR,
}
_TEXTS = {
    GenRes.OK_STOP: "Stop",
    GenRes.OK_LENGTH: "Length (output cut)",
    GenRes.ERROR_JSON: "JSON decoding error",
    GenRes.ERROR_JSON_SCHEMA_VAL: "JSON SCHEMA validation error",
    GenRes.ERROR_MODEL: "Model internal error",
}


@dataclass
class GenOut:
    """A generation's outcome: Sibila's ``res``, ``text``, ``dic`` and ``value``, plus the
    job's ``envelope`` (usage, timings, worker) when it succeeded or its ``error`` when not."""

    res: GenRes
    text: str  #: what the model wrote (the last attempt's text when the job failed)
    dic: Any = None  #: the JSON output of structured calls (gen_json, gen_extract...)
    value: Any = None  #: the typed value of gen_extract, gen_dataclass and gen_pydantic
    envelope: Envelope | None = dataclasses.field(default=None, repr=False)
    error: JobFailedError | None = dataclasses.field(default=None, repr=False)

    def as_dict(self) -> dict[str, Any]:
        """Sibila's four fields as a dict."""
        return {"res": self.res, "text": self.text, "dic": self.dic, "value": self.value}

    @staticmethod
    def from_envelope(envelope: Envelope, *, structured: bool, value: Any = None) -> GenOut:
        """A succeeded job: its finish reason's code; ``dic`` the JSON output when
        ``structured``."""
        return GenOut(
            res=GenRes.from_finish_reason(envelope.finish_reason),
            text=envelope.raw_text,
            dic=envelope.value if structured else None,
            value=value,
            envelope=envelope,
        )

    @staticmethod
    def from_error(error: JobFailedError, envelope: Envelope | None = None) -> GenOut:
        """A failed job: ERROR_JSON for output that is not JSON, ERROR_JSON_SCHEMA_VAL for
        JSON of the wrong shape (then ``dic`` holds it), OK_LENGTH for JSON cut at max_tokens
        that still parses, ERROR_MODEL for any other failure on the worker."""
        text = error.raw_text if error.raw_text is not None else str(error)
        if not isinstance(error, OutputValidationError):
            return GenOut(GenRes.ERROR_MODEL, text, envelope=envelope, error=error)
        try:
            dic = json.loads(text) if envelope is None else envelope.value
        except json.JSONDecodeError:
            return GenOut(GenRes.ERROR_JSON, text, envelope=envelope, error=error)
        res = GenRes.OK_LENGTH if error.finish_reason == "length" else GenRes.ERROR_JSON_SCHEMA_VAL
        return GenOut(res, text, dic=dic, envelope=envelope, error=error)

    def __str__(self) -> str:
        shown = f"Error={GenRes.as_text(self.res)} text=█{self.text}█"
        if self.dic is not None:
            shown += f" dic={self.dic}"
        if self.value is not None:
            shown += f" value={self.value}"
        return shown


def gen_out(job: Job[Any], timeout: float | None, *, structured: bool, typed: bool) -> GenOut:
    """Wait for ``job``; its outcome as a GenOut (``typed``: with its Python value)."""
    try:
        envelope = job.envelope(timeout)
    except JobFailedError as exc:
        return GenOut.from_error(exc)
    return _out(job, envelope, structured=structured, typed=typed)


async def gen_out_async(
    job: Job[Any], timeout: float | None, *, structured: bool, typed: bool
) -> GenOut:
    try:
        envelope = await job.envelope_async(timeout)
    except JobFailedError as exc:
        return GenOut.from_error(exc)
    return _out(job, envelope, structured=structured, typed=typed)


def _out(job: Job[Any], envelope: Envelope, *, structured: bool, typed: bool) -> GenOut:
    if not typed:
        return GenOut.from_envelope(envelope, structured=structured)
    try:
        value = job.value_of(envelope)
    except OutputValidationError as exc:  # valid JSON the caller's type still refuses
        return GenOut.from_error(exc, envelope)
    return GenOut.from_envelope(envelope, structured=structured, value=value)


class _Submits(Protocol):
    """What the gen_* methods need of a model: its ``_async`` twins."""

    def call_async(self, query: Query, **kw: Any) -> Job[str]: ...
    def json_async(
        self, query: Query, *, json_schema: dict[str, Any] | str | None = None, **kw: Any
    ) -> Job[Any]: ...
    def extract_async(self, target: Any, query: Query, **kw: Any) -> Job[Any]: ...
    def dataclass_async(self, cls: Any, query: Query, **kw: Any) -> Job[Any]: ...
    def pydantic_async(self, cls: Any, query: Query, **kw: Any) -> Job[Any]: ...


class GenMethods:
    """Sibila's ``gen_*`` methods, mixed into ``Model``: the same jobs as ``call``, ``json``,
    ``extract``, ``dataclass`` and ``pydantic``, returning a ``GenOut`` instead of raising
    when the job fails on its worker. Positional ``genconf`` as in Sibila; ``timeout`` and
    the other keywords (``lane``, ``job_id``...) as in the plain methods. The ``_async``
    twins enqueue at once and return an awaitable GenOut."""

    def gen(
        self: _Submits,
        thread: Query,
        genconf: Any = None,
        *,
        timeout: float | None = None,
        **kw: Any,
    ) -> GenOut:
        job = self.call_async(thread, genconf=genconf, **kw)
        return gen_out(job, timeout, structured=False, typed=False)

    def gen_json(
        self: _Submits,
        thread: Query,
        json_schema: dict[str, Any] | str | None = None,
        genconf: Any = None,
        *,
        timeout: float | None = None,
        **kw: Any,
    ) -> GenOut:
        job = self.json_async(thread, json_schema=json_schema, genconf=genconf, **kw)
        return gen_out(job, timeout, structured=True, typed=False)

    def gen_extract(
        self: _Submits,
        target: Any,
        thread: Query,
        genconf: Any = None,
        *,
        timeout: float | None = None,
        **kw: Any,
    ) -> GenOut:
        job = self.extract_async(target, thread, genconf=genconf, **kw)
        return gen_out(job, timeout, structured=True, typed=True)

    def gen_dataclass(
        self: _Submits,
        cls: Any,
        thread: Query,
        genconf: Any = None,
        *,
        timeout: float | None = None,
        **kw: Any,
    ) -> GenOut:
        job = self.dataclass_async(cls, thread, genconf=genconf, **kw)
        return gen_out(job, timeout, structured=True, typed=True)

    def gen_pydantic(
        self: _Submits,
        cls: Any,
        thread: Query,
        genconf: Any = None,
        *,
        timeout: float | None = None,
        **kw: Any,
    ) -> GenOut:
        job = self.pydantic_async(cls, thread, genconf=genconf, **kw)
        return gen_out(job, timeout, structured=True, typed=True)

    def gen_async(
        self: _Submits,
        thread: Query,
        genconf: Any = None,
        *,
        timeout: float | None = None,
        **kw: Any,
    ) -> Awaitable[GenOut]:
        job = self.call_async(thread, genconf=genconf, **kw)
        return gen_out_async(job, timeout, structured=False, typed=False)

    def gen_json_async(
        self: _Submits,
        thread: Query,
        json_schema: dict[str, Any] | str | None = None,
        genconf: Any = None,
        *,
        timeout: float | None = None,
        **kw: Any,
    ) -> Awaitable[GenOut]:
        job = self.json_async(thread, json_schema=json_schema, genconf=genconf, **kw)
        return gen_out_async(job, timeout, structured=True, typed=False)

    def gen_extract_async(
        self: _Submits,
        target: Any,
        thread: Query,
        genconf: Any = None,
        *,
        timeout: float | None = None,
        **kw: Any,
    ) -> Awaitable[GenOut]:
        job = self.extract_async(target, thread, genconf=genconf, **kw)
        return gen_out_async(job, timeout, structured=True, typed=True)

    def gen_dataclass_async(
        self: _Submits,
        cls: Any,
        thread: Query,
        genconf: Any = None,
        *,
        timeout: float | None = None,
        **kw: Any,
    ) -> Awaitable[GenOut]:
        job = self.dataclass_async(cls, thread, genconf=genconf, **kw)
        return gen_out_async(job, timeout, structured=True, typed=True)

    def gen_pydantic_async(
        self: _Submits,
        cls: Any,
        thread: Query,
        genconf: Any = None,
        *,
        timeout: float | None = None,
        **kw: Any,
    ) -> Awaitable[GenOut]:
        job = self.pydantic_async(cls, thread, genconf=genconf, **kw)
        return gen_out_async(job, timeout, structured=True, typed=True)
