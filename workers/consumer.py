"""A consumer step that keeps a worker from starting a job it is already running.

When a worker's connection to Redis breaks while Redis stays up (a network blip, a reset),
kombu's Redis transport requeues the unacknowledged messages of the channel it closes: the jobs
this worker is running go back on their queue while they run, and the reconnected consumer
pops them again at once. Without this step an idle thread or process of the same worker starts
each one a second time (two runs, two results; the store keeps the first, see
``workers.results``).

``HoldDuplicates`` wraps the task's Celery strategy (what turns a message into a request for
the pool): a delivery of a job that this worker already holds (reserved or running, Celery's
``worker.state.requests``, kept by the main process for every pool) is held back and looked at
again every ``RECHECK_S``. Once the first run has ended, the held delivery goes to the pool like
any other: the check-in (``workers.delivery``) drops it when the job has a result, and runs it
when the first run died without one (its process killed), so the job is never lost. A held
delivery stays unacknowledged, so a worker that stops meanwhile leaves it to be requeued.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery import bootsteps
from celery.worker import state as worker_state

from wire.constants import TASK_NAME

log = logging.getLogger(__name__)

#: How often a held delivery looks whether the run it waits for has ended.
RECHECK_S = 0.5

Strategy = Callable[..., Any]


class HoldDuplicates(bootsteps.StartStopStep):
    """Consumer step, after the one that builds the task strategies (at every reconnect)."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, c: Any) -> None:
        c.strategies[TASK_NAME] = hold_duplicates(c.strategies[TASK_NAME], c.timer.call_after)


def hold_duplicates(
    strategy: Strategy,
    call_after: Callable[..., Any],
    held_ids: Callable[[], Any] = lambda: worker_state.requests,
) -> Strategy:
    """``strategy``, except that a delivery of a job in ``held_ids()`` waits for that run."""

    def guarded(message: Any, *args: Any, waited: bool = False) -> Any:
        job_id = (message.headers or {}).get("id")
        if job_id is None or job_id not in held_ids():
            return strategy(message, *args)
        channel = message.channel
        if channel is None or getattr(channel, "closed", False):
            # Its channel was closed meanwhile (another reconnect): kombu requeued it then.
            return None
        if not waited:
            log.warning(
                "job %s is already running on this worker: holding its new delivery until "
                "that run ends",
                job_id,
            )
        call_after(RECHECK_S, guarded, (message, *args), {"waited": True})
        return None

    return guarded
