"""The job contract: what a producer sends and what a worker stores back.

Versioned pydantic models, JSON only on the wire. Workers read nothing else from a
producer: they never see the caller's Python types, only messages and a JSON schema.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ContractError, InvalidRequestError
from .schema_limits import check_schema

CONTRACT_VERSION = 1  # the Literal[1] of JobSpec.version and Envelope.version

M = TypeVar("M", bound=BaseModel)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


#: The image URLs a job may carry: a web address the API fetches itself, or the image inline.
IMAGE_URL_PREFIXES = ("https://", "http://", "data:image/")


class TextPart(_Frozen):
    """A text part of a message's content, as OpenAI's chat API writes it."""

    type: Literal["text"] = "text"
    text: str


class ImageUrl(_Frozen):
    """Where an image is: an ``http(s)://`` URL (the API fetches it, never sibylq) or a
    ``data:image/<type>;base64,...`` URL. ``detail`` is OpenAI's resolution hint."""

    url: str
    detail: Literal["auto", "low", "high"] | None = None

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, url: str) -> str:
        if not url.startswith(IMAGE_URL_PREFIXES):
            raise ValueError(
                "an image url is an http(s):// address or a data:image/...;base64, url, "
                f"not {url[:40]!r}"
            )
        if url.startswith("data:") and ";base64," not in url[:100]:
            raise ValueError("a data: image url must be base64-encoded (data:image/<type>;base64,)")
        return url


class ImagePart(_Frozen):
    """An image part of a message's content (OpenAI's ``image_url`` content part)."""

    type: Literal["image_url"] = "image_url"
    image_url: ImageUrl


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(_Frozen):
    """One chat message. ``content`` is text, or parts (text and images) for vision models:
    images only in user messages, as OpenAI's API takes them."""

    role: Literal["system", "user", "assistant"]
    content: str | tuple[ContentPart, ...]

    @model_validator(mode="after")
    def _parts(self) -> Message:
        if isinstance(self.content, tuple):
            if not self.content:
                raise ValueError("a message's content parts cannot be empty")
            if self.images and self.role != "user":
                raise ValueError(f"images go in user messages, not in {self.role} messages")
        return self

    @property
    def text(self) -> str:
        """The message's text: its content, or its text parts joined by newlines."""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content if isinstance(part, TextPart))

    @property
    def images(self) -> tuple[ImageUrl, ...]:
        """The message's images, in order (none for a text content)."""
        if isinstance(self.content, str):
            return ()
        return tuple(part.image_url for part in self.content if isinstance(part, ImagePart))


class GenConf(_Frozen):
    """Generation settings, with Sibila's ``GenConf`` fields and semantics.

    ``max_tokens`` bounds the output (output cut there fails validation): a positive value is
    a token count, ``0`` all of the context the prompt leaves, ``-1`` to ``-100`` that
    percentage of the model's context. The worker resolves ``0`` and negative values against
    the context it really has (``workers.budget``). ``stop`` is a string or a list of them.

    ``format`` and ``json_schema`` ask for JSON output from ``call()`` (``Model.call`` runs a
    JSON job then); ``special`` (Sibila's provider-specific arguments) is refused by the
    producer: no backend takes extra arguments. These three never travel in a job.

    Built with bad values it raises ``InvalidRequestError`` naming the field. A GenConf is
    immutable: ``genconf(max_tokens=50)`` is a copy with changes, as in Sibila.
    """

    max_tokens: int = Field(default=1024, ge=-100)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: tuple[str, ...] = ()
    seed: int | None = None
    format: Literal["text", "json"] = "text"
    json_schema: dict[str, Any] | str | None = None
    special: dict[str, Any] | None = None

    if not TYPE_CHECKING:  # mypy keeps pydantic's typed __init__

        def __init__(self, **data: Any) -> None:
            try:
                super().__init__(**data)
            except ValidationError as exc:
                raise InvalidRequestError(f"invalid genconf: {field_errors(exc)}") from exc

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop(cls, stop: Any) -> Any:
        """Sibila takes ``stop="###"`` as well as a list."""
        return (stop,) if isinstance(stop, str) else stop

    def __call__(self, **changes: Any) -> GenConf:
        """A copy with ``changes`` (Sibila's ``genconf(max_tokens=50)``); ``special`` is
        updated key by key, as in Sibila."""
        unknown = sorted(set(changes) - set(type(self).model_fields))
        if unknown:
            raise InvalidRequestError(f"GenConf has no field {', '.join(unknown)}")
        if "special" in changes:
            merged = {**(self.special or {}), **(changes["special"] or {})}
            changes = {**changes, "special": merged or None}
        return type(self)(**{**self.model_dump(exclude_unset=True), **changes})

    def clone(self) -> GenConf:
        """Sibila's ``clone()``: a GenConf is immutable, so the copy is equal and independent."""
        return self.model_copy(deep=True)

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenConf:
        return cls(**data)


def field_errors(exc: ValidationError) -> str:
    """``exc``'s errors as ``field: what is wrong (got value)``, one per field."""
    parts = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "(value)"
        parts.append(f"{where}: {error['msg']} (got {error.get('input')!r})")
    return "; ".join(parts)


#: GenConf fields the producer resolves before enqueueing: they never travel in a job.
PRODUCER_ONLY_GENCONF = ("format", "json_schema", "special")
#: JobSpec fields added after the first contract: sent only when set.
ADDED_SPEC_FIELDS = ("ctx_len", "max_tokens_limit")
#: Envelope fields added after the first contract: stored only when set.
ADDED_ENVELOPE_FIELDS = ("label_probs",)


def _without_unset(data: dict[str, Any], added: tuple[str, ...]) -> dict[str, Any]:
    """``data`` less the ``added`` fields that are None: what a reader of an earlier release,
    which refuses fields it does not know, can still decode."""
    for name in added:
        if data[name] is None:
            del data[name]
    return data


class JobKind(StrEnum):
    TEXT = "text"
    JSON = "json"
    EXTRACT = "extract"
    CLASSIFY = "classify"
    #: Facts about the model the worker serves: its context, its output limit, and the
    #: token length of the job's messages (``workers.facts``). Value: ``ModelFacts``.
    INFO = "info"


def _now() -> datetime:
    return datetime.now(UTC)


class JobSpec(_Frozen):
    """One unit of work: a model, a conversation and, for structured jobs, an output schema."""

    version: Literal[1] = 1
    model: str
    kind: JobKind
    messages: tuple[Message, ...] = Field(min_length=1)
    json_schema: dict[str, Any] | None = None
    genconf: GenConf = GenConf()
    created_at: datetime = Field(default_factory=_now)
    #: The context the caller counts on (``Models.create(ctx_len=...)``): a worker whose
    #: model has less refuses the job (``ContextUnavailableError``); ``max_tokens`` 0 or
    #: negative resolves against it.
    ctx_len: int | None = Field(default=None, gt=0)
    #: The most output tokens any job of this model may ask for (``max_tokens_limit``).
    max_tokens_limit: int | None = Field(default=None, gt=0)

    def encode(self) -> dict[str, Any]:
        """The job as JSON. Fields added to the first contract are left out while unused, so
        a worker of an earlier release still decodes the job (and refuses one that uses
        them, instead of ignoring what it does not know)."""
        data = self.model_dump(mode="json", exclude={"genconf": set(PRODUCER_ONLY_GENCONF)})
        return _without_unset(data, ADDED_SPEC_FIELDS)

    @classmethod
    def decode(cls, data: object) -> JobSpec:
        """The job a worker received: raises ContractError for what is no JobSpec, and
        InvalidRequestError for a schema no backend may see (``wire.schema_limits``:
        a producer checks before enqueueing, but a job may come from elsewhere)."""
        spec = decode_model(cls, data)
        if spec.json_schema is not None:
            check_schema(spec.json_schema)
        return spec


class ModelFacts(_Frozen):
    """What a worker knows of the model it serves, the value of an ``INFO`` job. None is
    unknown: an OpenAI-compatible server does not say its context length."""

    ctx_len: int | None = None
    max_tokens_limit: int | None = None
    #: Tokens the job's messages take in the context, chat template included.
    token_len: int | None = None
    #: False when ``token_len`` is an estimate (no tokenizer for the model on the worker).
    token_len_exact: bool = True


class Usage(_Frozen):
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
        )


class Timings(_Frozen):
    created_at: datetime
    started_at: datetime
    finished_at: datetime

    @property
    def queued_s(self) -> float:
        return (self.started_at - self.created_at).total_seconds()

    @property
    def run_s(self) -> float:
        return (self.finished_at - self.started_at).total_seconds()


class Envelope(_Frozen):
    """A stored result: the JSON value and everything known about how it was made."""

    version: Literal[1] = 1
    value: Any
    raw_text: str
    finish_reason: str
    usage: Usage
    model: str
    worker: str
    timings: Timings
    #: Model calls made for this result: validation re-asks and retried requests included.
    #: ``usage`` sums the tokens of all of them.
    attempts: int = Field(default=1, ge=0)
    #: Answered from the cache of identical temperature-0 requests (``usage`` is then zero).
    cached: bool = False
    #: A classification's probability of each label at the point the model chose it (keys:
    #: string labels as they are, others as JSON text); None where the backend cannot say.
    #: Left out of the JSON when None, so producers of earlier releases read every other
    #: result (upgrade producers before workers to read it).
    label_probs: dict[str, float] | None = None

    def encode(self) -> dict[str, Any]:
        return _without_unset(self.model_dump(mode="json"), ADDED_ENVELOPE_FIELDS)

    @classmethod
    def decode(cls, data: object) -> Envelope:
        return decode_model(cls, data)


class Failure(_Frozen):
    """A job's failure as the worker reports it: type and message as strings, never pickles."""

    type: str
    message: str
    raw_text: str | None = None
    finish_reason: str | None = None
    usage: Usage = Usage()
    #: The model's output at every attempt, oldest first (``raw_text`` is the last one).
    raw_outputs: tuple[str, ...] = ()
    attempts: int = 0

    def encode(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def decode(cls, data: object) -> Failure:
        return decode_model(cls, data)


def decode_model(cls: type[M], data: object) -> M:
    """``data`` (parsed JSON) as a ``cls``: the one decoder of every payload the wire carries
    or Redis keeps; anything else is a ContractError."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ContractError(f"not a valid {cls.__name__}: {exc}", data) from exc
