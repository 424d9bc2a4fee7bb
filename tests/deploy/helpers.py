"""Paths and facts shared by the deployment tests."""

from __future__ import annotations

from pathlib import Path

from wire.settings import Settings
from workers.celery_app import hard_time_limit_s

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
#: The Compose Specification's JSON Schema, shipped with the tests (tests/data/README.md).
COMPOSE_SCHEMA = ROOT / "tests" / "data" / "compose-spec.json"


def longest_job_s() -> float:
    """How long a job may run on a worker with the default settings: its soft time limit plus
    the grace before the hard kill. A worker told to stop must be given at least that long."""
    return hard_time_limit_s(Settings.model_construct())  # the defaults, not this environment
