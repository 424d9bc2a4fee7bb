"""The one interface every backend implements: a completion request in, a completion out."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from producer.contract import GenConf, Message, Usage


@dataclass(frozen=True)
class CompletionRequest:
    model: str
    messages: tuple[Message, ...]
    json_schema: dict[str, Any] | None
    genconf: GenConf
    options: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str
    usage: Usage
    model: str


class Backend(Protocol):
    """Runs one completion. Raises producer.errors.JobFailedError subclasses on failure."""

    def complete(self, request: CompletionRequest) -> Completion: ...
