"""Fixtures of the worker tests that need a Redis of their own."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from embedded.redis_server import RedisServer


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own (AOF on, so a restart keeps its data): its faults,
    kills and keys reach nothing else, and the session's workers (whose promoters and lease
    keepers act on the shared Redis) never touch it."""
    with RedisServer(tmp_path / "redis", appendonly=True) as started:
        yield started
