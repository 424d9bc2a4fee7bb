"""Leases on delivered jobs: a lost worker's jobs run again within seconds, a live worker's never.

kombu's Redis transport keeps every delivered, unacknowledged message in the hash ``unacked``
and its delivery time in the sorted set ``unacked_index``, and its sweep
(``QoS.restore_visible``) requeues any message delivered longer ago than the visibility timeout,
live worker or not. One fixed timeout cannot be right: it is how long a lost worker's jobs wait
(15 minutes by default here, before), and a live worker's job that runs longer runs twice.

sibylq makes that index a set of leases. Every heartbeat interval, the ``LeaseKeeper`` of each
worker (a thread of its main process, which knows every message the worker holds, even when a
prefork child runs the job: ``held_tags``) makes one Lua call to the broker Redis that

1. renews the worker's leases: the index score of each delivery it holds becomes now
   (``ZADD XX``: a delivery acknowledged or requeued meanwhile is not put back);
2. stamps when leases were last renewed by anyone (``LEASES_RENEWED_KEY``), and when nobody
   had for half a lease (Redis restarted or was unreachable, or every worker was gone), notes
   that renewals resumed now (``LEASES_RESUMED_KEY``);
3. returns sibylq's deliveries whose lease ran out (not renewed for
   ``SIBYLQ_VISIBILITY_TIMEOUT_S``; another Celery app's on the same database are left alone),
   unless renewals resumed less than a lease ago: then live workers may not have renewed yet
   (their jobs ran on while Redis was away), and nothing is requeued until they could have.

The keeper requeues those with kombu's own ``QoS.restore_by_tag`` (a WATCH/MULTI transaction
each: workers requeueing the same delivery at once requeue it once), through its own kombu
connection, so every broker URL kombu takes (TLS, Sentinel) works. kombu's sweep stays on as a
backstop, far past any job's end (``Settings.broker_visibility_timeout_s``).

Times are Redis's (``TIME``) except a new delivery's first score, which kombu takes from the
delivering worker's clock: machines' clocks must agree to well within a lease.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import redis
from celery import Celery
from celery.worker import state as worker_state
from kombu.exceptions import KombuError

from wire.constants import LEASES_RENEWED_KEY, LEASES_RESUMED_KEY, TASK_NAME
from wire.settings import Settings

log = logging.getLogger(__name__)

#: Expired deliveries requeued per beat at most (the next beat takes the rest).
BATCH = 100

# KEYS: unacked index, renewed, resumed, unacked. ARGV: lease (ms), gap (ms), batch, task name,
# held tags... Returns the tags of sibylq's deliveries whose lease ran out (another Celery app's
# on the same Redis database are its own to sweep), or none while renewals resumed less than a
# lease ago. A tag whose message is gone is returned too: requeueing drops it from the index.
_RENEW = """
local time = redis.call('TIME')
local now_ms = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local lease_ms = tonumber(ARGV[1])
local now_s = string.format('%.3f', now_ms / 1000)
for i = 5, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', now_s, ARGV[i])
end
local renewed = tonumber(redis.call('GET', KEYS[2]))
if not renewed or now_ms - renewed > tonumber(ARGV[2]) then
  redis.call('SET', KEYS[3], now_ms)
end
redis.call('SET', KEYS[2], now_ms)
local resumed = tonumber(redis.call('GET', KEYS[3])) or now_ms
if now_ms - resumed < lease_ms then
  return {}
end
local expired = string.format('%.3f', (now_ms - lease_ms) / 1000)
local ours = {}
for _, tag in ipairs(redis.call('ZRANGE', KEYS[1], '-inf', expired, 'BYSCORE')) do
  local stored = redis.call('HGET', KEYS[4], tag)
  local ok, entry = pcall(cjson.decode, stored or 'null')
  local headers = ok and type(entry) == 'table' and type(entry[1]) == 'table'
    and entry[1].headers
  if not stored or (type(headers) == 'table' and headers.task == ARGV[4]) then
    ours[#ours + 1] = tag
    if #ours >= tonumber(ARGV[3]) then break end
  end
end
return ours
"""


def held_tags() -> list[str]:
    """Delivery tags of the messages this worker holds: every request its consumer received and
    has not finished (waiting for a pool slot or running), as the main process tracks them."""
    # One C-level copy, atomic under the GIL: the consumer adds and drops requests meanwhile.
    requests: tuple[Any, ...] = tuple(worker_state.requests.values())
    tags = (request.message.delivery_tag for request in requests)
    return [str(tag) for tag in tags if tag is not None]


class LeaseKeeper:
    """Renews this worker's leases and requeues expired ones, from a thread of the worker."""

    def __init__(
        self, app: Celery, settings: Settings, held: Callable[[], Sequence[str]] = held_tags
    ) -> None:
        self._app = app
        self._lease_ms = round(settings.visibility_timeout_s * 1000)
        self._interval_s = settings.heartbeat_interval_s
        self._held = held
        self._connection: Any = None  # kombu.Connection, made in the thread
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sibylq-leases", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._disconnect()

    def beat(self) -> list[str]:
        """Renew the leases of every delivery held; requeue those of lost workers. Returns the
        ids of the jobs requeued."""
        channel = self._channel()
        with channel.conn_or_acquire() as client:
            expired = client.register_script(_RENEW)(
                keys=[
                    channel.unacked_index_key,
                    LEASES_RENEWED_KEY,
                    LEASES_RESUMED_KEY,
                    channel.unacked_key,
                ],
                args=[self._lease_ms, self._lease_ms // 2, BATCH, TASK_NAME, *self._held()],
            )
            requeued = []
            for tag in expired:
                requeued.append(_job_id(client.hget(channel.unacked_key, tag)))
                channel.qos.restore_by_tag(tag, client)
        for job_id in requeued:
            log.warning(
                "requeued job %s: its worker stopped renewing its lease %g s ago "
                "(SIBYLQ_VISIBILITY_TIMEOUT_S); it was lost",
                job_id,
                self._lease_ms / 1000,
            )
        return requeued

    def _channel(self) -> Any:
        if self._connection is None:
            timeout_s = self._lease_ms / 2000
            # One connection attempt per beat (kombu's default retries forever), and no
            # command blocked on a half-open connection past half a lease.
            self._connection = self._app.connection_for_write(
                transport_options={
                    "max_retries": 1,
                    "socket_timeout": timeout_s,
                    "socket_connect_timeout": timeout_s,
                }
            )
        return self._connection.default_channel

    def _disconnect(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.release()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                while len(self.beat()) == BATCH:
                    pass
            except (redis.RedisError, OSError, KombuError) as exc:
                log.warning("cannot renew leases in the broker Redis yet: %r", exc)
                self._disconnect()
            except Exception:  # a bug: keep renewing, and say so loudly
                log.exception("renewing leases failed")
                self._disconnect()
            self._stop.wait(self._interval_s)


def _job_id(raw: bytes | None) -> str:
    """The job id of an ``unacked`` entry (kombu's ``[message, exchange, routing key]``)."""
    try:
        message = json.loads(raw or b"null")[0]
        return str(message["headers"]["id"])
    except (ValueError, TypeError, KeyError, IndexError):
        return "(unknown id)"
