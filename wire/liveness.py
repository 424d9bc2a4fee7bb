"""When a worker counts as alive: it stamped a heartbeat in ``sibylq:workers:<queue>`` less than
``HEARTBEAT_GRACE`` heartbeat intervals ago. Workers stamp and prune by this rule; producers,
the result listener and ``sibylq status`` read by it."""

from __future__ import annotations

import time
from typing import Any

from .constants import workers_key

#: A heartbeat older than this many heartbeat intervals means the worker is gone.
HEARTBEAT_GRACE = 5


def grace_s(heartbeat_interval_s: float) -> float:
    """How long after its last heartbeat a worker still counts as alive."""
    return HEARTBEAT_GRACE * heartbeat_interval_s


def live_since(heartbeat_interval_s: float, now: float | None = None) -> float:
    """The oldest heartbeat (unix s) of a live worker."""
    return (time.time() if now is None else now) - grace_s(heartbeat_interval_s)


def count_live(client: Any, queue: str, heartbeat_interval_s: float) -> Any:
    """How many live workers serve ``queue``: an int from a ``redis.Redis`` (or a pipeline),
    an awaitable from a ``redis.asyncio.Redis``."""
    return client.zcount(workers_key(queue), live_since(heartbeat_interval_s), "+inf")
