"""Every queue name, task name and Redis key name sibylq uses, in one place.

Queues (one Celery queue per model family; override with ``queue=`` / ``-Q``):

================================  =============================================
``sibylq.openai``                 every ``openai:<model>`` job
``sibylq.<api>``                  every ``<api>:<model>`` job of the other APIs
                                  (``wire.providers``: ``sibylq.groq``, ``sibylq.mistral``,
                                  ``sibylq.together``, ``sibylq.fireworks``, ``sibylq.anthropic``)
``sibylq.llamacpp.<stem>``        ``llamacpp:<stem>`` or ``llamacpp:/path/<stem>.gguf``
``sibylq.fake``                   every ``fake[:options]`` job
================================  =============================================

Redis keys:

================================  =============================================
``celery-task-meta-<job id>``     the stored result (Celery's Redis result backend);
                                  also the pub/sub channel it is announced on
``sibylq:workers:<queue>``        sorted set: worker hostname -> last heartbeat (unix s)
``sibylq:worker:<hostname>``      JSON description of a live worker (expires)
``sibylq:claimed:<job id>``       the delivery tag of the last enqueue of a job id, set with its
                                  push (expires with results; in the broker's Redis)
``sibylq:attempts:<job id>``      how many times a worker began the job (expires with results)
``sibylq:queues``                 sorted set: queue -> last heartbeat of a worker on it (unix s)
``sibylq:failures:<queue>:<min>`` jobs that failed on ``queue`` in that minute (unix s // 60;
                                  expires after ``FAILURES_RETENTION_S``)
``sibylq:delayed``                sorted set: a job waiting for its retry -> when due (unix ms)
``sibylq:delayed:leased``         sorted set: due jobs a worker is re-enqueueing -> since (unix ms)
``sibylq:dead-letters``           sorted set: job id of a job that finally failed -> when (unix s)
``sibylq:dead-letter:<job id>``   JSON: the failed job, its queue and priority, and its failure
``sibylq:ratelimit:<scope>:rpm``  the fleet-wide request limiter's state for one provider key and
``sibylq:ratelimit:<scope>:tpm``  model (theoretical arrival times, unix ms), and until when a 429
``sibylq:ratelimit:<scope>:pause`` paused everyone sharing it
``sibylq:cache:<digest>``         a cached answer to an identical temperature-0 request
``sibylq:leases:renewed``         when a worker last renewed its leases (Redis time, unix ms)
``sibylq:leases:resumed``         when lease renewals resumed after a gap in them (unix ms)
================================  =============================================

kombu's Redis transport keeps a queue's waiting messages in the list ``<queue>`` (pushed on
the left, popped from the right: the oldest is at the tail), and messages sent with a
priority in ``<queue>\x06\x16<step>`` (``queue_list_keys``). A delivered, unacknowledged
message is in the hash ``unacked`` (delivery tag -> message) and the sorted set
``unacked_index`` (delivery tag -> delivered at, which ``workers.leases`` renews).
"""

from __future__ import annotations

import re
from bisect import bisect

QUEUE_PREFIX = "sibylq"
TASK_NAME = "sibylq.run_job"

RESULT_KEY_PREFIX = "celery-task-meta-"
WORKERS_BY_QUEUE_PREFIX = "sibylq:workers:"
WORKER_INFO_PREFIX = "sibylq:worker:"
QUEUES_KEY = "sibylq:queues"
FAILURES_PREFIX = "sibylq:failures:"
DELAYED_KEY = "sibylq:delayed"
DELAYED_LEASED_KEY = "sibylq:delayed:leased"
DEAD_LETTERS_KEY = "sibylq:dead-letters"
DEAD_LETTER_PREFIX = "sibylq:dead-letter:"
RATE_LIMIT_PREFIX = "sibylq:ratelimit:"
CACHE_PREFIX = "sibylq:cache:"
LEASES_RENEWED_KEY = "sibylq:leases:renewed"
LEASES_RESUMED_KEY = "sibylq:leases:resumed"
#: How long per-minute failure counts are kept (``sibylq status`` sums at most this far back).
FAILURES_RETENTION_S = 25 * 3600
#: How long a queue nobody served stays in ``QUEUES_KEY``.
QUEUES_RETENTION_S = 24 * 3600

#: kombu's Redis transport: a queue's list for priority step ``n`` > 0 is ``<queue><SEP><n>``.
KOMBU_PRIORITY_SEP = "\x06\x16"
KOMBU_PRIORITY_STEPS = (0, 3, 6, 9)

#: Lanes: kombu's Redis transport pops priority 0 first (the bare queue list), then 3, 6, 9.
#: Interactive jobs go ahead of bulk labeling work waiting on the same queue.
LANE_PRIORITIES = {"interactive": 0, "bulk": 9}

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def queue_name(*parts: str) -> str:
    """``queue_name("llamacpp", "smollm2")`` -> ``"sibylq.llamacpp.smollm2"``."""
    cleaned = [_UNSAFE.sub("-", part).strip("-") for part in parts if part]
    return ".".join([QUEUE_PREFIX, *cleaned])


def result_key(job_id: str) -> str:
    """The key (and pub/sub channel) Celery's Redis backend stores a result under."""
    return f"{RESULT_KEY_PREFIX}{job_id}"


def job_id_from_result_key(key: str) -> str:
    return key[len(RESULT_KEY_PREFIX) :]


def workers_key(queue: str) -> str:
    return f"{WORKERS_BY_QUEUE_PREFIX}{queue}"


def worker_info_key(hostname: str) -> str:
    return f"{WORKER_INFO_PREFIX}{hostname}"


def claim_key(job_id: str) -> str:
    """Set with each push of a job (see ``producer.enqueue``): a retried try never pushes it
    twice, and a re-run's ``once`` enqueue attaches to it."""
    return f"sibylq:claimed:{job_id}"


def attempts_key(job_id: str) -> str:
    """Counts the deliveries of a job that reached a worker process (see workers.task)."""
    return f"sibylq:attempts:{job_id}"


def failures_key(queue: str, minute: int) -> str:
    """Failures on ``queue`` during ``minute`` (unix time // 60)."""
    return f"{FAILURES_PREFIX}{queue}:{minute}"


def queue_list_keys(queue: str) -> tuple[str, ...]:
    """The Redis lists holding ``queue``'s waiting messages, highest priority first."""
    return tuple(
        f"{queue}{KOMBU_PRIORITY_SEP}{step}" if step else queue for step in KOMBU_PRIORITY_STEPS
    )


def queue_list_key(queue: str, priority: int) -> str:
    """The Redis list a message of ``priority`` (0-9) waits in: kombu's Redis transport rounds
    it down to a step of ``KOMBU_PRIORITY_STEPS``."""
    step = KOMBU_PRIORITY_STEPS[bisect(KOMBU_PRIORITY_STEPS, min(max(priority, 0), 9)) - 1]
    return f"{queue}{KOMBU_PRIORITY_SEP}{step}" if step else queue


def dead_letter_key(job_id: str) -> str:
    """The JSON record of a job that finally failed (see ``DEAD_LETTERS_KEY``)."""
    return f"{DEAD_LETTER_PREFIX}{job_id}"


def rate_limit_keys(scope: str) -> tuple[str, str, str]:
    """The limiter's keys for ``scope`` (a provider key and model): RPM, TPM and pause."""
    base = f"{RATE_LIMIT_PREFIX}{scope}"
    return (f"{base}:rpm", f"{base}:tpm", f"{base}:pause")


def cache_key(digest: str) -> str:
    return f"{CACHE_PREFIX}{digest}"
