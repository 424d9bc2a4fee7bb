"""A deterministic OpenAI-compatible HTTP stub: the chat completions API with no model behind it.

Stdlib only (plus ``example_value``, which makes schema-valid JSON). Use it in-process::

    with OpenAIStub() as stub:
        client = openai.OpenAI(base_url=stub.base_url, api_key="sk-test")
        ...
        assert stub.requests[-1]["model"] == "stub"

or from another process: ``python -m tests.openai_stub --port 8765`` (prints the base URL, then
serves until killed; ``--help`` lists the ``Chaos`` options).

Endpoints: ``GET /v1/models``, ``GET /v1/models/{id}`` and ``POST /v1/chat/completions``
(non-streaming), with OpenAI's response shape and OpenAI's error bodies
``{"error": {"message", "type", "param", "code"}}``. Every response has a unique
``x-request-id``; normal answers carry OpenAI's ``x-ratelimit-*`` headers.

The request's model name picks the behaviour, so one worker can exercise all of them:

==========================  ====================================================================
model                       behaviour
==========================  ====================================================================
any other name              text (``"stub reply: " + last user message``), ``response_format``
                            ``json_schema`` and ``json_object`` (with llama_cpp.server's optional
                            ``"schema"`` key), forced tool calls
``stub-no-json-schema``     ``json_schema`` -> HTTP 500 as llama_cpp.server answers it (its request
                            model accepts only ``text`` and ``json_object``)
``stub-tools-only``         any JSON ``response_format`` -> HTTP 400 on ``response_format``
``stub-no-logprobs``        ``logprobs`` -> HTTP 400 naming them (Groq's answer)
``stub-no-logprobs-500``    ``logprobs`` -> HTTP 500 naming them (llama_cpp.server's words
                            without ``logits_all``)
``stub-no-alternatives``    ``logprobs`` without alternatives (``top_logprobs`` ignored)
``stub-truncate``           the answer cut in half, ``finish_reason`` ``"length"``
``stub-invalid``            ``"this is not json"``, ``finish_reason`` ``"stop"``, whatever was asked
``stub-invalid-once``       ``"this is not json"`` unless ``messages`` holds an ``assistant``
                            message (a re-ask after the bad answer): then a normal answer
``stub-context``            HTTP 400 ``context_length_exceeded``
``stub-status-<code>``      always HTTP ``<code>`` (4xx or 5xx) with an OpenAI-style error body
                            (``stub-status-429`` without ``retry-after`` headers)
``stub-echo-auth-<code>``   always HTTP ``<code>`` whose message echoes the request's whole
                            ``Authorization`` header (``bad key Bearer sk-...``), as some
                            proxies do
``stub-echo-key-<code>``    always HTTP ``<code>`` whose message names the bare API key
                            (``invalid API key: gsk-...``, no ``Bearer``), as some providers do
``stub-ignore-format``      any ``response_format`` ignored (a text answer), as Anthropic's OpenAI
                            SDK compatibility layer does; forced tool calls work
``stub-slow-<ms>``          sleeps ``<ms>`` milliseconds, then behaves normally
``stub-drip-<ms>``          a normal answer whose body is sent a byte every ``<ms>`` milliseconds
``stub-garbled-<kind>``     a 200 whose body is no chat completion, as a proxy or a broken server
                            answers: ``html`` (an HTML page), ``truncated`` (half the JSON),
                            ``bytes`` (invalid UTF-8 in the content), ``no-message`` (a choice
                            whose ``message`` is null), ``bad-usage`` (``usage`` of no fields)
``stub-ratelimit[-<ms>]``   always HTTP 429 ``rate_limit_exceeded`` with ``retry-after-ms: <ms>``
                            (default ``Chaos.retry_after_s``), ``retry-after`` (whole seconds,
                            rounded up) and ``x-ratelimit-reset-requests``
``stub-ratelimit-first*``   the first request for this exact model name: a 429 as
                            ``stub-ratelimit`` (``Chaos.retry_after_s``); the rest: normal answers
                            (a unique suffix per test gives each test its own first request)
``stub-chaos[-<seed>]``     faults, as a provider under load: per request, drawn from one seeded
                            ``random.Random`` per seed (default ``Chaos.seed``), a 429 as
                            ``stub-ratelimit`` (``Chaos.rate_limit``, 30%), a 500
                            (``Chaos.server_error``, 5%), a stall of ``Chaos.stall_s`` (5 s) before
                            a normal answer (``Chaos.stall``, 5%), else a normal answer
==========================  ====================================================================

``OpenAIStub(chaos=Chaos(...))`` sets the rates and delays; ``clear()`` reseeds the generators.

``logprobs`` (with ``top_logprobs`` up to 20, checked as OpenAI does) come back in OpenAI's shape
for text content: the stub's tokens are words and runs of punctuation, each certain, but for a
classification's label (a schema whose ``output`` is an ``enum``): at its first token the stub
gives the label it wrote (the first) ``CHOSEN_LABEL_P`` and shares the rest among the others.

Usage counts words: ``prompt_tokens`` over all message contents, ``completion_tokens`` over the
answer. ``max_tokens`` (or ``max_completion_tokens``) cuts the answer at that many words, with
``finish_reason`` ``"length"``, as a real model stops at its token budget.

What was asked and answered: ``stub.requests`` is the chat completion request bodies, oldest
first; ``stub.log`` is one ``Exchange`` per request (``received_at``, ``model``, ``status``,
``retry_after_s``, ``body``, ``conversation``, ``fault``, ``answered_at``; ``status`` is ``None``
while the answer is still pending, as during a stall). A request's *conversation* is the digest
of its ``messages`` (``conversation_digest``). After a 429 that told a ``retry-after``, a request
for the same conversation that arrives before that delay has passed is appended to
``stub.violations`` as ``Violation(conversation, early_by_s)``: assert it stays empty to show that
no client retried early (two jobs with identical messages count as one conversation).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import math
import random
import re
import signal
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal, NamedTuple
from urllib.parse import urlsplit

from workers.backends.fake import example_value

JSON = dict[str, Any]

#: The names ``GET /v1/models`` lists. Any other name works too (see the module docstring).
MODELS = (
    "stub",
    "gpt-4o-mini",
    "stub-no-json-schema",
    "stub-tools-only",
    "stub-no-logprobs",
    "stub-no-logprobs-500",
    "stub-no-alternatives",
    "stub-truncate",
    "stub-invalid",
    "stub-invalid-once",
    "stub-context",
    "stub-ratelimit",
    "stub-chaos",
)
_OWNER = "sibylq-stub"
_REQUESTS_PER_MIN = 10_000
_TOKENS_PER_MIN = 2_000_000
_STATUS_MODEL = re.compile(r"stub-status-([45]\d\d)")
_ECHO_AUTH_MODEL = re.compile(r"stub-echo-auth-([45]\d\d)")
_ECHO_KEY_MODEL = re.compile(r"stub-echo-key-([45]\d\d)")
_SLOW_MODEL = re.compile(r"stub-slow-(\d+)")
_DRIP_MODEL = re.compile(r"stub-drip-(\d+)")
_GARBLED_MODEL = re.compile(r"stub-garbled-(html|truncated|bytes|no-message|bad-usage)")
_RATELIMIT_MODEL = re.compile(r"stub-ratelimit(?:-(\d+))?")
_RATELIMIT_FIRST_MODEL = re.compile(r"stub-ratelimit-first(?:-.+)?")
_CHAOS_MODEL = re.compile(r"stub-chaos(?:-(\d+))?")
_INVALID = "this is not json"

#: The faults ``stub-chaos`` injects (``stub-ratelimit[-first]`` inject ``"rate_limit"``).
Fault = Literal["rate_limit", "server_error", "stall"]

# What llama_cpp.server (pydantic request validation, wrapped by its RouteErrorHandler as a 500)
# says when response_format.type is "json_schema".
_LLAMA_CPP_JSON_SCHEMA_ERROR = (
    "1 validation error:\n"
    "  {'type': 'literal_error', 'loc': ('body', 'response_format', 'type'), "
    "'msg': \"Input should be 'text' or 'json_object'\", 'input': 'json_schema', "
    "'ctx': {'expected': \"'text' or 'json_object'\"}}\n"
)


class StubError(Exception):
    """An OpenAI-style error response: HTTP status plus ``{"error": {...}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s

    def body(self) -> JSON:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def reply(self) -> Reply:
        if self.retry_after_s is None:
            return Reply(self.status, self.body())
        return Reply(
            self.status,
            self.body(),
            headers=_retry_headers(self.retry_after_s),
            retry_after_s=self.retry_after_s,
        )


def _retry_headers(retry_after_s: float) -> dict[str, str]:
    """What OpenAI sends with a 429; the SDK honours ``retry-after-ms`` before ``retry-after``."""
    return {
        "retry-after-ms": str(round(retry_after_s * 1000)),
        "retry-after": str(math.ceil(retry_after_s)),
        "x-ratelimit-limit-requests": "3",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": _duration(retry_after_s),
    }


def _duration(seconds: float) -> str:
    """OpenAI's way to write a reset delay: ``"300ms"``, ``"1.5s"``, ``"20s"``."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    return f"{seconds:g}s"


@dataclass(frozen=True)
class Reply:
    """An HTTP response: status, JSON payload, extra headers, the delay a 429 told the client."""

    status: int
    payload: JSON
    headers: Mapping[str, str] = field(default_factory=dict)
    retry_after_s: float | None = None
    #: The body as sent, when it is not the payload's JSON (``stub-garbled-*``).
    raw: bytes | None = None
    content_type: str = "application/json"
    #: Seconds between the body's bytes (``stub-drip-*``); None: the body at once.
    drip_s: float | None = None


@dataclass(frozen=True)
class Chaos:
    """What ``stub-chaos`` and ``stub-ratelimit`` do: fault rates (the rest answer normally),
    the ``retry-after`` of their 429s, how long a stall lasts, and the default seed."""

    rate_limit: float = 0.3
    server_error: float = 0.05
    stall: float = 0.05
    retry_after_s: float = 0.3
    stall_s: float = 5.0
    seed: int = 1

    def __post_init__(self) -> None:
        rates = (self.rate_limit, self.server_error, self.stall)
        if min(rates) < 0 or sum(rates) > 1:
            raise ValueError(f"fault rates must be >= 0 and sum to at most 1, not {rates}")
        if self.retry_after_s < 0 or self.stall_s < 0:
            raise ValueError("retry_after_s and stall_s must be >= 0")

    def fault(self, draw: float) -> Fault | None:
        """The fault for a uniform draw in [0, 1), or None for a normal answer."""
        faults: tuple[tuple[Fault, float], ...] = (
            ("rate_limit", self.rate_limit),
            ("server_error", self.server_error),
            ("stall", self.stall),
        )
        for fault, rate in faults:
            if draw < rate:
                return fault
            draw -= rate
        return None


@dataclass(frozen=True)
class Exchange:
    """One chat completion request and what the stub answered (``status`` None: not yet)."""

    received_at: float  # time.time() on arrival
    model: str
    body: JSON
    conversation: str  # conversation_digest(body["messages"])
    status: int | None = None
    retry_after_s: float | None = None  # the delay a 429 told the client
    fault: Fault | None = None  # what stub-chaos / stub-ratelimit injected
    answered_at: float | None = None


class Violation(NamedTuple):
    """A request that came ``early_by_s`` seconds before its conversation's retry-after passed."""

    conversation: str
    early_by_s: float


@dataclass(frozen=True)
class Answer:
    """What the stub 'generates': text content, or a tool call (name, JSON arguments)."""

    content: str | None = None
    tool_name: str | None = None
    arguments: str | None = None
    finish_reason: str = "stop"

    @property
    def output(self) -> str:
        return (self.arguments if self.tool_name is not None else self.content) or ""

    def with_output(self, output: str, finish_reason: str) -> Answer:
        if self.tool_name is not None:
            return replace(self, arguments=output, finish_reason=finish_reason)
        return replace(self, content=output, finish_reason=finish_reason)


# -- chat completions -------------------------------------------------------------------------


def chat_completion(body: JSON, authorization: str = "") -> JSON:
    """The response to ``POST /v1/chat/completions``; raises StubError for an error response."""
    model = _required(body, "model", str)
    messages = _required(body, "messages", list)
    for index, message in enumerate(messages):
        _check_message(message, f"messages[{index}]")
    _apply_model_behaviour(model, authorization)
    if body.get("stream"):
        raise StubError(400, "This stub does not support streaming.", param="stream")
    top = _requested_logprobs(model, body)
    answer = _degrade(model, _answer(model, body), messages)
    answer = _limit(answer, body.get("max_completion_tokens") or body.get("max_tokens"))
    response = _response(model, messages, answer)
    if top is not None and answer.tool_name is None:
        labels = _enum_of(_schema_asked(body))
        response["choices"][0]["logprobs"] = _content_logprobs(answer.output, top, labels)
    return response


# -- logprobs -----------------------------------------------------------------------------------

#: The stub's tokens: words, runs of punctuation with the spaces before them, other spaces.
_TOKEN = re.compile(r"\w+|\s*[^\w\s]+|\s+")
#: At a label's first token, the probability the stub gives the label it wrote.
CHOSEN_LABEL_P = 0.5


def _requested_logprobs(model: str, body: JSON) -> int | None:
    """How many ``top_logprobs`` the request asks for (None: no ``logprobs``), checked as
    OpenAI checks them."""
    top = body.get("top_logprobs")
    if not body.get("logprobs"):
        if top is not None:
            raise StubError(400, "top_logprobs requires logprobs to be true.", param="top_logprobs")
        return None
    if model == "stub-no-logprobs":
        raise StubError(400, "logprobs is not supported with this model", param="logprobs")
    if model == "stub-no-logprobs-500":
        raise StubError(
            500,
            "logprobs is not supported for models created with logits_all=False",
            type_="internal_server_error",
        )
    if model == "stub-no-alternatives":
        return 0  # logprobs of the chosen tokens only, as a server ignoring top_logprobs
    if top is None:
        return 0
    if not isinstance(top, int) or not 0 <= top <= 20:
        raise StubError(
            400,
            f"Invalid 'top_logprobs': integer above maximum value. Expected a value <= 20, but "
            f"got {top} instead.",
            param="top_logprobs",
            code="integer_above_max_value",
        )
    return top


def _schema_asked(body: JSON) -> JSON | None:
    response_format = body.get("response_format")
    if not isinstance(response_format, dict):
        return None
    if response_format.get("type") == "json_schema":
        return _json_schema_of(response_format)
    schema = response_format.get("schema")
    return schema if isinstance(schema, dict) else None


def _enum_of(schema: JSON | None) -> list[Any]:
    output = (schema or {}).get("properties", {}).get("output", {})
    labels = output.get("enum") if isinstance(output, dict) else None
    return labels if isinstance(labels, list) else []


def _content_logprobs(content: str, top: int, labels: list[Any]) -> JSON:
    """OpenAI's ``logprobs`` of ``content``: each token certain, but the first token of an
    ``output`` label (the stub writes the schema's first), where the stub was unsure:
    ``CHOSEN_LABEL_P`` for it, the rest shared by the other labels' first tokens."""
    tokens = [match.group() for match in _TOKEN.finditer(content)]
    choice_at = _label_start(content, labels)
    entries, offset = [], 0
    for token in tokens:
        alternatives = [(token, 0.0)]
        if offset == choice_at and len(labels) > 1:
            others = [_TOKEN.match(_label_text(label)) for label in labels[1:]]
            rest = math.log((1 - CHOSEN_LABEL_P) / len(others))
            alternatives = [(token, math.log(CHOSEN_LABEL_P))]
            alternatives += [(other.group(), rest) for other in others if other is not None]
        entries.append(
            {
                **_token_logprob(*alternatives[0]),
                "top_logprobs": [_token_logprob(*one) for one in alternatives[:top]],
            }
        )
        offset += len(token)
    return {"content": entries, "refusal": None}


def _label_text(label: Any) -> str:
    return label if isinstance(label, str) else json.dumps(label)


def _label_start(content: str, labels: list[Any]) -> int | None:
    if not labels:
        return None
    written = json.dumps(labels[0])
    found = content.find(written)
    return None if found < 0 else found + (1 if isinstance(labels[0], str) else 0)


def _token_logprob(token: str, logprob: float) -> JSON:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def _required(body: JSON, name: str, kind: type) -> Any:
    if name not in body:
        raise StubError(
            400,
            f"Missing required parameter: '{name}'.",
            param=name,
            code="missing_required_parameter",
        )
    value = body[name]
    if not isinstance(value, kind):
        raise StubError(
            400,
            f"Invalid type for '{name}': expected {kind.__name__}.",
            param=name,
            code="invalid_type",
        )
    return value


# -- message shapes, refused as OpenAI refuses them ---------------------------------------------

_ROLES = ("system", "developer", "user", "assistant", "tool")
#: The content part types OpenAI takes per role (images: user messages only).
_PART_TYPES = {
    "user": ("text", "image_url", "input_audio", "file"),
    "assistant": ("text", "refusal"),
}
_DATA_IMAGE = re.compile(r"data:image/(png|jpeg|gif|webp);base64,([A-Za-z0-9+/]+=*)", re.DOTALL)


def _check_message(message: object, where: str) -> None:
    if not isinstance(message, dict):
        raise StubError(400, f"Invalid type for '{where}': expected an object.", param=where)
    role = message.get("role")
    if role not in _ROLES:
        raise StubError(
            400,
            f"Invalid value: {role!r}. Supported values are: "
            + ", ".join(repr(name) for name in _ROLES)
            + ".",
            param=f"{where}.role",
            code="invalid_value",
        )
    content = message.get("content")
    if isinstance(content, str) or (content is None and role == "assistant"):
        return
    if not isinstance(content, list) or not content:
        raise StubError(
            400,
            f"Invalid type for '{where}.content': expected a string or a non-empty array of "
            "content parts.",
            param=f"{where}.content",
            code="invalid_type",
        )
    for index, part in enumerate(content):
        _check_part(part, str(role), f"{where}.content[{index}]")


def _check_part(part: object, role: str, where: str) -> None:
    allowed = _PART_TYPES.get(role, ("text",))
    kind = part.get("type") if isinstance(part, dict) else None
    if not isinstance(part, dict) or kind not in allowed:
        raise StubError(
            400,
            f"Invalid value: {kind!r}. Supported values are: "
            + " and ".join(repr(name) for name in allowed)
            + ".",
            param=f"{where}.type",
            code="invalid_value",
        )
    if kind == "text" and not isinstance(part.get("text"), str):
        raise StubError(400, f"Missing required parameter: '{where}.text'.", param=f"{where}.text")
    if kind == "image_url":
        _check_image_url(part.get("image_url"), f"{where}.image_url")


def _check_image_url(image_url: object, where: str) -> None:
    url = image_url.get("url") if isinstance(image_url, dict) else None
    if not isinstance(url, str):
        raise StubError(400, f"Missing required parameter: '{where}.url'.", param=f"{where}.url")
    assert isinstance(image_url, dict)
    if image_url.get("detail", "auto") not in ("auto", "low", "high"):
        raise StubError(
            400,
            f"Invalid value: {image_url['detail']!r}. Supported values are: 'auto', 'low' and "
            "'high'.",
            param=f"{where}.detail",
            code="invalid_value",
        )
    if url.startswith(("https://", "http://")):
        return
    match = _DATA_IMAGE.fullmatch(url)
    if match is None:
        raise StubError(
            400,
            "Invalid image URL: expected a URL with an http(s) scheme or a base64-encoded "
            "data:image/(png|jpeg|gif|webp) URL.",
            param=f"{where}.url",
            code="invalid_image_url",
        )
    try:
        base64.b64decode(match.group(2), validate=True)
    except ValueError:
        raise StubError(
            400,
            "You uploaded an unsupported image. Please make sure your image is valid.",
            param=f"{where}.url",
            code="invalid_image_format",
        ) from None


def _apply_model_behaviour(model: str, authorization: str) -> None:
    if status := _STATUS_MODEL.fullmatch(model):
        raise status_error(int(status.group(1)), model, authorization)
    if echo := _ECHO_AUTH_MODEL.fullmatch(model):
        raise StubError(int(echo.group(1)), f"bad key {authorization}", code="invalid_api_key")
    if echo := _ECHO_KEY_MODEL.fullmatch(model):
        key = authorization.removeprefix("Bearer ").strip()
        raise StubError(int(echo.group(1)), f"invalid API key: {key}", code="invalid_api_key")
    if model == "stub-context":
        raise StubError(
            400,
            "This model's maximum context length is 16 tokens. However, your messages "
            "resulted in 999 tokens.",
            param="messages",
            code="context_length_exceeded",
        )
    if slow := _SLOW_MODEL.fullmatch(model):
        time.sleep(int(slow.group(1)) / 1000)


def status_error(status: int, model: str, authorization: str = "") -> StubError:
    """The error OpenAI answers with for ``status`` (the common ones, then a generic body)."""
    if status == 401:
        return StubError(
            401,
            f"Incorrect API key provided: {_masked_key(authorization)}. You can find your API "
            "key at https://platform.openai.com/account/api-keys.",
            code="invalid_api_key",
        )
    if status == 404:
        return StubError(
            404,
            f"The model `{model}` does not exist or you do not have access to it.",
            code="model_not_found",
        )
    if status == 429:
        return rate_limit_error(model)
    if status == 503:
        return StubError(
            503,
            "The engine is currently overloaded, please try again later.",
            type_="server_error",
        )
    phrase = _phrase(status)
    if status >= 500:
        return StubError(
            status,
            f"The server had an error while processing your request ({status} {phrase}).",
            type_="server_error",
        )
    return StubError(status, f"{status} {phrase}.")


def rate_limit_error(model: str, retry_after_s: float | None = None) -> StubError:
    """OpenAI's 429; with ``retry_after_s`` it also sends the ``retry-after`` headers."""
    wait = _duration(20 if retry_after_s is None else retry_after_s)
    return StubError(
        429,
        f"Rate limit reached for {model} on requests per min (RPM): Limit 3, Used 3, "
        f"Requested 1. Please try again in {wait}.",
        type_="requests",
        code="rate_limit_exceeded",
        retry_after_s=retry_after_s,
    )


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _masked_key(authorization: str) -> str:
    key = authorization.removeprefix("Bearer ").strip()
    if len(key) <= 12:
        return "*" * len(key)
    return key[:8] + "*" * (len(key) - 12) + key[-4:]


def _answer(model: str, body: JSON) -> Answer:
    tool = _forced_tool(body)
    if tool is not None:
        name, parameters = tool
        arguments = json.dumps(example_value(parameters))
        return Answer(tool_name=name, arguments=arguments, finish_reason="tool_calls")
    response_format = body.get("response_format") or {"type": "text"}
    if model == "stub-ignore-format":
        response_format = {"type": "text"}
    if not isinstance(response_format, dict):
        raise StubError(400, "Invalid type for 'response_format'.", param="response_format")
    kind = response_format.get("type")
    _check_format_supported(model, kind)
    if kind == "json_schema":
        return Answer(content=json.dumps(example_value(_json_schema_of(response_format))))
    if kind == "json_object":
        _check_mentions_json(body["messages"])
        schema = response_format.get("schema")
        return Answer(content=json.dumps(example_value(schema) if schema else {}))
    if kind == "text":
        return Answer(content="stub reply: " + _last_user_content(body["messages"]))
    raise StubError(
        400,
        f"Invalid value: '{kind}'. Supported values are: 'json_object', 'json_schema', and 'text'.",
        param="response_format.type",
        code="invalid_value",
    )


def _forced_tool(body: JSON) -> tuple[str, JSON] | None:
    choice = body.get("tool_choice")
    tools = [tool["function"] for tool in body.get("tools") or [] if tool.get("type") == "function"]
    if choice is None or choice in ("auto", "none"):
        return None
    if not tools:
        raise StubError(
            400,
            "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are "
            "specified.",
            param="tool_choice",
        )
    if choice == "required":
        wanted = tools[0]["name"]
    elif isinstance(choice, dict) and choice.get("type") == "function":
        wanted = choice["function"]["name"]
    else:
        raise StubError(400, f"Invalid value for 'tool_choice': {choice!r}.", param="tool_choice")
    for function in tools:
        if function["name"] == wanted:
            return wanted, function.get("parameters") or {"type": "object", "properties": {}}
    raise StubError(
        400,
        f"Tool choice '{wanted}' not found in 'tools' parameter.",
        param="tool_choice",
    )


def _check_format_supported(model: str, kind: object) -> None:
    if model == "stub-no-json-schema" and kind == "json_schema":
        raise StubError(500, _LLAMA_CPP_JSON_SCHEMA_ERROR, type_="internal_server_error")
    if model == "stub-tools-only" and kind in ("json_schema", "json_object"):
        raise StubError(
            400,
            f"Invalid parameter: 'response_format' of type '{kind}' is not supported with this "
            "model.",
            param="response_format",
        )


def _json_schema_of(response_format: JSON) -> JSON:
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict) or not spec.get("name"):
        raise StubError(
            400,
            "Missing required parameter: 'response_format.json_schema.name'.",
            param="response_format.json_schema.name",
            code="missing_required_parameter",
        )
    schema = spec.get("schema") or {}
    return dict(schema)


def _check_mentions_json(messages: list[Any]) -> None:
    if not any("json" in _text_of(message).lower() for message in messages):
        raise StubError(
            400,
            "'messages' must contain the word 'json' in some form, to use 'response_format' of "
            "type 'json_object'.",
            param="messages",
        )


def _last_user_content(messages: list[Any]) -> str:
    users = [_text_of(message) for message in messages if message.get("role") == "user"]
    return users[-1] if users else ""


def _text_of(message: Any) -> str:
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def _degrade(model: str, answer: Answer, messages: list[Any]) -> Answer:
    if model == "stub-truncate":
        output = answer.output
        return answer.with_output(output[: len(output) // 2], "length")
    if model == "stub-invalid" or (model == "stub-invalid-once" and not _is_reask(messages)):
        return answer.with_output(_INVALID, "stop")
    return answer


def _is_reask(messages: list[Any]) -> bool:
    return any(
        isinstance(message, dict) and message.get("role") == "assistant" for message in messages
    )


def _limit(answer: Answer, max_tokens: object) -> Answer:
    if not isinstance(max_tokens, int) or max_tokens <= 0:
        return answer
    words = list(re.finditer(r"\S+", answer.output))
    if len(words) <= max_tokens:
        return answer
    return answer.with_output(answer.output[: words[max_tokens - 1].end()], "length")


def _response(model: str, messages: list[Any], answer: Answer) -> JSON:
    prompt_tokens = sum(len(_text_of(message).split()) for message in messages)
    completion_tokens = len(answer.output.split())
    return {
        "id": "chatcmpl-" + _digest(model, messages, answer),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": "fp_stub",
        "choices": [
            {
                "index": 0,
                "message": _message(answer),
                "finish_reason": answer.finish_reason,
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def _message(answer: Answer) -> JSON:
    message: JSON = {"role": "assistant", "content": answer.content, "refusal": None}
    if answer.tool_name is not None:
        message["tool_calls"] = [
            {
                "id": "call_" + _digest(answer.tool_name, answer.arguments),
                "type": "function",
                "function": {"name": answer.tool_name, "arguments": answer.arguments},
            }
        ]
    return message


def _digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:24]


def _model_name(body: JSON) -> str:
    model = body.get("model")
    return model if isinstance(model, str) else ""


def conversation_digest(messages: object) -> str:
    """What identifies a conversation in ``Exchange.conversation`` and ``Violation``."""
    text = json.dumps(messages, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _garbled(kind: str, reply: Reply) -> Reply:
    """``reply`` (a normal answer) made into a 200 that is no chat completion."""
    body = json.dumps(reply.payload).encode()
    if kind == "html":
        page = b"<html><body><h1>502 Bad Gateway</h1></body></html>"
        return replace(reply, raw=page, content_type="text/html")
    if kind == "truncated":
        return replace(reply, raw=body[: len(body) // 2])
    if kind == "bytes":
        return replace(reply, raw=body.replace(b'"content": "', b'"content": "\xff', 1))
    payload = json.loads(body)
    if kind == "no-message":
        payload["choices"][0]["message"] = None
    else:  # bad-usage
        payload["usage"] = {}
    return replace(reply, payload=payload)


def _ok(payload: JSON) -> Reply:
    """A 200 with the rate limit headers OpenAI sends on every answer."""
    tokens = int(payload["usage"]["total_tokens"])
    headers = {
        "x-ratelimit-limit-requests": str(_REQUESTS_PER_MIN),
        "x-ratelimit-remaining-requests": str(_REQUESTS_PER_MIN - 1),
        "x-ratelimit-reset-requests": _duration(60 / _REQUESTS_PER_MIN),
        "x-ratelimit-limit-tokens": str(_TOKENS_PER_MIN),
        "x-ratelimit-remaining-tokens": str(_TOKENS_PER_MIN - tokens),
        "x-ratelimit-reset-tokens": _duration(60 * tokens / _TOKENS_PER_MIN),
    }
    return Reply(200, payload, headers=headers)


# -- models -----------------------------------------------------------------------------------


def model_object(name: str) -> JSON:
    return {"id": name, "object": "model", "created": 1700000000, "owned_by": _OWNER}


def model_list() -> JSON:
    return {"object": "list", "data": [model_object(name) for name in MODELS]}


# -- HTTP -------------------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], exchange: Callable[[JSON, str], Reply]) -> None:
        self.exchange = exchange
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    timeout = 60  # idle keep-alive connections close after this many seconds
    # Headers and body go out in two writes: with Nagle's algorithm the body waits for the
    # client's delayed ACK, 40 ms a request.
    disable_nagle_algorithm = True

    def do_GET(self) -> None:
        path = urlsplit(self.path).path.rstrip("/")
        if path == "/v1/models":
            self._send(Reply(200, model_list()))
        elif path.startswith("/v1/models/"):
            self._send(Reply(200, model_object(path.removeprefix("/v1/models/"))))
        else:
            self._send(self._not_found().reply())

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if urlsplit(self.path).path.rstrip("/") != "/v1/chat/completions":
            self._send(self._not_found().reply())
            return
        try:
            body = _parse_body(raw)
        except StubError as error:
            self._send(error.reply())
            return
        self._send(self.server.exchange(body, self.headers.get("Authorization", "")))

    def _not_found(self) -> StubError:
        return StubError(404, f"Invalid URL ({self.command} {urlsplit(self.path).path})")

    def _send(self, reply: Reply) -> None:
        data = json.dumps(reply.payload).encode() if reply.raw is None else reply.raw
        # after a stall the client may be gone: nobody is left to tell
        with contextlib.suppress(ConnectionError):
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("x-request-id", "req_" + uuid.uuid4().hex)
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.end_headers()
            if reply.drip_s is None:
                self.wfile.write(data)
                return
            self.wfile.flush()
            for index in range(len(data)):
                self.wfile.write(data[index : index + 1])
                self.wfile.flush()
                time.sleep(reply.drip_s)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: tests read ``OpenAIStub.requests`` and ``OpenAIStub.log`` instead."""


def _parse_body(raw: bytes) -> JSON:
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise StubError(
            400,
            "We could not parse the JSON body of your request. (HINT: This likely means you "
            "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, "
            "but what was sent was not valid JSON.)",
        )
    return body


class OpenAIStub:
    """The stub server in a daemon thread. A context manager; ``close()`` stops it."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1", chaos: Chaos | None = None) -> None:
        self.chaos = chaos or Chaos()
        self._host = host
        self._lock = threading.Lock()
        self._log: list[Exchange] = []
        self._violations: list[Violation] = []
        self._retry_at: dict[str, float] = {}  # conversation -> when its retry-after passes
        self._rngs: dict[int, random.Random] = {}  # seed -> the generator stub-chaos draws from
        self._limited: set[str] = set()  # the stub-ratelimit-first-* names already answered 429
        self._closing = threading.Event()
        self._server = _Server((host, port), self._exchange)
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="openai-stub", daemon=True
        )
        self._thread.start()
        self._closed = False

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://{self._host}:{self.port}/v1"

    @property
    def requests(self) -> list[JSON]:
        """The chat completion request bodies received so far, oldest first (a copy)."""
        return [exchange.body for exchange in self.log]

    def requests_for(self, model: str) -> list[JSON]:
        """The request bodies received for one model name."""
        return [body for body in self.requests if body.get("model") == model]

    @property
    def log(self) -> list[Exchange]:
        """Each chat completion request with what the stub answered, by arrival (a copy)."""
        with self._lock:
            return list(self._log)

    @property
    def violations(self) -> list[Violation]:
        """Requests that came before their conversation's retry-after had passed (a copy)."""
        with self._lock:
            return list(self._violations)

    def clear(self) -> None:
        """Forget requests, violations and retry-afters; reseed ``stub-chaos``."""
        with self._lock:
            self._log.clear()
            self._violations.clear()
            self._retry_at.clear()
            self._rngs.clear()
            self._limited.clear()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._closing.set()  # ends stalls
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> OpenAIStub:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _exchange(self, body: JSON, authorization: str) -> Reply:
        """Serve one request (in its handler thread), recording it on arrival and on answer."""
        received_at = time.time()
        model = _model_name(body)
        pending = Exchange(
            received_at=received_at,
            model=model,
            body=body,
            conversation=conversation_digest(body.get("messages")),
            fault=self._draw_fault(model),
        )
        self._arrive(pending)
        try:
            self._inject(pending.fault, model)
            reply = _ok(chat_completion(body, authorization))
            if garbled := _GARBLED_MODEL.fullmatch(model):
                reply = _garbled(garbled.group(1), reply)
            if drip := _DRIP_MODEL.fullmatch(model):
                reply = replace(reply, drip_s=int(drip.group(1)) / 1000)
        except StubError as error:
            reply = error.reply()
        self._settle(pending, reply)
        return reply

    def _arrive(self, exchange: Exchange) -> None:
        with self._lock:
            self._log.append(exchange)
            retry_at = self._retry_at.get(exchange.conversation, 0.0)
            if exchange.received_at < retry_at:
                early_by_s = retry_at - exchange.received_at
                self._violations.append(Violation(exchange.conversation, early_by_s))

    def _draw_fault(self, model: str) -> Fault | None:
        if _RATELIMIT_FIRST_MODEL.fullmatch(model):
            return "rate_limit" if self._first_time(model) else None
        if _RATELIMIT_MODEL.fullmatch(model):
            return "rate_limit"
        chaos = _CHAOS_MODEL.fullmatch(model)
        if chaos is None:
            return None
        seed = int(chaos.group(1)) if chaos.group(1) else self.chaos.seed
        with self._lock:
            rng = self._rngs.setdefault(seed, random.Random(seed))
            return self.chaos.fault(rng.random())

    def _first_time(self, model: str) -> bool:
        with self._lock:
            first = model not in self._limited
            self._limited.add(model)
            return first

    def _inject(self, fault: Fault | None, model: str) -> None:
        if fault == "rate_limit":
            raise rate_limit_error(model, self._retry_after_s(model))
        if fault == "server_error":
            raise status_error(500, model)
        if fault == "stall":
            self._closing.wait(self.chaos.stall_s)

    def _retry_after_s(self, model: str) -> float:
        ratelimit = _RATELIMIT_MODEL.fullmatch(model)  # no match for stub-ratelimit-first-*
        if ratelimit and ratelimit.group(1):
            return int(ratelimit.group(1)) / 1000
        return self.chaos.retry_after_s

    def _settle(self, pending: Exchange, reply: Reply) -> None:
        now = time.time()
        answered = replace(
            pending, status=reply.status, retry_after_s=reply.retry_after_s, answered_at=now
        )
        with self._lock:
            if reply.retry_after_s is not None:
                self._retry_at[pending.conversation] = now + reply.retry_after_s
            # by identity: equal exchanges may be pending at once; gone if clear() came between
            for index in range(len(self._log) - 1, -1, -1):
                if self._log[index] is pending:
                    self._log[index] = answered
                    return


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser()
    args = parser.parse_args(argv)
    try:
        chaos = chaos_of(args)
    except ValueError as error:
        parser.error(str(error))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    with OpenAIStub(port=args.port, host=args.host, chaos=chaos) as stub:
        print(stub.base_url, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="A deterministic OpenAI-compatible stub server.")
    parser.add_argument("--port", type=int, default=0, help="port to bind (default: a free one)")
    parser.add_argument("--host", default="127.0.0.1")
    defaults = Chaos()
    chaos = parser.add_argument_group("faults", "what stub-chaos and stub-ratelimit do")
    chaos.add_argument("--rate-limit", type=float, default=defaults.rate_limit, help="429 rate")
    chaos.add_argument("--server-error", type=float, default=defaults.server_error, help="500 rate")
    chaos.add_argument("--stall", type=float, default=defaults.stall, help="stall rate")
    chaos.add_argument("--retry-after-s", type=float, default=defaults.retry_after_s)
    chaos.add_argument("--stall-s", type=float, default=defaults.stall_s)
    chaos.add_argument("--seed", type=int, default=defaults.seed)
    return parser


def chaos_of(args: argparse.Namespace) -> Chaos:
    return Chaos(
        rate_limit=args.rate_limit,
        server_error=args.server_error,
        stall=args.stall,
        retry_after_s=args.retry_after_s,
        stall_s=args.stall_s,
        seed=args.seed,
    )


if __name__ == "__main__":
    main()
