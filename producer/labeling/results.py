"""One labelled row, as written to the output file, and a row a re-run skips."""

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
    #: Model calls made for the row's job (validation re-asks and retried requests included);
    #: 0 when no job ran (a malformed row).
    attempts: int = 0
    #: How many ``--retry-failed`` runs re-ran this row (0 on its first run).
    retries: int = 0
    usage: Usage = field(default_factory=Usage)
    #: Seconds from enqueueing the row's job to its outcome.
    latency_s: float = 0.0
    job_id: str | None = None
    #: A classification's probability of each label (``Envelope.label_probs``), where the
    #: model's backend could read them.
    label_probs: dict[str, float] | None = None

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
            "retries": self.retries,
            "prompt_tokens": self.usage.prompt_tokens,
            "completion_tokens": self.usage.completion_tokens,
            "latency_s": round(self.latency_s, 4),
            "job_id": self.job_id,
            "label_probs": _rounded(self.label_probs),
        }


def _rounded(probs: dict[str, float] | None) -> dict[str, float] | None:
    return None if probs is None else {label: round(p, 4) for label, p in probs.items()}


@dataclass(frozen=True)
class Skipped:
    """A row the output already holds, so this run leaves it alone. ``failed``: it holds the
    row as failed (``--retry-failed`` would re-run it)."""

    key: Any
    failed: bool = False


@dataclass
class Previous:
    """What the output already holds: done keys, and failed keys with their retries so far
    (keys as ``key_text`` gives them); and the keys an interrupted ``--retry-failed`` run was
    retrying, absent from the output, with the retries of their jobs in flight
    (``retrying.py``)."""

    done: set[str] = field(default_factory=set)
    failed: dict[str, int] = field(default_factory=dict)
    retrying: dict[str, int] = field(default_factory=dict)
