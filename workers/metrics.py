"""Prometheus metrics of a worker, served on ``SIBYLQ_METRICS_PORT`` (unset: none at all).

Jobs run in the pool's processes (prefork children, or threads of the worker itself), so the
counts use prometheus_client's multiprocess mode, whatever the pool:

- ``prepare`` (Celery's ``worker_init``, in the worker's main process, before the pool
  forks) points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh temporary directory. Every process
  then writes its samples to its own memory-mapped files there.
- ``WorkerMetrics.serve`` (``worker_ready``, main process) serves ``/metrics`` from a registry
  holding a ``MultiProcessCollector`` (the sum over every pool process, dead ones included:
  counts survive a child that was replaced) and ``WorkerCollector``, which reads what only
  the main process knows at scrape time: the queues' depth in Redis (short timeouts; a scrape
  never fails because Redis is down), the jobs running now and the pool's size.
- ``process_exited`` (``worker_process_shutdown``, in a prefork child as it exits) does the
  library's bookkeeping for a dead process (``mark_process_dead``).

The job metrics are recorded by ``workers.task.run_job`` through ``record_started``,
``record_job`` and ``record_redelivery``, which do nothing unless the worker prepared the
directory, and never raise.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast

import redis

from wire.connections import connect
from wire.contract import Usage
from wire.queues import read_waiting
from wire.settings import Settings

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from prometheus_client import Counter, Histogram
    from prometheus_client.metrics_core import Metric

log = logging.getLogger(__name__)

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: Run time of one job, seconds: from a fast API call to a long local generation.
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
#: Time a job waited in its queue, seconds: up to hours for a large labeling run.
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 1800, 3600, 7200)

#: A scrape waits at most this long for Redis (connect, then each reply).
SCRAPE_REDIS_TIMEOUT_S = 0.5


def enabled(settings: Settings) -> bool:
    """Whether this process records metrics: the worker asked for them and prepared."""
    return settings.metrics_port is not None and bool(os.environ.get(MULTIPROC_DIR_ENV))


def prepare(settings: Settings) -> str | None:
    """In the worker's main process, before its pool starts: a fresh directory for every
    process's samples, which the pool's processes inherit. None when metrics are off."""
    if settings.metrics_port is None:
        return None
    path = tempfile.mkdtemp(prefix="sibylq-metrics-")
    os.environ[MULTIPROC_DIR_ENV] = path
    values = sys.modules.get("prometheus_client.values")
    if values is not None:
        # prometheus_client picks its value class when first imported: imported before the
        # directory was set, it would keep every process's samples in memory, unseen.
        values.ValueClass = values.get_value_class()  # type: ignore[attr-defined]
    return path


def process_exited(pid: int) -> None:
    """Bookkeeping for a pool process that exits (run in that process)."""
    path = os.environ.get(MULTIPROC_DIR_ENV)
    if path:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]


@dataclass(frozen=True)
class _JobMetrics:
    jobs: Counter
    failures: Counter
    duration: Histogram
    wait: Histogram
    tokens: Counter
    redeliveries: Counter


_created: list[_JobMetrics] = []
_creating = threading.Lock()


def _job_metrics() -> _JobMetrics:
    """Made once, on first use, in the process that runs jobs (after the directory is set).
    Once only, even when a threads pool's first jobs race here: two objects for one metric
    would each write their own total to the same sample, losing counts."""
    if not _created:
        with _creating:
            if not _created:
                _created.append(_new_job_metrics())
    return _created[0]


def _new_job_metrics() -> _JobMetrics:
    from prometheus_client import Counter, Histogram

    model_queue = ("model", "queue")
    return _JobMetrics(
        jobs=Counter(
            "sibylq_jobs",
            "Jobs finished by this worker, by outcome: succeeded, failed, or skipped (a "
            "redelivery of a job that had already finished, dropped).",
            [*model_queue, "status"],
            registry=None,
        ),
        failures=Counter(
            "sibylq_job_failures",
            "Failed jobs by error type (OutputValidationError, BackendError, ...).",
            [*model_queue, "error"],
            registry=None,
        ),
        duration=Histogram(
            "sibylq_job_duration_seconds",
            "Run time of a job on its backend, succeeded or failed.",
            model_queue,
            buckets=DURATION_BUCKETS,
            registry=None,
        ),
        wait=Histogram(
            "sibylq_job_queue_wait_seconds",
            "From a job's creation by its producer to its start on this worker.",
            model_queue,
            buckets=WAIT_BUCKETS,
            registry=None,
        ),
        tokens=Counter(
            "sibylq_tokens",
            "Tokens of succeeded jobs, by kind: prompt or completion.",
            [*model_queue, "kind"],
            registry=None,
        ),
        redeliveries=Counter(
            "sibylq_job_redeliveries",
            "Deliveries of a job that had begun before (its worker process or worker died, "
            "or the visibility timeout passed).",
            ["queue"],
            registry=None,
        ),
    )


F = TypeVar("F", bound=Callable[..., None])


def _harmless(record: F) -> F:
    """Metrics never change a job's outcome: a failure to record one is logged, not raised."""

    @functools.wraps(record)
    def safely(*args: Any, **kwargs: Any) -> None:
        try:
            record(*args, **kwargs)
        except Exception:
            log.warning("metrics: %s failed", record.__name__, exc_info=True)

    return cast(F, safely)


@_harmless
def record_started(settings: Settings, *, model: str, queue: str, wait_s: float) -> None:
    """A job starts on its backend, ``wait_s`` after its producer created it."""
    if enabled(settings):
        _job_metrics().wait.labels(model, queue).observe(max(wait_s, 0.0))


@_harmless
def record_job(
    settings: Settings,
    *,
    model: str,
    queue: str,
    status: str,
    error: str | None = None,
    duration_s: float | None = None,
    usage: Usage | None = None,
) -> None:
    """A job's outcome: ``status`` succeeded, failed (with ``error``, its type), skipped or
    revoked (ended midway by its backend)."""
    if not enabled(settings):
        return
    metrics = _job_metrics()
    metrics.jobs.labels(model, queue, status).inc()
    if error is not None:
        metrics.failures.labels(model, queue, error).inc()
    if duration_s is not None:
        metrics.duration.labels(model, queue).observe(duration_s)
    if usage is not None:
        metrics.tokens.labels(model, queue, "prompt").inc(usage.prompt_tokens)
        metrics.tokens.labels(model, queue, "completion").inc(usage.completion_tokens)


@_harmless
def record_redelivery(settings: Settings, queue: str) -> None:
    if enabled(settings):
        _job_metrics().redeliveries.labels(queue).inc()


class WorkerCollector:
    """What the main process knows at scrape time: queue depths, running jobs, pool size."""

    def __init__(
        self,
        settings: Settings,
        queues: Sequence[str],
        *,
        running: Callable[[], int],
        concurrency: int,
    ) -> None:
        self._queues = list(queues)
        self._running = running
        self._concurrency = concurrency
        self._redis = connect(
            settings.broker,
            settings,
            client_name="sibylq-metrics",
            socket_connect_timeout=SCRAPE_REDIS_TIMEOUT_S,
            socket_timeout=SCRAPE_REDIS_TIMEOUT_S,
        )

    def collect(self) -> Iterable[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        yield GaugeMetricFamily(
            "sibylq_jobs_running", "Jobs this worker is running now.", value=self._running()
        )
        yield GaugeMetricFamily(
            "sibylq_worker_concurrency",
            "Jobs this worker runs at once (its pool's size).",
            value=self._concurrency,
        )
        depth = GaugeMetricFamily(
            "sibylq_queue_depth",
            "Jobs waiting in a queue this worker consumes (not those being run).",
            labels=["queue"],
        )
        up = 1.0
        try:
            for queue, waiting in zip(self._queues, self._depths(), strict=True):
                depth.add_metric([queue], waiting)
        except redis.RedisError as exc:
            log.debug("metrics: cannot read queue depths: %s", exc)
            up = 0.0
        yield depth
        yield GaugeMetricFamily(
            "sibylq_broker_up", "Whether Redis answered this scrape's queue depth reads.", up
        )

    def _depths(self) -> list[int]:
        return [waiting.depth for waiting in read_waiting(self._redis, self._queues)]

    def close(self) -> None:
        self._redis.close()


class WorkerMetrics:
    """A worker's metrics, from its main process: ``WorkerMetrics(settings)`` before the pool
    starts (``worker_init``), ``serve`` once it is ready, ``stop`` at shutdown."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._path = prepare(settings)
        self._server: WSGIServer | None = None
        self._collector: WorkerCollector | None = None
        self.port: int | None = None

    def serve(self, queues: Sequence[str], *, running: Callable[[], int], concurrency: int) -> None:
        """Serve ``/metrics``; ``port`` is then the port bound (None: metrics off, or the port
        was taken, which is logged: a worker runs on without metrics rather than not at all)."""
        if self._path is None or self._settings.metrics_port is None:
            return
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.multiprocess import MultiProcessCollector

        collector = WorkerCollector(
            self._settings, queues, running=running, concurrency=concurrency
        )
        registry = CollectorRegistry()
        MultiProcessCollector(registry, self._path)  # type: ignore[no-untyped-call]
        registry.register(collector)
        addr = self._settings.metrics_addr
        try:
            self._server, _ = start_http_server(self._settings.metrics_port, addr, registry)
        except OSError as exc:
            log.error("metrics: cannot serve on %s:%s: %s", addr, self._settings.metrics_port, exc)
            collector.close()
            return
        self._collector = collector
        self.port = self._server.server_port
        log.info("metrics: serving http://%s:%d/metrics", addr, self.port)

    def stop(self) -> None:
        """Stop serving and delete the samples (the pool has stopped by then)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._collector is not None:
            self._collector.close()
            self._collector = None
        if self._path is not None:
            if os.environ.get(MULTIPROC_DIR_ENV) == self._path:
                del os.environ[MULTIPROC_DIR_ENV]
            shutil.rmtree(self._path, ignore_errors=True)
            self._path = None
