"""sibylq's workers: ``celery -A workers worker -Q <queue>`` or ``sibylq worker MODEL``."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from celery import Celery

from .celery_app import create_app


@lru_cache(maxsize=1)
def default_app() -> Celery:
    """The app built from the environment's settings, made on first use."""
    return create_app()


def __getattr__(name: str) -> Any:
    # `celery -A workers` looks up `workers.app`; build it only then.
    if name in ("app", "celery"):
        return default_app()
    raise AttributeError(name)


__all__ = ["create_app", "default_app"]
