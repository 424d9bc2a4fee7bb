"""Issue 11, item 8, the last two outlets: ``sibylq status`` (table and JSON) and a worker's
metrics scrape, read from a Redis that takes a password, hold neither the password nor an API
key in the worker's environment. (Results, dead letters, logs and errors:
``tests/workers/test_secrets.py``.)"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from producer import Settings
from sibylq.status import fleet_status
from tests.secure_redis import PasswordRedis
from wire.constants import queue_name
from workers.metrics import WorkerCollector

PASSWORD = "s3cret-status-pw-4821"
API_KEY = "sk-proj-status-9Qw2Er4Ty6Ui8Op"
QUEUE = queue_name("openai", "status-secrets")


@pytest.fixture(scope="module")
def locked_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PasswordRedis]:
    server = PasswordRedis(tmp_path_factory.mktemp("status-secrets"), PASSWORD)
    with server:
        admin = server.admin()
        admin.lpush(QUEUE, b"{}")  # a queue with something waiting: the status shows it
        admin.close()
        yield server


def test_status_and_metrics_hold_no_password_or_key(
    locked_redis: PasswordRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    settings = Settings(
        broker_url=f"redis://:{PASSWORD}@127.0.0.1:{locked_redis.port}/0", metrics_port=0
    )

    status = fleet_status(settings)
    assert [queue.name for queue in status.queues] == [QUEUE]  # it did read Redis
    registry = CollectorRegistry()
    collector = WorkerCollector(settings, [QUEUE], running=lambda: 1, concurrency=2)
    registry.register(collector)
    try:
        scrape = generate_latest(registry).decode()
    finally:
        collector.close()
    assert "sibylq_broker_up 1.0" in scrape  # it did read Redis too

    for where, text in {
        "status table": status.to_table(),
        "status JSON": status.to_json(),
        "metrics": scrape,
    }.items():
        assert PASSWORD not in text, where
        assert API_KEY not in text, where
