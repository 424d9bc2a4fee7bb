"""Answers to identical requests, cached in Redis and shared by every producer and worker.

Only deterministic requests are cached: temperature 0. The key is a digest of everything that
shapes the answer (model, kind, messages, schema, generation settings), never the job id or
its timestamps. A hit is answered without a model call: by the producer before enqueueing, or
by a worker for a duplicate that was enqueued before the first answer was stored. Failures are
never cached.
"""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import UTC, datetime

import redis

from .constants import cache_key
from .contract import (
    ADDED_SPEC_FIELDS,
    PRODUCER_ONLY_GENCONF,
    Envelope,
    JobKind,
    JobSpec,
    Timings,
    Usage,
)
from .outcome import stage_success

log = logging.getLogger(__name__)

#: The ``worker`` of an envelope answered from the cache.
CACHE_WORKER = "cache"


def cache_digest(spec: JobSpec) -> str | None:
    """The cache digest of ``spec``, or None when its answer may vary (temperature > 0)."""
    if spec.genconf.temperature != 0 or spec.kind == JobKind.INFO:  # facts: the worker's own
        return None
    shape = spec.model_dump(mode="json", include={"model", "kind", "messages", "json_schema"})
    shape["genconf"] = spec.genconf.model_dump(mode="json", exclude=set(PRODUCER_ONLY_GENCONF))
    for name in ADDED_SPEC_FIELDS:  # absent while unset: digests of earlier jobs still match
        if getattr(spec, name) is not None:
            shape[name] = getattr(spec, name)
    canonical = json.dumps(shape, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def entry_key(spec: JobSpec) -> str | None:
    """The Redis key of ``spec``'s cache entry; None when its answer is never cached."""
    digest = cache_digest(spec)
    return None if digest is None else cache_key(digest)


def lookup(client: redis.Redis, spec: JobSpec) -> Envelope | None:
    """The cached answer to ``spec``, as this job's envelope; None on a miss. Best effort: an
    unreachable Redis or an unreadable entry is a miss."""
    key = entry_key(spec)
    if key is None:
        return None
    try:
        raw = client.get(key)
    except redis.RedisError as exc:
        log.warning("answer cache unavailable (%s): running the job", exc)
        return None
    return None if raw is None else decode_hit(raw, spec)


def decode_hit(raw: bytes | str, spec: JobSpec) -> Envelope | None:
    """A cache entry as the answer to ``spec``; None (a miss) if it cannot be read."""
    try:
        return _as_hit(Envelope.model_validate_json(raw), spec)
    except ValueError as exc:
        log.warning("unreadable answer cache entry (%s): running the job", exc)
        return None


def entry(spec: JobSpec, envelope: Envelope) -> tuple[str, str] | None:
    """The cache entry (key, value) of a successful answer to ``spec``; None for an uncacheable
    request or an answer that came from the cache."""
    key = entry_key(spec)
    if key is None or envelope.cached:
        return None
    return key, json.dumps(envelope.encode())  # as results are stored: fields added unset stay out


def store_as_result(client: redis.Redis, job_id: str, envelope: Envelope, expires_s: int) -> None:
    """Store ``envelope`` as job ``job_id``'s successful result, the way a worker does (same
    JSON, same key, announced on the same channel)."""
    with client.pipeline(transaction=True) as pipe:
        stage_success(pipe, job_id, envelope.encode(), expires_s)
        pipe.execute()


def _as_hit(cached: Envelope, spec: JobSpec) -> Envelope:
    now = datetime.now(UTC)
    return cached.model_copy(
        update={
            "usage": Usage(),
            "attempts": 0,
            "cached": True,
            "worker": CACHE_WORKER,
            "timings": Timings(created_at=spec.created_at, started_at=now, finished_at=now),
        }
    )
