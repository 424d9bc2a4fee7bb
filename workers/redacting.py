"""No secret leaves a worker: its stored results and its log lines go through
``wire.redact``.

A failed job's stored traceback holds the whole exception chain: the ``openai`` SDK's error
carries the server's body, and a proxy may echo the ``Authorization`` header there. Failure
messages are redacted where they are made (``workers.backends``); these exits catch the rest,
whatever raised it:

- ``RedactingRedisBackend``: Celery's Redis result backend, masking every value it stores
  (the result, its traceback, a RETRY's reason) before it is SET and PUBLISHed;
- ``redacted_failure``: a failure as it is stored and kept as a dead letter;
- ``RedactingLogging``: every handler Celery sets up (the worker's log, its pool processes',
  the task logger's) formats through ``RedactingFormatter``.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.app.log import Logging
from celery.backends.redis import RedisBackend
from celery.utils.log import ColorFormatter

from wire.contract import Failure
from wire.redact import redact, secrets_of
from wire.settings import Settings


class RedactingRedisBackend(RedisBackend):
    """Celery's Redis result backend, storing nothing that holds this process's secrets."""

    def __init__(self, *, app: Celery, url: str | None = None, **kwargs: Any) -> None:
        super().__init__(app=app, url=url, **kwargs)
        self._secrets = secrets_of(url, app.conf.broker_url)

    def set(self, key: str, value: Any, **options: Any) -> Any:
        """Celery's ``set`` (``expires`` and a retry policy in ``options``), redacted."""
        if isinstance(value, bytes):
            value = redact(value.decode(), self._secrets).encode()
        elif isinstance(value, str):
            value = redact(value, self._secrets)
        return super().set(key, value, **options)


def redacted_failure(failure: Failure, settings: Settings) -> Failure:
    """``failure`` as it may be stored (a dead letter, the result): an unexpected error's
    message is written by whatever raised it."""
    secrets = secrets_of(settings.broker_url, settings.result_backend)
    return failure.model_copy(
        update={
            "message": redact(failure.message, secrets),
            "raw_text": None if failure.raw_text is None else redact(failure.raw_text, secrets),
            "raw_outputs": tuple(redact(text, secrets) for text in failure.raw_outputs),
        }
    )


class RedactingFormatter(logging.Formatter):
    """Formats with ``inner``, then masks the secrets: the message, the traceback, all of it."""

    def __init__(self, inner: logging.Formatter, secrets: tuple[str, ...]) -> None:
        super().__init__()
        self.inner = inner
        self.secrets = secrets

    def format(self, record: logging.LogRecord) -> str:
        return redact(self.inner.format(record), self.secrets)


class RedactingLogging(Logging):
    """Celery's logging set-up for an app whose URLs hold secrets: every handler it installs
    (the worker's log, its pool processes', the task logger's) formats through
    ``RedactingFormatter``. An app uses it as its ``log_cls``: nothing is connected to a
    process-wide signal."""

    def __init__(self, app: Celery, secrets: tuple[str, ...]) -> None:
        super().__init__(app)
        self.secrets = secrets

    def setup_handlers(
        self,
        logger: logging.Logger,
        logfile: Any,
        format: str,
        colorize: bool,
        formatter: Any = ColorFormatter,
        **kwargs: Any,
    ) -> logging.Logger:
        logger = super().setup_handlers(logger, logfile, format, colorize, formatter, **kwargs)
        for handler in logger.handlers:
            if not isinstance(handler.formatter, RedactingFormatter):
                inner = handler.formatter or logging.Formatter()
                handler.setFormatter(RedactingFormatter(inner, self.secrets))
        return logger
