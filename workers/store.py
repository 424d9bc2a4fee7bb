"""The worker process's one client of the result Redis: results, delivery check-ins, parked
jobs, the rate limiter, the answer cache and dead letters all go through it."""

from __future__ import annotations

from functools import cache

import redis
from redis.commands.core import Script

from wire.connections import Endpoint, endpoint
from wire.settings import Settings

#: Connections a worker process may open to the result Redis (one per busy thread at most).
MAX_CONNECTIONS = 4096


def result_redis(settings: Settings) -> redis.Redis:
    return _redis(endpoint(settings.result_url, settings))


def script(settings: Settings, source: str) -> Script:
    """A Lua script on the result Redis, sent once and then called by its SHA."""
    return _script(endpoint(settings.result_url, settings), source)


@cache
def _script(target: Endpoint, source: str) -> Script:
    return _redis(target).register_script(source)


@cache
def _redis(target: Endpoint) -> redis.Redis:
    # One client per process and URL; redis-py's pool reconnects after a fork by itself.
    # A threads pool runs up to its concurrency (256 and more) of Redis calls at once:
    # redis-py's default cap of 100 connections would fail the rest.
    return redis.Redis.from_url(
        target.url,
        **target.ssl_options(),
        client_name="sibylq-worker",
        socket_connect_timeout=5,
        socket_timeout=30,
        max_connections=MAX_CONNECTIONS,
    )
