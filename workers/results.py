"""The workers' Celery result backend: Celery's Redis backend, except that no write replaces a
final result.

Celery stores failures (and RETRY) itself. Its Redis backend reads the current state, skips the
write only when it is SUCCESS, then SETs and PUBLISHes: a second run of the same job could
still replace a stored FAILURE, or slip its write in between the read and the SET of another.
Here (below the redaction of ``workers.redacting``) the check and the write are one Lua call
(``wire.outcome.STORE_UNLESS_FINAL``), the same rule the task's own success store follows:
the first final result stored wins.
"""

from __future__ import annotations

from typing import Any

from redis.commands.core import Script

from wire.outcome import STORE_UNLESS_FINAL

from .redacting import RedactingRedisBackend

# celery-types' stub of RedisBackend omits what is used here (``expires``, ``client``).
_RedisBackend: Any = RedactingRedisBackend


class ResultBackend(_RedisBackend):  # type: ignore[misc]
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._store_unless_final: Script | None = None

    def _set(self, key: str, value: str, expires: float | None = None) -> None:
        # RedisBackend.set() calls this under its retry policy (result_backend_always_retry).
        if self._store_unless_final is None:
            self._store_unless_final = self.client.register_script(STORE_UNLESS_FINAL)
        expires = self.expires if expires is None else expires
        self._store_unless_final(keys=[key], args=[value, int(expires or 0)])


#: How ``workers.celery_app`` names it in the result backend URL (``<class>+redis://...``).
BACKEND = f"{__name__}:{ResultBackend.__name__}"
