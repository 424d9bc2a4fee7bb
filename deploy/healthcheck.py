#!/usr/bin/env python3
"""Container health check of a ``sibylq worker``: exit 0 while this host's worker is alive.

    sibylq-healthcheck MODEL     # the model the worker serves: openai, llamacpp:smollm2, ...
    sibylq-healthcheck QUEUE     # or its queue, for workers started with -Q: sibylq.openai

``sibylq worker`` names itself ``sibylq-<provider>-<stem>-<pid>@<hostname>`` and, every
``SIBYLQ_HEARTBEAT_INTERVAL_S``, stamps that name into ``sibylq:workers:<queue>`` (a sorted
set with one member per worker) and refreshes ``sibylq:worker:<name>`` (which expires after
five missed beats). The check reads that small set, keeps the members of this host (the
container's or pod's hostname), and passes when one of them still has its info key: a few
cheap commands, never a scan of the keyspace.

It reads the same Redis as the worker (``SIBYLQ_RESULT_BACKEND``, else ``SIBYLQ_BROKER_URL``),
so it also fails while Redis is unreachable: use it for Docker health and Kubernetes
readiness, not for a liveness probe that would restart busy workers during a Redis outage.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Sequence

import redis

from wire.constants import QUEUE_PREFIX, worker_info_key, workers_key
from wire.errors import ConfigurationError
from wire.modelref import parse_model_ref
from wire.settings import get_settings


def queue_of(target: str) -> str:
    """A queue name as given, or the default queue of a model reference."""
    if target.startswith(f"{QUEUE_PREFIX}."):
        return target
    return parse_model_ref(target, any_api_model=True).queue


def live_workers(client: redis.Redis, queue: str, host: str) -> list[str]:
    """This host's workers on ``queue`` whose heartbeat has not expired."""
    members = [m.decode() for m in client.zrange(workers_key(queue), 0, -1)]
    mine = [name for name in members if name.endswith(f"@{host}")]
    return [name for name in mine if client.exists(worker_info_key(name))]


def main(argv: Sequence[str]) -> int:
    if len(argv) != 1:
        print("usage: sibylq-healthcheck MODEL|QUEUE", file=sys.stderr)
        return 2
    try:
        queue = queue_of(argv[0])
        url = get_settings().result_url
    except (ConfigurationError, ValueError) as exc:  # bad model, unset or invalid settings
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 2
    host = socket.gethostname()
    client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
    try:
        alive = live_workers(client, queue, host)
    except redis.RedisError as exc:
        print(f"unhealthy: cannot read heartbeats from Redis: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    if not alive:
        print(f"unhealthy: no live worker of {host} on {queue}", file=sys.stderr)
        return 1
    print(f"healthy: {', '.join(alive)} on {queue}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
