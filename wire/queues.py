"""How many jobs wait on a queue: the sum of its kombu priority lists (``queue_list_keys``).
``sibylq status`` and the workers' metrics read it the same way, in one round trip."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .constants import queue_list_keys


@dataclass(frozen=True)
class Waiting:
    """A queue's waiting jobs; with ``tails``, the oldest message of each priority list (the
    list's tail: kombu pushes at the head), None for an empty one."""

    depth: int
    tails: tuple[bytes | None, ...] = ()


def read_waiting(client: Any, queues: Sequence[str], *, tails: bool = False) -> list[Waiting]:
    """Each of ``queues``' waiting jobs, in one pipeline on ``client`` (a ``redis.Redis`` on
    the broker); ``tails`` also reads each list's oldest message."""
    with client.pipeline(transaction=False) as pipe:
        for queue in queues:
            for key in queue_list_keys(queue):
                pipe.llen(key)
                if tails:
                    pipe.lindex(key, -1)
        replies = pipe.execute()
    step = 2 if tails else 1
    per_queue = step * len(queue_list_keys(""))
    waiting = []
    for index in range(len(queues)):
        mine = replies[index * per_queue : (index + 1) * per_queue]
        depth = sum(int(length) for length in mine[0::step])
        waiting.append(Waiting(depth, tuple(mine[1::2]) if tails else ()))
    return waiting
