"""The API backend: any OpenAI-compatible chat completions endpoint, through the SDK.

It serves every API provider of ``wire.providers`` (``openai``, ``groq``, ``mistral``,
``together``, ``fireworks``, ``anthropic``): the provider gives the endpoint (overridable,
``Settings.base_url``), the variable holding the key (``OPENAI_API_KEY``, ``GROQ_API_KEY``...;
``openai`` also stands for local servers, which need none, so a placeholder is sent when it is
unset), the structured output modes to try and the name of the seed field. One SDK client per
provider is shared by every job in the process: the worker runs them on a pool of threads, and
the client is thread-safe.

Structured jobs need the server to constrain its output, and servers differ in how they offer
that. The provider's modes (all three but for Anthropic, which ignores ``response_format``: a
forced tool call only) are tried in order until one is accepted:

1. ``json_schema``: ``response_format={"type": "json_schema", ...}`` (OpenAI, vLLM, llama.cpp's
   own server...).
2. ``tools``: one forced function call named ``output`` whose parameters are the schema; the
   answer is the call's arguments.
3. ``json_object``: ``response_format={"type": "json_object", "schema": ...}``; the ``schema``
   key is not OpenAI's but llama_cpp.server honours it. The schema also goes into the system
   message, so a server that ignores the key still gets asked for the right JSON.

A mode counts as refused when the server answers 400 or 422, or 500 with an error that names
``response_format``, ``json_schema`` or ``tool`` (llama_cpp.server answers ``json_schema`` that
way). A context-length error is never a refusal. The backend remembers the mode that worked
for each model, so later jobs of the worker go straight to it.

Every request first takes its place in the fleet-wide rate limiter (``workers.ratelimit``):
the limits of ``SIBYLQ_RATE_LIMITS`` and any pause a 429 imposed, shared through Redis by all
workers using the same endpoint, API key and model. A 429, a timeout, a connection error or a
5xx raises ``RetryLater`` with the delay the server named (``retry_after``): the job is parked
and retried by sibylq, never by the SDK (its retries are off). A 429 also pauses everyone
sharing the scope until then. Other errors (400, 401, 404, a prompt too long, an exhausted
quota) fail at once.

A job's time limit bounds each run on a worker: a request's timeout is at most the time left,
a request cut short by it fails the job with ``JobTimeLimitError``, and a turn in the rate
limiter further away than that is waited for parked in Redis.
"""

from __future__ import annotations

import json
import math
import threading
import time
from typing import Any, Generic, TypeVar

import httpx2
import openai
from openai.types.chat import ChatCompletion, ChatCompletionMessage
from openai.types.chat.chat_completion import Choice

from wire.contract import GenConf, Message, Usage
from wire.errors import BackendError, JobFailedError, PromptTooLongError
from wire.providers import API_PROVIDERS, ApiProvider, StructuredMode
from wire.redact import redact, redact_url
from wire.settings import RateLimit, Settings

from ..label_probs import ChoiceProbe, choice_labels
from ..ratelimit import BYTES_PER_TOKEN, RateLimiter, estimate_tokens, scope_for
from ..store import result_redis
from .base import (
    Completion,
    CompletionRequest,
    Deadline,
    ModelContext,
    RetryLater,
    TokenCount,
    with_schema_instruction,
)
from .context_lengths import known_context
from .retry_after import server_delay_s
from .whole_timeout import WholeRequestTimeout

Mode = StructuredMode
T = TypeVar("T")

#: The ``openai`` provider: OpenAI, or any OpenAI-compatible server at ``OPENAI_BASE_URL``.
OPENAI = API_PROVIDERS["openai"]

_OUTPUT_NAME = "output"
_REFUSAL_STATUSES = frozenset({400, 422})
_REFUSAL_WORDS = ("response_format", "json_schema", "tool", "logprob")
_CONTEXT_WORDS = ("maximum context length", "context window", "context length")
_TRANSIENT_STATUSES = frozenset({408, 409, 429})
_QUOTA_CODES = frozenset({"insufficient_quota", "billing_hard_limit_reached"})


class OpenAIBackend:
    """Runs completions against an OpenAI-compatible endpoint."""

    def __init__(
        self,
        settings: Settings,
        client: openai.OpenAI | None = None,
        limiter: RateLimiter | None = None,
        provider: ApiProvider = OPENAI,
    ) -> None:
        self._settings = settings
        self._provider = provider
        self._client = client if client is not None else build_client(settings, provider)
        self._limiter = limiter if limiter is not None else RateLimiter(result_redis(settings))
        self._base_url = _key_url(str(self._client.base_url))
        self._endpoint = redact_url(self._base_url + "/chat/completions")
        self._modes = _PerModel[Mode]()
        self._logprobs = _PerModel[bool]()

    def complete(self, request: CompletionRequest) -> Completion:
        try:
            if request.json_schema is None:
                kwargs = _text_kwargs(request, self._provider)
                response = self._send(request, kwargs, structured=False)
                return _completion(response, request, tool_call=False)
            return self._complete_structured(request, request.json_schema)
        except openai.APIStatusError as exc:
            raise self._status_error(exc, request.model) from exc

    def remembered_mode(self, model: str) -> Mode | None:
        """The structured output mode this backend settled on for ``model``."""
        return self._modes.get(model)

    def context(self, model: str) -> ModelContext:
        """A well-known model's context (``context_lengths``); others: unknown."""
        return known_context(model)

    def count_tokens(self, request: CompletionRequest) -> TokenCount:
        """An estimate, never exact: no tokenizer for a remote model here (tiktoken is not a
        dependency, and servers have no counting endpoint). It leans high, as the rate
        limiter's does: about four bytes a token, per-message overhead, and the schema."""
        schema = request.json_schema
        extra = 0 if schema is None else math.ceil(len(json.dumps(schema)) / BYTES_PER_TOKEN)
        return TokenCount(estimate_tokens(request.messages, 0) + extra, exact=False)

    def _complete_structured(
        self, request: CompletionRequest, schema: dict[str, Any]
    ) -> Completion:
        known, modes = self._modes.get(request.model), self._provider.modes
        order = modes if known is None else (known, *(mode for mode in modes if mode != known))
        last: openai.APIStatusError | None = None
        for mode in order:
            try:
                kwargs = _mode_kwargs(mode, request, schema, self._provider)
                response = self._send_asking_logprobs(request, kwargs, mode)
            except openai.APIStatusError as exc:
                if not _refuses_mode(exc):
                    raise
                last = exc
                continue
            self._modes.set(request.model, mode)
            return _completion(response, request, tool_call=mode == "tools")
        assert last is not None
        raise BackendError(
            f"{self._endpoint} refused every structured output mode for model "
            f"{request.model!r} (tried {', '.join(order)}); last error: "
            f"{last.status_code}: {self._redact(_error_text(last))}"
        ) from last

    def _send_asking_logprobs(
        self, request: CompletionRequest, kwargs: dict[str, Any], mode: Mode
    ) -> ChatCompletion:
        """A structured request; a classification's asks for the answer's ``logprobs`` too
        (its label probabilities), where the provider offers them and the endpoint did not
        refuse them before. A refusal that names them (a 400, 422 or 500: Groq answers 400) is
        remembered and the request sent again without."""
        asks = (
            mode != "tools"  # logprobs cover message content, not a tool call's arguments
            and self._provider.logprobs
            and choice_labels(request.json_schema) is not None
            and self._logprobs.get(request.model) is not False
        )
        if not asks:
            return self._send(request, kwargs, structured=True)
        try:
            return self._send(request, {**kwargs, **_LOGPROBS}, structured=True)
        except openai.APIStatusError as exc:
            if "logprob" not in _error_text(exc).lower():
                raise
            self._logprobs.set(request.model, False)
            return self._send(request, kwargs, structured=True)

    def _send(
        self, request: CompletionRequest, kwargs: dict[str, Any], *, structured: bool
    ) -> ChatCompletion:
        """One HTTP request, paced by the fleet's rate limiter. A failure that may pass raises
        ``RetryLater``; a refused structured output mode or a permanent error propagates."""
        scope = scope_for(self._base_url, self._client.api_key, request.model)
        limits = self._limits(request.model)
        estimate = estimate_tokens(request.messages, max(request.genconf.max_tokens, 0))
        deadline = request.deadline
        self._take_turn(scope, request.model, limits, estimate, deadline)
        timeout = self._settings.openai_timeout_s
        if deadline is not None:
            if deadline.remaining_s() <= 0:  # the turn came too late
                self._limiter.reconcile(scope, limits, estimate, 0)
                raise deadline.error()
            timeout = min(timeout, deadline.remaining_s())
            kwargs = {**kwargs, "timeout": timeout}
        try:
            response: ChatCompletion = self._client.chat.completions.create(**kwargs)
        except openai.APIStatusError as exc:
            self._limiter.reconcile(scope, limits, estimate, 0)  # refused: no tokens used
            permanent = not _is_transient(exc) or _is_quota_error(exc)
            if permanent or (structured and _refuses_mode(exc)):
                raise
            raise self._retry_later(exc, scope) from exc
        except openai.APITimeoutError as exc:
            if deadline is not None and timeout < self._settings.openai_timeout_s:
                raise deadline.error() from exc  # cut short by the job's time limit: final
            raise RetryLater(f"no answer from {self._endpoint} within {timeout:g} s") from exc
        except openai.APIConnectionError as exc:
            reason = f"cannot reach {self._endpoint}: {self._redact(str(exc))}"
            raise RetryLater(reason) from exc
        except ValueError as exc:  # a body that is not JSON, or not UTF-8: a proxy's, garbled
            self._limiter.reconcile(scope, limits, estimate, 0)
            raise self._not_a_completion(type(exc).__name__) from exc
        if not isinstance(response, ChatCompletion):  # the SDK hands back other bodies as text
            self._limiter.reconcile(scope, limits, estimate, 0)
            raise self._not_a_completion(f"a {type(response).__name__}")
        used = _count(getattr(response.usage, "total_tokens", None)) or estimate
        self._limiter.reconcile(scope, limits, estimate, used)
        return response

    def _not_a_completion(self, what: str) -> RetryLater:
        return RetryLater(f"{self._endpoint} answered with a body that is no chat completion "
                          f"({what}): as transient as a reset connection")  # fmt: skip

    def _take_turn(
        self, scope: str, model: str, limits: RateLimit, tokens: int, deadline: Deadline | None
    ) -> None:
        """Wait for this request's turn in the fleet's limits, or park the job if it is far
        (or past the job's time limit: a parked job's next run has its own)."""
        max_wait_s = self._settings.rate_limit_max_wait_s
        if deadline is not None:
            max_wait_s = max(0.0, min(max_wait_s, deadline.remaining_s()))
        grant = self._limiter.acquire(scope, limits, tokens, max_wait_s=max_wait_s)
        if not grant.reserved:
            reason = f"waiting for the rate limit (or a 429 pause) of {model!r}"
            raise RetryLater(reason, delay_s=grant.wait_s, counts=False)
        if grant.wait_s > 0:
            time.sleep(grant.wait_s)

    def _retry_later(self, exc: openai.APIStatusError, scope: str) -> RetryLater:
        delay = server_delay_s(exc.response.headers)
        reason = f"{exc.status_code} from {self._endpoint}: {self._redact(_error_text(exc))}"
        if exc.status_code == 429:
            # Everyone sharing this key and model waits, not just this job.
            pause_s = delay if delay is not None else self._settings.retry_backoff_s
            self._limiter.pause(scope, pause_s)
        return RetryLater(reason, delay_s=delay)

    def _limits(self, model: str) -> RateLimit:
        limits = self._settings.rate_limits
        return limits.get(model) or limits.get("*") or _NO_LIMITS

    def _status_error(self, exc: openai.APIStatusError, model: str) -> JobFailedError:
        text = self._redact(_error_text(exc))
        if _is_context_error(exc):
            return PromptTooLongError(f"prompt too long for {model!r} at {self._endpoint}: {text}")
        if _is_quota_error(exc):
            return BackendError(
                f"the API key's quota is used up at {self._endpoint} ({exc.status_code}): {text}"
            )
        return BackendError(f"{exc.status_code} from {self._endpoint}: {text}")

    def _redact(self, text: str) -> str:
        return redact(text, (self._client.api_key,))


_NO_LIMITS = RateLimit()
#: The SDK's own connection pool (``openai.DefaultHttpxClient``'s): many threads, one client.
HTTP_LIMITS = httpx2.Limits(max_connections=1000, max_keepalive_connections=100)
#: What a classification asks for beside its answer: the most alternatives OpenAI gives.
_LOGPROBS = {"logprobs": True, "top_logprobs": 20}


# -- what a backend owns ------------------------------------------------------------------------


def build_client(settings: Settings, provider: ApiProvider = OPENAI) -> openai.OpenAI:
    """An SDK client for ``provider``, from ``settings`` and the environment (its key
    variable, its base URL variables). A worker builds one per provider: its backend, shared by
    every job of the process (``workers.task.Backends``); the client is thread-safe."""
    return openai.OpenAI(
        api_key=provider.api_key(),  # MissingApiKeyError for a hosted API
        base_url=settings.base_url(provider),
        timeout=settings.openai_timeout_s,
        max_retries=0,  # sibylq retries, fleet-wide (see the module docstring)
        http_client=http_client(),
    )


def http_client() -> httpx2.Client:
    """The SDK's own HTTP client settings, each request bounded whole by its timeout (a
    body sent a byte at a time too: ``whole_timeout``)."""
    transport = httpx2.HTTPTransport(limits=HTTP_LIMITS)
    return openai.DefaultHttpxClient(transport=WholeRequestTimeout(transport))


class _PerModel(Generic[T]):
    """What a backend's endpoint taught it about each model (the structured output mode it
    accepted, whether it gives logprobs). Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._known: dict[str, T] = {}

    def get(self, model: str) -> T | None:
        with self._lock:
            return self._known.get(model)

    def set(self, model: str, value: T) -> None:
        with self._lock:
            self._known[model] = value


# -- requests ---------------------------------------------------------------------------------


def _text_kwargs(request: CompletionRequest, provider: ApiProvider) -> dict[str, Any]:
    return {
        "model": request.model,
        "messages": [_message(message) for message in request.messages],
        **_genconf_kwargs(request.genconf, provider),
    }


def _genconf_kwargs(genconf: GenConf, provider: ApiProvider) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"temperature": genconf.temperature, "top_p": genconf.top_p}
    if genconf.max_tokens > 0:  # 0: unresolved for a model of unknown context (budget)
        kwargs["max_tokens"] = genconf.max_tokens
    if genconf.stop:
        kwargs["stop"] = list(genconf.stop)
    if genconf.seed is not None and provider.seed_field == "seed":
        kwargs["seed"] = genconf.seed
    elif genconf.seed is not None and provider.seed_field is not None:  # not the SDK's name
        kwargs["extra_body"] = {provider.seed_field: genconf.seed}
    return kwargs


def _message(message: Message) -> dict[str, Any]:
    """The message as OpenAI takes it: a string content, or content parts (text, image_url)."""
    return message.model_dump(mode="json", exclude_none=True)


def _mode_kwargs(
    mode: Mode, request: CompletionRequest, schema: dict[str, Any], provider: ApiProvider
) -> dict[str, Any]:
    kwargs = _text_kwargs(request, provider)
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
        kwargs["messages"] = with_schema_instruction(kwargs["messages"], schema)
    return kwargs


# -- responses and errors ---------------------------------------------------------------------


def _completion(
    response: ChatCompletion, request: CompletionRequest, *, tool_call: bool
) -> Completion:
    if not response.choices:
        raise BackendError(f"the endpoint answered {request.model!r} with no choices")
    choice = response.choices[0]
    if choice.message is None:
        raise BackendError(f"the endpoint answered {request.model!r} with no message")
    text = _tool_arguments(choice.message) if tool_call else None
    if text is None:
        text = choice.message.content or ""
    finish_reason = str(choice.finish_reason or "stop")
    usage = response.usage
    return Completion(
        text=text,
        label_probs=None if tool_call else _label_probs(choice, request, text),
        finish_reason="stop" if finish_reason == "tool_calls" else finish_reason,
        usage=Usage(
            prompt_tokens=_count(getattr(usage, "prompt_tokens", None)),
            completion_tokens=_count(getattr(usage, "completion_tokens", None)),
        ),
        model=response.model or request.model,
    )


def _count(value: Any) -> int:
    """A token count the endpoint reported; 0 when it reported none (or nonsense)."""
    return value if isinstance(value, int) and value >= 0 else 0


def _label_probs(choice: Choice, request: CompletionRequest, text: str) -> dict[str, float] | None:
    """A classification's label probabilities from the answer's ``logprobs``: each token and
    its ``top_logprobs`` alternatives (labels outside them count as improbable). None when
    the server gave none, or no alternatives where the choice was made (never an error: the
    answer itself is fine)."""
    labels = choice_labels(request.json_schema)
    tokens = choice.logprobs.content if choice.logprobs is not None else None
    if labels is None or not tokens:
        return None
    probe, written = ChoiceProbe(labels), ""
    for token in tokens:
        if probe.wants(written):
            alternatives = [(one.token, one.logprob) for one in token.top_logprobs or ()]
            if not alternatives:
                return None
            probe.observe(written, alternatives)
        written += token.token or ""
    return probe.result(text)


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


def _is_quota_error(exc: openai.APIStatusError) -> bool:
    """A 429 that waiting won't cure: the account's quota or billing limit is used up."""
    return exc.code in _QUOTA_CODES


def _key_url(base_url: str) -> str:
    return base_url.rstrip("/")
