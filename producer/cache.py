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

from .constants import cache_key, result_key
from .contract import Envelope, JobSpec, Timings, Usage
from .outcome import result_meta

log = logging.getLogger(__name__)

#: The ``worker`` of an envelope answered from the cache.
CACHE_WORKER = "cache"


def cache_digest(spec: JobSpec) -> str | None:
    """The cache digest of ``spec``, or None when its answer may vary (temperature > 0)."""
    if spec.genconf.temperature != 0:
        return None
    shape = spec.model_dump(mode="json", include={"model", "kind", "messages", "json_schema"})
    shape["genconf"] = spec.genconf.model_dump(mode="json")
    canonical = json.dumps(shape, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def lookup(client: redis.Redis, spec: JobSpec) -> Envelope | None:
    """The cached answer to ``spec``, as this job's envelope; None on a miss. Best effort: an
    unreachable Redis or an unreadable entry is a miss."""
    digest = cache_digest(spec)
    if digest is None:
        return None
    try:
        raw = client.get(cache_key(digest))
        return None if raw is None else _as_hit(Envelope.model_validate_json(raw), spec)
    except (redis.RedisError, ValueError) as exc:
        log.warning("answer cache unavailable (%s): running the job", exc)
        return None


def store(client: redis.Redis, spec: JobSpec, envelope: Envelope, ttl_s: int) -> None:
    """Cache a successful answer. Best effort, like ``lookup``."""
    digest = cache_digest(spec)
    if digest is None or envelope.cached:
        return
    try:
        client.set(cache_key(digest), envelope.model_dump_json(), ex=ttl_s)
    except redis.RedisError as exc:
        log.warning("cannot cache an answer (%s)", exc)


def store_as_result(client: redis.Redis, job_id: str, envelope: Envelope, expires_s: int) -> None:
    """Store ``envelope`` as job ``job_id``'s successful result, the way a worker's Celery
    result backend does (same JSON, same key, announced on the same channel)."""
    meta = result_meta(job_id, "SUCCESS", envelope.encode())
    with client.pipeline(transaction=True) as pipe:
        pipe.set(result_key(job_id), meta, ex=expires_s)
        pipe.publish(result_key(job_id), meta)
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
