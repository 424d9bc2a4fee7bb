"""A deterministic OpenAI-compatible HTTP stub: the chat completions API with no model behind it.

Stdlib only (plus ``example_value``, which makes schema-valid JSON). Use it in-process::

    with OpenAIStub() as stub:
        client = openai.OpenAI(base_url=stub.base_url, api_key="sk-test")
        ...
        assert stub.requests[-1]["model"] == "stub"

or from another process: ``python -m tests.openai_stub --port 8765`` (prints the base URL, then
serves until killed).

Endpoints: ``GET /v1/models``, ``GET /v1/models/{id}`` and ``POST /v1/chat/completions``
(non-streaming), with OpenAI's response shape and OpenAI's error bodies
``{"error": {"message", "type", "param", "code"}}``.

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
``stub-truncate``           the answer cut in half, ``finish_reason`` ``"length"``
``stub-invalid``            ``"this is not json"``, ``finish_reason`` ``"stop"``, whatever was asked
``stub-context``            HTTP 400 ``context_length_exceeded``
``stub-status-<code>``      always HTTP ``<code>`` (4xx or 5xx) with an OpenAI-style error body
``stub-slow-<ms>``          sleeps ``<ms>`` milliseconds, then behaves normally
==========================  ====================================================================

Usage counts words: ``prompt_tokens`` over all message contents, ``completion_tokens`` over the
answer. ``max_tokens`` (or ``max_completion_tokens``) cuts the answer at that many words, with
``finish_reason`` ``"length"``, as a real model stops at its token budget.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import re
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from workers.backends.fake import example_value

JSON = dict[str, Any]

#: The names ``GET /v1/models`` lists. Any other name works too (see the module docstring).
MODELS = (
    "stub",
    "gpt-4o-mini",
    "stub-no-json-schema",
    "stub-tools-only",
    "stub-truncate",
    "stub-invalid",
    "stub-context",
)
_OWNER = "sibylq-stub"
_STATUS_MODEL = re.compile(r"stub-status-([45]\d\d)")
_SLOW_MODEL = re.compile(r"stub-slow-(\d+)")

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
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code

    def body(self) -> JSON:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


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
    _apply_model_behaviour(model, authorization)
    if body.get("stream"):
        raise StubError(400, "This stub does not support streaming.", param="stream")
    answer = _degrade(model, _answer(model, body))
    answer = _limit(answer, body.get("max_completion_tokens") or body.get("max_tokens"))
    return _response(model, messages, answer)


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


def _apply_model_behaviour(model: str, authorization: str) -> None:
    if status := _STATUS_MODEL.fullmatch(model):
        raise status_error(int(status.group(1)), model, authorization)
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
        return StubError(
            429,
            f"Rate limit reached for {model} on requests per min (RPM): Limit 3, Used 3, "
            "Requested 1. Please try again in 20s.",
            type_="requests",
            code="rate_limit_exceeded",
        )
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


def _degrade(model: str, answer: Answer) -> Answer:
    if model == "stub-truncate":
        output = answer.output
        return answer.with_output(output[: len(output) // 2], "length")
    if model == "stub-invalid":
        return answer.with_output("this is not json", "stop")
    return answer


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


# -- models -----------------------------------------------------------------------------------


def model_object(name: str) -> JSON:
    return {"id": name, "object": "model", "created": 1700000000, "owned_by": _OWNER}


def model_list() -> JSON:
    return {"object": "list", "data": [model_object(name) for name in MODELS]}


# -- HTTP -------------------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], record: Callable[[JSON], None]) -> None:
        self.record = record
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    timeout = 60  # idle keep-alive connections close after this many seconds

    def do_GET(self) -> None:
        path = urlsplit(self.path).path.rstrip("/")
        if path == "/v1/models":
            self._send(200, model_list())
        elif path.startswith("/v1/models/"):
            self._send(200, model_object(path.removeprefix("/v1/models/")))
        else:
            self._send_error(self._not_found())

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if urlsplit(self.path).path.rstrip("/") != "/v1/chat/completions":
            self._send_error(self._not_found())
            return
        try:
            body = _parse_body(raw)
            self.server.record(body)
            self._send(200, chat_completion(body, self.headers.get("Authorization", "")))
        except StubError as error:
            self._send_error(error)

    def _not_found(self) -> StubError:
        return StubError(404, f"Invalid URL ({self.command} {urlsplit(self.path).path})")

    def _send_error(self, error: StubError) -> None:
        self._send(error.status, error.body())

    def _send(self, status: int, payload: JSON) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-request-id", "req_" + _digest(status, payload)[:16])
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: tests read ``OpenAIStub.requests`` instead of a log."""


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

    def __init__(self, port: int = 0, host: str = "127.0.0.1") -> None:
        self._host = host
        self._lock = threading.Lock()
        self._requests: list[JSON] = []
        self._server = _Server((host, port), self._record)
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
        with self._lock:
            return list(self._requests)

    def requests_for(self, model: str) -> list[JSON]:
        """The request bodies received for one model name."""
        return [body for body in self.requests if body.get("model") == model]

    def clear(self) -> None:
        with self._lock:
            self._requests.clear()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> OpenAIStub:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _record(self, body: JSON) -> None:
        with self._lock:
            self._requests.append(body)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A deterministic OpenAI-compatible stub server.")
    parser.add_argument("--port", type=int, default=0, help="port to bind (default: a free one)")
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    with OpenAIStub(port=args.port, host=args.host) as stub:
        print(stub.base_url, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()


if __name__ == "__main__":
    main()
