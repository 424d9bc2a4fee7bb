"""One module per backend behind the ``Backend`` protocol; imported only when used."""

from __future__ import annotations

from wire.errors import UnknownModelError
from wire.providers import api_provider
from wire.settings import Settings

from .base import (
    Backend,
    Completion,
    CompletionRequest,
    Deadline,
    Measuring,
    ModelContext,
    RetryLater,
    TokenCount,
)


def create_backend(provider: str, settings: Settings) -> Backend:
    """The backend for ``provider``. Heavy SDKs are imported here, never at worker start."""
    if provider == "fake":
        from .fake import FakeBackend

        return FakeBackend()
    api = api_provider(provider)
    if api is not None:  # openai, groq, mistral, together, fireworks, anthropic
        from .openai_api import OpenAIBackend

        return OpenAIBackend(settings, provider=api)
    if provider == "llamacpp":
        from .llamacpp import LlamaCppBackend

        return LlamaCppBackend(settings)
    raise UnknownModelError(f"no backend for provider {provider!r}")


__all__ = [
    "Backend",
    "Completion",
    "CompletionRequest",
    "Deadline",
    "Measuring",
    "ModelContext",
    "RetryLater",
    "TokenCount",
    "create_backend",
]
