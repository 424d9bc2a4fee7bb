"""The workers' kombu transport: kombu's Redis transport with two narrow changes.

``workers.celery_app`` selects it (``broker_transport``); producers keep kombu's own.

1. Every entry BRPOP pops is screened (``workers.intake.admit``) before kombu decodes it: an
   entry that is not a sibylq job message is set aside instead of stopping the worker.
2. Closing a channel whose connection died mid-BRPOP completes (see ``Channel.close``).
"""

from __future__ import annotations

import functools
import logging
from queue import Empty
from typing import Any

from kombu.transport import redis as kombu_redis

from . import intake

log = logging.getLogger(__name__)

# The stubs of kombu's Redis transport omit the internals overridden here.
_RedisChannel: Any = kombu_redis.Channel
_RedisTransport: Any = kombu_redis.Transport


class _ScreenedBRPOP:
    """Mixed into the channel's Redis client class: a BRPOP reply whose entry is refused reads as
    no reply (kombu then raises ``Empty`` and polls again, as after a BRPOP timeout)."""

    def parse_response(self, connection: Any, command_name: Any, **options: Any) -> Any:
        response = super().parse_response(connection, command_name, **options)  # type: ignore[misc]
        if command_name == "BRPOP" and response:
            list_key, entry = response
            if not intake.admit(list_key, entry):
                return None
        return response


def _screened(client_cls: Any) -> Any:
    """``client_cls`` (a Redis client class, or kombu's partial of one when a global key
    prefix is set) with ``_ScreenedBRPOP`` mixed in."""
    if isinstance(client_cls, functools.partial):
        return functools.partial(
            _screened(client_cls.func), *client_cls.args, **client_cls.keywords
        )
    return type(f"Screened{client_cls.__name__}", (_ScreenedBRPOP, client_cls), {})


class Channel(_RedisChannel):  # type: ignore[misc]
    def _get_client(self) -> Any:
        return _screened(super()._get_client())

    def close(self) -> None:
        # kombu's close() first reads the reply of a BRPOP still in flight, so that a message
        # Redis popped meanwhile is not lost (celery/kombu#1733). When the connection died
        # under that BRPOP (a Redis restart, a reset), the read raises and close() stops before
        # marking the channel closed. Celery's consumer then collects the connection, which
        # detaches the transport from it (``transport.client = None``), and closes it again:
        # this second close() restores the unacked messages through a pool rebuilt from
        # ``transport.client`` -- AttributeError("'NoneType' object has no attribute
        # 'hostname'"), "Unrecoverable error", and the worker stops (with a job running on any
        # pool). A reply on a dead connection cannot be read anyway: drop it and close, while
        # the transport still has its client.
        if self._in_poll:
            try:
                self._brpop_read()
            except Empty:
                pass
            except self.connection_errors as exc:
                log.info("BRPOP reply lost with its connection (%r); closing the channel", exc)
        super().close()


class Transport(_RedisTransport):  # type: ignore[misc]
    Channel = Channel


#: The ``broker_transport`` setting that selects it.
TRANSPORT = f"{__name__}:{Transport.__name__}"
