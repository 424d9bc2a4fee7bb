"""The ``openai`` backend: any OpenAI-compatible chat completions endpoint, through the SDK.

The endpoint comes from the environment (``OPENAI_BASE_URL``, ``OPENAI_API_KEY``; local servers
need no key, so a placeholder is sent when none is set). One SDK client is shared by every job
in the process: the worker runs them on a pool of threads, and the client is thread-safe.

Structured jobs need the server to constrain its output, and servers differ in how they offer
that. Modes are tried in order until one is accepted:

1. ``json_schema``: ``response_format={"type": "json_schema", ...}`` (OpenAI, vLLM, llama.cpp's
   own server...).
2. ``tools``: one forced function call named ``output`` whose parameters are the schema; the
   answer is the call's arguments.
3. ``json_object``: ``response_format={"type": "json_object", "schema": ...}``; the ``schema``
   key is not OpenAI's but llama_cpp.server honours it. The schema also goes into the system
   message, so a server that ignores the key still gets asked for the right JSON.

A mode counts as refused when the server answers 400 or 422, or 500 with an error that names
``response_format``, ``json_schema`` or ``tool`` (llama_cpp.server answers ``json_schema`` that
way). A context-length error is never a refusal. The mode that worked is remembered per
``(base_url, model)``, so later jobs go straight to it.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import openai
from openai.types.chat import ChatCompletion, ChatCompletionMessage

from producer.contract import GenConf, Message, Usage
from producer.errors import BackendError, JobFailedError, PromptTooLongError
from producer.settings import Settings

from .base import Completion, CompletionRequest

Mode = Literal["json_schema", "tools", "json_object"]

#: Structured output modes, in the order they are tried.
MODES: tuple[Mode, ...] = ("json_schema", "tools", "json_object")

#: Sent when ``OPENAI_API_KEY`` is unset: local servers need no key, the SDK insists on one.
PLACEHOLDER_API_KEY = "sk-no-key-required"

_OUTPUT_NAME = "output"
_SCHEMA_INSTRUCTION = "Answer only with a JSON value that follows this JSON schema:\n{schema}"
_REFUSAL_STATUSES = frozenset({400, 422})
_REFUSAL_WORDS = ("response_format", "json_schema", "tool")
_CONTEXT_WORDS = ("maximum context length", "context window", "context length")
_TRANSIENT_STATUSES = frozenset({408, 409, 429})


class OpenAIBackend:
    """Runs completions against an OpenAI-compatible endpoint."""

    def __init__(self, settings: Settings, client: openai.OpenAI | None = None) -> None:
        self._client = client if client is not None else shared_client(settings)
        # Probing a mode the endpoint may refuse goes without retries: llama_cpp.server refuses
        # json_schema with a 500 that the SDK would retry, with backoff. A transient failure of
        # the probe is then retried with what is left of the client's retries.
        retries = self._client.max_retries
        self._probe_client = self._client.with_options(max_retries=0) if retries else None
        self._retry_client = self._client.with_options(max_retries=max(retries - 1, 0))
        self._base_url = _key_url(str(self._client.base_url))
        self._endpoint = _redact_url(self._base_url + "/chat/completions")

    def complete(self, request: CompletionRequest) -> Completion:
        try:
            if request.json_schema is None:
                response = self._create(self._client, _text_kwargs(request))
                return _completion(response, request, tool_call=False)
            return self._complete_structured(request, request.json_schema)
        except openai.APIStatusError as exc:
            raise self._status_error(exc, request.model) from exc
        except openai.APITimeoutError as exc:
            raise BackendError(f"timed out waiting for {self._endpoint}") from exc
        except openai.APIConnectionError as exc:
            raise BackendError(f"cannot reach {self._endpoint}: {self._redact(str(exc))}") from exc

    def _complete_structured(
        self, request: CompletionRequest, schema: dict[str, Any]
    ) -> Completion:
        key = (self._base_url, request.model)
        known = _MODE_MEMORY.get(key)
        order = MODES if known is None else (known, *(mode for mode in MODES if mode != known))
        last: openai.APIStatusError | None = None
        for mode in order:
            try:
                response = self._attempt(_mode_kwargs(mode, request, schema), probe=mode != known)
            except openai.APIStatusError as exc:
                if not _refuses_mode(exc):
                    raise
                last = exc
                continue
            _MODE_MEMORY.set(key, mode)
            return _completion(response, request, tool_call=mode == "tools")
        assert last is not None
        raise BackendError(
            f"{self._endpoint} refused every structured output mode for model "
            f"{request.model!r} (tried {', '.join(order)}); last error: "
            f"{last.status_code}: {self._redact(_error_text(last))}"
        ) from last

    def _attempt(self, kwargs: dict[str, Any], *, probe: bool) -> ChatCompletion:
        """One mode's request. A probe goes without retries, then retries a transient failure."""
        if not probe or self._probe_client is None:
            return self._create(self._client, kwargs)
        try:
            return self._create(self._probe_client, kwargs)
        except openai.APIStatusError as exc:
            if _refuses_mode(exc) or not _is_transient(exc):
                raise
        except openai.APITimeoutError:
            raise
        except openai.APIConnectionError:
            pass
        return self._create(self._retry_client, kwargs)

    @staticmethod
    def _create(client: openai.OpenAI, kwargs: dict[str, Any]) -> ChatCompletion:
        response: ChatCompletion = client.chat.completions.create(**kwargs)
        return response

    def _status_error(self, exc: openai.APIStatusError, model: str) -> JobFailedError:
        text = self._redact(_error_text(exc))
        if _is_context_error(exc):
            return PromptTooLongError(f"prompt too long for {model!r} at {self._endpoint}: {text}")
        return BackendError(f"{exc.status_code} from {self._endpoint}: {text}")

    def _redact(self, text: str) -> str:
        key = self._client.api_key
        if key and key != PLACEHOLDER_API_KEY:
            text = text.replace(key, "***")
        return text


# -- the shared client ------------------------------------------------------------------------

_client_lock = threading.Lock()
_client: openai.OpenAI | None = None


def shared_client(settings: Settings) -> openai.OpenAI:
    """The process's one SDK client, built on first use from the environment and ``settings``."""
    global _client
    with _client_lock:
        if _client is None:
            _client = openai.OpenAI(
                api_key=os.environ.get("OPENAI_API_KEY") or PLACEHOLDER_API_KEY,
                base_url=os.environ.get("OPENAI_BASE_URL") or None,
                timeout=settings.openai_timeout_s,
                max_retries=settings.openai_max_retries,
            )
        return _client


# -- remembered modes -------------------------------------------------------------------------


class _ModeMemory:
    """Which structured output mode each ``(base_url, model)`` accepted. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._modes: dict[tuple[str, str], Mode] = {}

    def get(self, key: tuple[str, str]) -> Mode | None:
        with self._lock:
            return self._modes.get(key)

    def set(self, key: tuple[str, str], mode: Mode) -> None:
        with self._lock:
            self._modes[key] = mode

    def clear(self) -> None:
        with self._lock:
            self._modes.clear()


_MODE_MEMORY = _ModeMemory()


def remembered_mode(base_url: str, model: str) -> Mode | None:
    """The structured output mode this process settled on for ``model`` at ``base_url``."""
    return _MODE_MEMORY.get((_key_url(base_url), model))


def forget_modes() -> None:
    """Forget every remembered mode (for tests, or after the endpoint changed)."""
    _MODE_MEMORY.clear()


# -- requests ---------------------------------------------------------------------------------


def _text_kwargs(request: CompletionRequest) -> dict[str, Any]:
    return {
        "model": request.model,
        "messages": [_message(message) for message in request.messages],
        **_genconf_kwargs(request.genconf),
    }


def _genconf_kwargs(genconf: GenConf) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "max_tokens": genconf.max_tokens,
        "temperature": genconf.temperature,
        "top_p": genconf.top_p,
    }
    if genconf.stop:
        kwargs["stop"] = list(genconf.stop)
    if genconf.seed is not None:
        kwargs["seed"] = genconf.seed
    return kwargs


def _message(message: Message) -> dict[str, str]:
    return {"role": message.role, "content": message.content}


def _mode_kwargs(mode: Mode, request: CompletionRequest, schema: dict[str, Any]) -> dict[str, Any]:
    kwargs = _text_kwargs(request)
    if mode == "json_schema":
        kwargs["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": _OUTPUT_NAME, "schema": schema, "strict": False},
        }
    elif mode == "tools":
        kwargs["tools"] = [
            {"type": "function", "function": {"name": _OUTPUT_NAME, "parameters": schema}}
        ]
        kwargs["tool_choice"] = {"type": "function", "function": {"name": _OUTPUT_NAME}}
    else:
        kwargs["response_format"] = {"type": "json_object", "schema": schema}
        kwargs["messages"] = _with_schema_instruction(kwargs["messages"], schema)
    return kwargs


def _with_schema_instruction(
    messages: list[dict[str, str]], schema: dict[str, Any]
) -> list[dict[str, str]]:
    instruction = _SCHEMA_INSTRUCTION.format(schema=json.dumps(schema))
    for index, message in enumerate(messages):
        if message["role"] == "system":
            content = f"{message['content']}\n\n{instruction}"
            return [
                *messages[:index],
                {"role": "system", "content": content},
                *messages[index + 1 :],
            ]
    return [{"role": "system", "content": instruction}, *messages]


# -- responses and errors ---------------------------------------------------------------------


def _completion(
    response: ChatCompletion, request: CompletionRequest, *, tool_call: bool
) -> Completion:
    if not response.choices:
        raise BackendError(f"the endpoint answered {request.model!r} with no choices")
    choice = response.choices[0]
    text = _tool_arguments(choice.message) if tool_call else None
    if text is None:
        text = choice.message.content or ""
    finish_reason = str(choice.finish_reason or "stop")
    usage = response.usage
    return Completion(
        text=text,
        finish_reason="stop" if finish_reason == "tool_calls" else finish_reason,
        usage=Usage(
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
        ),
        model=response.model or request.model,
    )


def _tool_arguments(message: ChatCompletionMessage) -> str | None:
    for call in message.tool_calls or []:
        if call.type == "function":
            return call.function.arguments
    return None


def _error_text(exc: openai.APIStatusError) -> str:
    """The server's own message: ``error.message`` when the body has one."""
    body = exc.body
    if isinstance(body, dict):
        message = body.get("message")
        if isinstance(message, str) and message:
            return message.strip()
    if isinstance(body, str) and body:
        return body.strip()
    return exc.message


def _is_context_error(exc: openai.APIStatusError) -> bool:
    if exc.code == "context_length_exceeded":
        return True
    text = _error_text(exc).lower()
    return any(words in text for words in _CONTEXT_WORDS)


def _refuses_mode(exc: openai.APIStatusError) -> bool:
    """Whether the endpoint refused the request's structured output mode (not the prompt)."""
    if _is_context_error(exc):
        return False
    if exc.status_code in _REFUSAL_STATUSES:
        return True
    text = _error_text(exc).lower()
    return exc.status_code >= 500 and any(word in text for word in _REFUSAL_WORDS)


def _is_transient(exc: openai.APIStatusError) -> bool:
    return exc.status_code in _TRANSIENT_STATUSES or exc.status_code >= 500


def _key_url(base_url: str) -> str:
    return base_url.rstrip("/")


def _redact_url(url: str) -> str:
    """``url`` without any user:password part."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
