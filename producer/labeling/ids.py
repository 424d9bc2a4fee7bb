"""Deterministic job ids: the same row of the same run always maps to the same job.

That is what makes a re-run after a crash skip work already done (or queued) instead of
enqueueing it twice.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from wire.contract import PRODUCER_ONLY_GENCONF, GenConf


def run_fingerprint(
    model: str,
    kind: str,
    template: str,
    json_schema: dict[str, Any] | None,
    genconf: GenConf,
    inst: str | None,
) -> str:
    """A short hash of everything that shapes a row's answer except the row itself."""
    payload = {
        "model": model,
        "kind": kind,
        "template": template,
        "schema": json_schema,
        # Sibila's producer-side fields left out: runs started before they existed resume
        "genconf": genconf.model_dump(mode="json", exclude=set(PRODUCER_ONLY_GENCONF)),
        "inst": inst,
    }
    return _digest(json.dumps(payload, sort_keys=True))[:16]


def row_job_id(fingerprint: str, key: Any, attempt: int = 1) -> str:
    """``label-<run>-<row>``, plus ``-<attempt>`` for retries of failed rows."""
    row = _digest(f"{fingerprint}\0{key_text(key)}")[:32]
    suffix = f"-{attempt}" if attempt > 1 else ""
    return f"label-{fingerprint}-{row}{suffix}"


def key_text(key: Any) -> str:
    """Keys compare as text: a CSV round trip turns the id 7 into "7"."""
    return key if isinstance(key, str) else json.dumps(key)


def schema_digest(json_schema: dict[str, Any] | None) -> str:
    """A JSON schema's SHA-256, independent of key order."""
    return _digest(json.dumps(json_schema, sort_keys=True))


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
