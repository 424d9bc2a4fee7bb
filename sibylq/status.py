"""``sibylq status``: the fleet as Redis sees it — queues, workers, recent failures.

Everything comes from Redis, read-only, in a few round trips:

- **queues**: those a worker consumed in the last day (``sibylq:queues``, stamped by the
  heartbeats) plus every kombu list named ``sibylq.*`` (a queue with jobs waiting, served or
  not). ``waiting`` is the lists' length; ``oldest`` the age of the message at the tail (kombu
  pushes on the left and pops from the right), from the ``created_at`` of the job inside;
- **workers**: the members of each queue's heartbeat set whose description
  (``sibylq:worker:<hostname>``, which expires when the heartbeats stop) is still there;
  ``busy`` is Celery's count of the jobs the worker runs now, as of its last heartbeat;
- **failures**: the per-queue, per-minute counters the workers increment
  (``sibylq:failures:<queue>:<minute>``), summed over the window.

It needs ``SIBYLQ_BROKER_URL``: an embedded cluster (no URL set) is private to the process
that started it; ``sibylq up`` prints the URL that shows its status.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import redis

from wire.connections import connect
from wire.constants import (
    FAILURES_RETENTION_S,
    KOMBU_PRIORITY_SEP,
    QUEUE_PREFIX,
    QUEUES_KEY,
    failures_key,
    worker_info_key,
    workers_key,
)
from wire.errors import BrokerUnavailableError, ConfigurationError
from wire.queues import read_waiting
from wire.redact import redact_url
from wire.settings import Settings, get_settings

#: ``--window`` default, minutes.
DEFAULT_WINDOW_MIN = 60
MAX_WINDOW_MIN = FAILURES_RETENTION_S // 60

NO_BROKER = (
    "sibylq status needs SIBYLQ_BROKER_URL: the Redis of the fleet to describe. An embedded "
    "cluster (what sibylq runs when no URL is set) is private to the process that started "
    "it; run `sibylq up MODEL...` instead and point SIBYLQ_BROKER_URL at the URL it prints"
)


@dataclass(frozen=True)
class QueueStatus:
    name: str
    waiting: int
    #: Age of the oldest waiting job, seconds; None with nothing waiting (or undecodable).
    oldest_age_s: float | None
    workers: int
    busy: int
    concurrency: int
    failures: int


@dataclass(frozen=True)
class WorkerStatus:
    hostname: str
    model: str | None
    queues: list[str]
    pool: str | None
    concurrency: int | None
    busy: int | None
    heartbeat_age_s: float
    pid: int | None
    metrics_port: int | None


@dataclass(frozen=True)
class FleetStatus:
    broker: str
    collected_at: datetime
    failures_window_s: int
    queues: list[QueueStatus] = field(default_factory=list)
    workers: list[WorkerStatus] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["collected_at"] = self.collected_at.isoformat()
        return data

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)

    def to_table(self) -> str:
        window = _duration(self.failures_window_s)
        lines = [f"broker {self.broker}", ""]
        lines += format_table(
            ["QUEUE", "WAITING", "OLDEST", "WORKERS", "BUSY", f"FAILED ({window})"],
            [
                [
                    q.name,
                    str(q.waiting),
                    _age(q.oldest_age_s),
                    str(q.workers),
                    f"{q.busy}/{q.concurrency}",
                    str(q.failures),
                ]
                for q in self.queues
            ],
            empty="no sibylq queues (no worker has run, and no job is waiting)",
        )
        lines.append("")
        lines += format_table(
            ["WORKER", "MODEL", "QUEUES", "POOL", "BUSY", "HEARTBEAT", "METRICS"],
            [
                [
                    w.hostname,
                    w.model or "-",
                    ",".join(w.queues),
                    w.pool or "-",
                    f"{_opt(w.busy)}/{_opt(w.concurrency)}",
                    f"{_age(w.heartbeat_age_s)} ago",
                    _metrics_address(w),
                ]
                for w in self.workers
            ],
            empty="no live workers",
        )
        return "\n".join(lines)


def fleet_status(
    settings: Settings | None = None, *, window_min: int = DEFAULT_WINDOW_MIN
) -> FleetStatus:
    """Read the fleet's state from Redis. Raises ``ConfigurationError`` when no broker is
    configured, ``BrokerUnavailableError`` when Redis does not answer."""
    settings = settings or get_settings()
    if settings.broker_url is None:
        raise ConfigurationError(NO_BROKER)
    if not 1 <= window_min <= MAX_WINDOW_MIN:
        raise ConfigurationError(f"the failure window must be 1..{MAX_WINDOW_MIN} minutes")
    broker = _connect(settings.broker_url, settings)
    results = (
        broker
        if settings.result_url == settings.broker_url
        else _connect(settings.result_url, settings)
    )
    try:
        return _collect(broker, results, redact_url(settings.broker_url), window_min)
    except redis.RedisError as exc:
        raise BrokerUnavailableError(
            f"cannot read the fleet's state from {redact_url(settings.broker_url)}: {exc}"
        ) from exc
    finally:
        broker.close()
        if results is not broker:
            results.close()


def _connect(url: str, settings: Settings) -> redis.Redis:
    return connect(
        url, settings, client_name="sibylq-status", socket_connect_timeout=3, socket_timeout=10
    )


def _collect(
    broker: redis.Redis, results: redis.Redis, broker_name: str, window_min: int
) -> FleetStatus:
    now = time.time()
    names = sorted(set(_registered_queues(results)) | set(_waiting_queues(broker)))
    workers = _workers(results, names, now)
    waiting = _waiting(broker, names, now)
    failures = _failures(results, names, int(now // 60), window_min)
    queues = []
    for name in names:
        serving = [w for w in workers if name in w.queues]
        depth, oldest = waiting[name]
        queues.append(
            QueueStatus(
                name=name,
                waiting=depth,
                oldest_age_s=oldest,
                workers=len(serving),
                busy=sum(w.busy or 0 for w in serving),
                concurrency=sum(w.concurrency or 0 for w in serving),
                failures=failures[name],
            )
        )
    return FleetStatus(
        broker=broker_name,
        collected_at=datetime.fromtimestamp(now, UTC),
        failures_window_s=window_min * 60,
        queues=queues,
        workers=workers,
    )


def _registered_queues(results: redis.Redis) -> list[str]:
    return [_text(name) for name in results.zrange(QUEUES_KEY, 0, -1)]


def _waiting_queues(broker: redis.Redis) -> set[str]:
    """Queues with messages waiting: kombu's lists named ``sibylq.*`` (one scan)."""
    found = set()
    for key in broker.scan_iter(match=f"{QUEUE_PREFIX}.*", count=1000, _type="list"):
        found.add(_text(key).split(KOMBU_PRIORITY_SEP, 1)[0])
    return found


def _workers(results: redis.Redis, queues: Sequence[str], now: float) -> list[WorkerStatus]:
    with results.pipeline(transaction=False) as pipe:
        for queue in queues:
            pipe.zrange(workers_key(queue), 0, -1, withscores=True)
        beats: dict[str, float] = {}
        for members in pipe.execute():
            for member, score in members:
                host = _text(member)
                beats[host] = max(score, beats.get(host, 0.0))
    hosts = sorted(beats)
    infos = results.mget([worker_info_key(host) for host in hosts]) if hosts else []
    workers = []
    for host, raw in zip(hosts, infos, strict=True):
        if raw is None:
            continue  # its description expired: the worker is gone
        info = _json_object(raw)
        workers.append(
            WorkerStatus(
                hostname=host,
                model=_opt_str(info.get("model")),
                queues=[str(q) for q in info.get("queues") or []],
                pool=_opt_str(info.get("pool")),
                concurrency=_opt_int(info.get("concurrency")),
                busy=_opt_int(info.get("busy")),
                heartbeat_age_s=round(max(now - beats[host], 0.0), 3),
                pid=_opt_int(info.get("pid")),
                metrics_port=_opt_int(info.get("metrics_port")),
            )
        )
    return workers


def _waiting(
    broker: redis.Redis, queues: Sequence[str], now: float
) -> dict[str, tuple[int, float | None]]:
    """Each queue's waiting jobs, and the age of its oldest (the tail of each list)."""
    waiting = {}
    for queue, found in zip(queues, read_waiting(broker, queues, tails=True), strict=True):
        created = [c for c in map(job_created_at, found.tails) if c is not None]
        oldest = round(max(now - min(created).timestamp(), 0.0), 3) if created else None
        waiting[queue] = (found.depth, oldest)
    return waiting


def _failures(
    results: redis.Redis, queues: Sequence[str], minute: int, window_min: int
) -> dict[str, int]:
    minutes = range(minute - window_min + 1, minute + 1)
    with results.pipeline(transaction=False) as pipe:
        for queue in queues:
            pipe.mget([failures_key(queue, m) for m in minutes])
        counts = pipe.execute()
    return {
        queue: sum(int(c) for c in per_minute if c is not None)
        for queue, per_minute in zip(queues, counts, strict=True)
    }


def job_created_at(raw: bytes | str | None) -> datetime | None:
    """When the job in a waiting kombu message was created, or None for a message that is
    not a sibylq job (or cannot be decoded: compressed, another serializer, truncated...).

    The message is kombu's JSON envelope; its ``body`` (base64 when ``body_encoding`` says so)
    is Celery's JSON body ``[args, kwargs, embed]``, and ``args[0]`` the job.
    """
    if raw is None:
        return None
    try:
        message = json.loads(raw)
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        decoded = json.loads(body)
        args = decoded[0] if isinstance(decoded, list) else decoded["args"]  # protocol 2 | 1
        created = datetime.fromisoformat(args[0]["created_at"])
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, binascii.Error):
        return None
    return created if created.tzinfo is not None else created.replace(tzinfo=UTC)


def add_status_parser(commands: Any) -> None:
    status = commands.add_parser(
        "status",
        help="queues, workers and recent failures of the fleet at SIBYLQ_BROKER_URL",
        description="Show the fleet at SIBYLQ_BROKER_URL: every sibylq queue (waiting jobs, "
        "age of the oldest, workers, busy slots, recent failures) and every live worker.",
        epilog="examples:\n  SIBYLQ_BROKER_URL=redis://localhost:6379/0 sibylq status\n"
        "  sibylq status --json --window 15",
    )
    status.add_argument("--json", action="store_true", help="print JSON, for machines")
    status.add_argument(
        "--window",
        type=int,
        default=DEFAULT_WINDOW_MIN,
        metavar="MINUTES",
        help=f"count failures over the last MINUTES (default {DEFAULT_WINDOW_MIN}, "
        f"at most {MAX_WINDOW_MIN})",
    )


def run_status(args: argparse.Namespace) -> int:
    status = fleet_status(window_min=args.window)
    print(status.to_json() if args.json else status.to_table())
    return 0


def format_table(header: list[str], rows: list[list[str]], *, empty: str) -> list[str]:
    """Columns padded to their widest cell; numbers (and ``busy/slots``) aligned right."""
    if not rows:
        return [empty]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    numeric = [all(row[i].replace("/", "").isdigit() for row in rows) for i in range(len(header))]
    return [
        "  ".join(
            cell.rjust(width) if right else cell.ljust(width)
            for cell, width, right in zip(row, widths, numeric, strict=True)
        ).rstrip()
        for row in [header, *rows]
    ]


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    return _duration(int(seconds))


def _duration(seconds: int) -> str:
    if seconds < 3600:
        minutes, rest = divmod(seconds, 60)
        return f"{minutes}m{rest:02d}s" if rest else f"{minutes}m"
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if rest // 60 else f"{hours}h"


def _metrics_address(worker: WorkerStatus) -> str:
    if worker.metrics_port is None:
        return "-"
    return f"{worker.hostname.rsplit('@', 1)[-1]}:{worker.metrics_port}"


def _opt(value: int | None) -> str:
    return "?" if value is None else str(value)


def _opt_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _opt_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _json_object(raw: Any) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
