"""``sibylq worker MODEL``: a Celery worker on MODEL's queue with the right pool for it."""

from __future__ import annotations

import os
from dataclasses import dataclass

from producer.modelref import ModelRef, model_stem, parse_model_ref
from producer.settings import Settings, get_settings


@dataclass(frozen=True)
class PoolDefaults:
    pool: str
    concurrency: int


def pool_defaults(ref: ModelRef, settings: Settings) -> PoolDefaults:
    """APIs are I/O-bound: many threads share one HTTP client. ``Llama`` is not thread-safe
    and fills a core: one job per process, and a process per model copy."""
    if ref.provider == "openai":
        return PoolDefaults("threads", settings.openai_concurrency)
    if ref.provider == "llamacpp":
        return PoolDefaults("prefork", 1)
    return PoolDefaults("threads", 8)


def run_worker(
    model: str,
    *,
    concurrency: int | None = None,
    pool: str | None = None,
    queue: str | None = None,
    loglevel: str = "INFO",
) -> int:
    ref = parse_model_ref(model, any_api_model=True)
    os.environ["SIBYLQ_WORKER_MODEL"] = str(ref)
    get_settings.cache_clear()
    settings = get_settings()
    if ref.provider == "llamacpp":
        from .model_files import resolve_model_path

        resolve_model_path(ref.name, settings)  # fail now, not at the first job
    defaults = pool_defaults(ref, settings)
    from . import default_app

    node = f"sibylq-{ref.provider}-{model_stem(ref.name) or 'any'}-{os.getpid()}@%h"
    default_app().worker_main(
        [
            "worker",
            f"--queues={queue or ref.queue}",
            f"--pool={pool or defaults.pool}",
            f"--concurrency={concurrency or defaults.concurrency}",
            f"--hostname={node}",
            f"--loglevel={loglevel}",
            "--without-gossip",
            "--without-mingle",
        ]
    )
    return 0
