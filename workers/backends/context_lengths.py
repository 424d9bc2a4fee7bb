"""Context lengths of well-known OpenAI models: an OpenAI-compatible server does not say them.

The figures are OpenAI's published ones (context window, most output tokens a request may ask
for). A model not listed has an unknown context: ``max_tokens`` 0 or negative then sends no
``max_tokens`` at all (the server's own limit applies), unless the caller gave ``ctx_len`` in
``Models.create``. A name matches its longest listed prefix, so dated snapshots
(``gpt-4o-2024-08-06``) count as their family.
"""

from __future__ import annotations

from .base import ModelContext

KNOWN_CONTEXTS: dict[str, ModelContext] = {
    "gpt-4.1": ModelContext(1_047_576, 32_768),
    "gpt-4o": ModelContext(128_000, 16_384),
    "gpt-4o-mini": ModelContext(128_000, 16_384),
    "gpt-4-turbo": ModelContext(128_000, 4_096),
    "gpt-4-32k": ModelContext(32_768),
    "gpt-4": ModelContext(8_192),
    "gpt-3.5-turbo": ModelContext(16_385, 4_096),
}

UNKNOWN = ModelContext(ctx_len=None)


def known_context(model: str) -> ModelContext:
    """The listed context of ``model`` (its longest matching prefix), else ``UNKNOWN``."""
    matches = [name for name in KNOWN_CONTEXTS if model == name or model.startswith(name + "-")]
    return KNOWN_CONTEXTS[max(matches, key=len)] if matches else UNKNOWN
