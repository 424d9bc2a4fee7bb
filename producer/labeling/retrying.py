"""The retries a ``--retry-failed`` run has in flight: ``OUT.retrying.json``, next to ``OUT``.

Such a run drops the failed rows from ``OUT`` at its first write, then re-runs them under the
job id of their next attempt. Interrupted before their results are written, those rows would
be in ``OUT`` neither done nor failed, and the next run would label them afresh (attempt 1,
work paid twice, the count of retries lost). This file keeps each such row's key and its
retries; the next run, with or without ``--retry-failed``, attaches to the same jobs, and a
run that ends removes it (every row is in ``OUT`` then).
"""

from __future__ import annotations

import json
from pathlib import Path

from .manifest import write_atomically

RETRYING_SUFFIX = ".retrying.json"


def retrying_path(output: Path) -> Path:
    return output.with_name(output.name + RETRYING_SUFFIX)


def load(output: Path) -> dict[str, int]:
    """The rows' keys (``key_text``) and retries in flight; none when the file is missing
    or unreadable (a torn write cannot happen: it is replaced whole)."""
    try:
        pending = json.loads(retrying_path(output).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(pending, dict):
        return {}
    return {key: n for key, n in pending.items() if isinstance(n, int) and n >= 0}


def save(output: Path, pending: dict[str, int]) -> None:
    write_atomically(retrying_path(output), json.dumps(pending, ensure_ascii=False))


def remove(output: Path) -> None:
    retrying_path(output).unlink(missing_ok=True)
