"""One labelled row, as written to the output file."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from wire.contract import Usage


@dataclass(frozen=True)
class LabelResult:
    key: Any
    line: int
    status: str  # "done" or "failed"
    result: Any = None
    error: dict[str, Any] | None = None
    attempts: int = 1
    usage: Usage = field(default_factory=Usage)
    latency_s: float = 0.0
    job_id: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "done"

    def to_record(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "line": self.line,
            "status": self.status,
            "result": self.result,
            "error": self.error,
            "attempts": self.attempts,
            "prompt_tokens": self.usage.prompt_tokens,
            "completion_tokens": self.usage.completion_tokens,
            "latency_s": round(self.latency_s, 4),
            "job_id": self.job_id,
        }
