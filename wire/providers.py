"""The remote APIs an OpenAI-compatible worker reaches: the one owner of each one's endpoint, API
key variable and structured output modes.

Sibila names these providers (``groq:``, ``mistral:``, ``together:``, ``fireworks:``,
``anthropic:`` beside ``openai:``); sibylq serves every one of them with the same worker
(``workers.backends.openai_api``), each on its own queue (``sibylq.groq``...), so a fleet can
scale and rate-limit them apart. Anthropic is reached through its OpenAI SDK compatibility
layer, which ignores ``response_format`` (and ``seed``): its structured jobs use a forced tool
call only, whose JSON Anthropic does not constrain to the schema (sibylq validates it and
re-asks, as for every model).

Where a worker finds its endpoint: ``SIBYLQ_<NAME>_BASE_URL`` (``wire.settings``), else the
provider's own variable where there is one (``OPENAI_BASE_URL``, as the SDK reads it;
``GROQ_BASE_URL``, ``TOGETHER_BASE_URL``, ``FIREWORKS_BASE_URL``, as Sibila's model classes
read them), else the provider's public URL.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

from .errors import MissingApiKeyError

StructuredMode = Literal["json_schema", "tools", "json_object"]

#: What a structured job sends, in the order tried until the server accepts one:
#: ``response_format`` ``json_schema``; one forced tool call whose parameters are the schema;
#: ``response_format`` ``json_object`` with the schema (llama_cpp.server's and Together's own
#: ``schema`` key) and the schema in the system message.
ALL_MODES: tuple[StructuredMode, ...] = ("json_schema", "tools", "json_object")

#: Sent when an endpoint that needs no key (a local server) has none: the SDK insists on one.
PLACEHOLDER_API_KEY = "sk-no-key-required"


@dataclass(frozen=True)
class ApiProvider:
    """An OpenAI-compatible chat completions API a ``<name>:<model>`` reference runs on."""

    name: str
    #: The public endpoint, used when no variable overrides it.
    base_url: str
    #: The variable holding the API key.
    key_env: str
    #: The provider's own base URL variable, honoured after ``SIBYLQ_<NAME>_BASE_URL``.
    base_url_env: str | None = None
    #: False for ``openai``, which also stands for local servers that need no key.
    key_required: bool = True
    #: The structured output modes the endpoint honours, in the order tried. A mode left out
    #: is one the endpoint would accept and ignore (so its refusal cannot be detected).
    modes: tuple[StructuredMode, ...] = ALL_MODES
    #: The request field carrying ``GenConf.seed`` (None: the endpoint ignores seeds).
    seed_field: str | None = "seed"
    #: Whether a classification asks for ``logprobs`` (its label probabilities). False where
    #: the API refuses or ignores them.
    logprobs: bool = True
    #: What differs from OpenAI, for the docs and for whoever reads this table.
    notes: str = ""

    @property
    def settings_env(self) -> str:
        """``SIBYLQ_<NAME>_BASE_URL``: sibylq's own override of the endpoint."""
        return f"SIBYLQ_{self.name.upper()}_BASE_URL"

    def api_key(self, environ: Mapping[str, str] = os.environ) -> str:
        """The key from ``key_env``; raises MissingApiKeyError when it is unset and needed."""
        key = environ.get(self.key_env, "").strip()
        if key:
            return key
        if self.key_required:
            raise MissingApiKeyError(self.name, self.key_env)
        return PLACEHOLDER_API_KEY


_PROVIDERS = (
    ApiProvider(
        name="openai",
        base_url="https://api.openai.com/v1",
        key_env="OPENAI_API_KEY",
        base_url_env="OPENAI_BASE_URL",
        key_required=False,
        notes="Any OpenAI-compatible server (vLLM, llama.cpp's server...) with OPENAI_BASE_URL.",
    ),
    ApiProvider(
        name="groq",
        base_url="https://api.groq.com/openai/v1",
        key_env="GROQ_API_KEY",
        base_url_env="GROQ_BASE_URL",
        logprobs=False,
        notes="json_schema on the models Groq lists for structured outputs; the others refuse "
        "it with a 400 and use a tool call. No logprobs (a 400): no label probabilities.",
    ),
    ApiProvider(
        name="mistral",
        base_url="https://api.mistral.ai/v1",
        key_env="MISTRAL_API_KEY",
        seed_field="random_seed",
        logprobs=False,
        notes="The seed is sent as Mistral's random_seed. No logprobs: no label probabilities.",
    ),
    ApiProvider(
        name="together",
        base_url="https://api.together.xyz/v1",
        key_env="TOGETHER_API_KEY",
        base_url_env="TOGETHER_BASE_URL",
        notes="Structured outputs on the models Together lists for JSON mode.",
    ),
    ApiProvider(
        name="fireworks",
        base_url="https://api.fireworks.ai/inference/v1",
        key_env="FIREWORKS_API_KEY",
        base_url_env="FIREWORKS_BASE_URL",
        notes="Model names are paths: fireworks:accounts/fireworks/models/<model>.",
    ),
    ApiProvider(
        name="anthropic",
        base_url="https://api.anthropic.com/v1",
        key_env="ANTHROPIC_API_KEY",
        modes=("tools",),
        seed_field=None,
        logprobs=False,
        notes="Anthropic's OpenAI SDK compatibility layer: response_format, seed and a tool's "
        "strict are ignored (a structured job uses a forced tool call, not constrained to the "
        "schema: sibylq validates and re-asks); temperature is capped at 1; system messages "
        "are hoisted into one. No logprobs: no label probabilities.",
    ),
)

#: Every API provider by name, ``openai`` first.
API_PROVIDERS: Mapping[str, ApiProvider] = MappingProxyType({p.name: p for p in _PROVIDERS})


def api_provider(name: str) -> ApiProvider | None:
    """The API provider called ``name``; None for a local one (``llamacpp``, ``fake``)."""
    return API_PROVIDERS.get(name)


def api_key_variables() -> tuple[str, ...]:
    """Every variable an API key may be in: what a process must never write out."""
    return tuple(provider.key_env for provider in _PROVIDERS)
