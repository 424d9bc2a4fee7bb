"""Leases, one beat at a time, against a real Redis and real kombu deliveries: a held delivery is
renewed, an expired one is requeued, and nothing is requeued right after renewals resumed.
(tests/workers/test_resilience.py kills real workers for the same promises.)"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pydantic
import pytest
import redis
from celery import Celery
from kombu import Connection

from embedded.redis_server import RedisServer
from wire.constants import LEASES_RENEWED_KEY, LEASES_RESUMED_KEY, TASK_NAME
from wire.settings import Settings
from workers.celery_app import broker_transport_options, hard_time_limit_s
from workers.leases import LeaseKeeper

QUEUE = "sibylq.test-leases"
LEASE_S = 2.0


@pytest.fixture
def settings(server: RedisServer) -> Settings:
    return Settings(broker_url=server.url, heartbeat_interval_s=0.5, visibility_timeout_s=LEASE_S)


@pytest.fixture
def app(settings: Settings) -> Celery:
    app = Celery("test-leases", broker=settings.broker, set_as_current=False)
    app.conf.broker_transport_options = broker_transport_options(settings)
    return app


@pytest.fixture
def client(server: RedisServer) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(server.url) as client:
        yield client


@pytest.fixture
def delivery(app: Celery) -> Iterator[Any]:
    """A message delivered to a consumer and not acknowledged, as a worker holds a job."""
    with app.connection_for_write() as connection:
        queue = connection.SimpleQueue(QUEUE)
        queue.put({"job": 1}, headers={"id": "job-1", "task": TASK_NAME})
        yield queue.get(timeout=5)
        queue.close()


def redis_now_s(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return seconds + micros / 1e6


def age(client: redis.Redis, tag: str, seconds: float) -> None:
    """Make ``tag``'s delivery (or last renewal) ``seconds`` old."""
    client.zadd("unacked_index", {tag: redis_now_s(client) - seconds})


def renewals_resumed_ago(client: redis.Redis, seconds: float) -> None:
    client.set(LEASES_RESUMED_KEY, round((redis_now_s(client) - seconds) * 1000))


def test_an_expired_lease_is_requeued_and_a_held_one_renewed(
    app: Celery, settings: Settings, client: redis.Redis, delivery: Any
) -> None:
    tag = delivery.delivery_tag
    keeper = LeaseKeeper(app, settings, held=list)
    keeper.beat()  # renewals (re)start: none for long enough before
    renewals_resumed_ago(client, 2 * LEASE_S)

    age(client, tag, LEASE_S / 2)
    assert keeper.beat() == []  # not expired yet
    assert client.hexists("unacked", tag)

    held = LeaseKeeper(app, settings, held=lambda: [tag])
    age(client, tag, 2 * LEASE_S)
    assert held.beat() == []  # its worker renews it: never requeued, however old
    score = client.zscore("unacked_index", tag)
    assert score is not None and redis_now_s(client) - score < 1

    age(client, tag, 2 * LEASE_S)
    assert keeper.beat() == ["job-1"]  # nobody renewed it for a lease: its worker is lost
    assert not client.hexists("unacked", tag)
    assert client.zscore("unacked_index", tag) is None
    assert client.llen(QUEUE) == 1
    assert keeper.beat() == []  # requeued once


def test_nothing_is_requeued_for_a_lease_after_renewals_resume(
    app: Celery, settings: Settings, client: redis.Redis, delivery: Any
) -> None:
    tag = delivery.delivery_tag
    keeper = LeaseKeeper(app, settings, held=list)
    keeper.beat()
    renewals_resumed_ago(client, 2 * LEASE_S)
    age(client, tag, 3 * LEASE_S)
    # Redis was away (restarted, unreachable) longer than half a lease: no beat renewed.
    client.set(LEASES_RENEWED_KEY, round((redis_now_s(client) - LEASE_S) * 1000))

    assert keeper.beat() == []  # the live workers get a lease to renew theirs
    assert client.hexists("unacked", tag)

    # A lease and a little more: Redis's clock is read in milliseconds (truncated) and this
    # stamp rounded, so exactly a lease ago may still count as less when the beat follows
    # within the same millisecond.
    renewals_resumed_ago(client, LEASE_S + 0.05)
    assert keeper.beat() == ["job-1"]


def test_kombus_own_visibility_timeout_is_only_a_backstop_past_any_job() -> None:
    settings = Settings(job_time_limit_s=7200)
    backstop = broker_transport_options(settings)["visibility_timeout"]
    assert backstop > hard_time_limit_s(settings)
    assert broker_transport_options(Settings())["visibility_timeout"] == 3600


def test_a_lease_must_span_four_heartbeats() -> None:
    with pytest.raises(pydantic.ValidationError, match="SIBYLQ_VISIBILITY_TIMEOUT_S \\(3\\)"):
        Settings(visibility_timeout_s=3, heartbeat_interval_s=1)
    assert Settings(visibility_timeout_s=4, heartbeat_interval_s=1).visibility_timeout_s == 4
    # A job may run longer than its lease (it is renewed): no longer refused.
    assert Settings(visibility_timeout_s=8, job_time_limit_s=60).job_time_limit_s == 60


def test_a_delivery_that_is_no_longer_held_is_not_put_back(
    app: Celery, settings: Settings, client: redis.Redis
) -> None:
    with Connection(settings.broker) as connection:
        queue = connection.SimpleQueue(QUEUE)
        queue.put({"job": 2}, headers={"id": "job-2", "task": TASK_NAME})
        message = queue.get(timeout=5)
        message.ack()
        queue.close()

    LeaseKeeper(app, settings, held=lambda: [message.delivery_tag]).beat()

    assert client.zscore("unacked_index", message.delivery_tag) is None


def test_another_celery_apps_delivery_on_the_same_database_is_left_to_it(
    app: Celery, settings: Settings, client: redis.Redis
) -> None:
    with app.connection_for_write() as connection:
        queue = connection.SimpleQueue("another-app")
        queue.put({"x": 1}, headers={"id": "theirs", "task": "another_app.long_task"})
        theirs = queue.get(timeout=5)
        keeper = LeaseKeeper(app, settings, held=list)
        keeper.beat()
        renewals_resumed_ago(client, 2 * LEASE_S)
        age(client, theirs.delivery_tag, 2 * LEASE_S)  # its task runs on, past our lease

        assert keeper.beat() == []
        assert client.hexists("unacked", theirs.delivery_tag)
        assert client.llen("another-app") == 0
        queue.close()
