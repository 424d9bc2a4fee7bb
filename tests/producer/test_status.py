"""``sibylq status`` against the session's real Redis and a real worker on queues of its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
import redis

from embedded.redis_server import RedisServer, free_port
from producer import Client, Job, JobFailedError, Models, Settings
from sibylq.status import fleet_status, job_created_at
from tests.conftest import HEARTBEAT_S, Worker
from wire.constants import failures_key, queue_list_keys, queue_name
from wire.contract import JobKind, JobSpec, Message
from wire.redact import redact_url

SERVED = queue_name("fake", "status")
UNSERVED = queue_name("fake", "status-unserved")
GARBLED = queue_name("fake", "status-garbled")
BROKEN = "fake:delay=nope"  # the producer refuses it; sent raw, the worker's backend fails it


def sibylq_status(*args: str, broker_url: str | None) -> subprocess.CompletedProcess[str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("SIBYLQ_")}
    if broker_url is not None:
        env["SIBYLQ_BROKER_URL"] = broker_url
    return subprocess.run(
        [sys.executable, "-m", "sibylq", "status", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def by_name(items: list[dict[str, Any]], key: str = "name") -> dict[str, dict[str, Any]]:
    return {item[key]: item for item in items}


@pytest.fixture(scope="module")
def status_worker(start_worker: Callable[..., Worker]) -> Worker:
    return start_worker(
        "fake", "-Q", SERVED, "-P", "threads", "-c", "3", queue=SERVED,
        env={"SIBYLQ_METRICS_PORT": "0"},
    )  # fmt: skip


@pytest.fixture
def broker(redis_server: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(redis_server.url)


def test_status_shows_queues_workers_and_recent_failures(
    status_worker: Worker,
    client: Client,
    settings: Settings,
    redis_server: RedisServer,
    broker: redis.Redis,
) -> None:
    unserved = Models.create("fake", client=client, queue=UNSERVED)
    waiting = [unserved.call_async(f"nobody runs this {i}") for i in range(3)]
    broker.lpush(GARBLED, b"not a kombu message")
    served = Models.create("fake", client=client, queue=SERVED)
    assert served.call("hello") == "fake output"
    spec = JobSpec(model=BROKEN, kind=JobKind.TEXT, messages=(Message(role="user", content="x"),))
    broken = Job.from_id(client.submit(spec, SERVED), model=BROKEN, queue=SERVED, client=client)
    with pytest.raises(JobFailedError):
        broken.result(timeout=20)
    # Failures long ago: outside the default window (60 min), inside a 120 min one.
    broker.set(failures_key(SERVED, int(time.time() // 60) - 90), 7)

    # A running job shows as busy, as of the worker's next heartbeat.
    running = Models.create("fake:delay=2", client=client, queue=SERVED).call_async("slow")
    deadline = time.monotonic() + 10
    while by_name(fleet_status(settings).as_dict()["queues"])[SERVED]["busy"] != 1:
        assert time.monotonic() < deadline, "the running job never showed as busy"
        time.sleep(HEARTBEAT_S / 5)
    assert running.result(timeout=20) == "fake output"

    result = sibylq_status("--json", broker_url=redis_server.url)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["broker"] == redis_server.url
    assert report["failures_window_s"] == 3600
    queues = by_name(report["queues"])

    assert queues[UNSERVED]["waiting"] == 3
    assert 0 < queues[UNSERVED]["oldest_age_s"] < 60
    assert queues[UNSERVED]["workers"] == 0
    assert queues[GARBLED]["waiting"] == 1
    assert queues[GARBLED]["oldest_age_s"] is None  # undecodable: shown, not fatal
    served_queue = queues[SERVED]
    assert (served_queue["waiting"], served_queue["oldest_age_s"]) == (0, None)
    assert (served_queue["workers"], served_queue["concurrency"]) == (1, 3)
    assert served_queue["failures"] == 1

    [worker] = [w for w in report["workers"] if SERVED in w["queues"]]
    assert f"-{status_worker.process.pid}@" in worker["hostname"]
    assert (worker["model"], worker["pool"], worker["concurrency"]) == ("fake", "threads", 3)
    assert worker["busy"] in (0, 1)  # the slow job may have ended after the last heartbeat
    assert 0 <= worker["heartbeat_age_s"] < 5 * HEARTBEAT_S
    metrics_url = f"http://127.0.0.1:{worker['metrics_port']}/metrics"
    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        assert 'status="failed"} 1.0' in response.read().decode()

    wider = json.loads(
        sibylq_status("--json", "--window", "120", broker_url=redis_server.url).stdout
    )
    assert by_name(wider["queues"])[SERVED]["failures"] == 1 + 7

    table = sibylq_status(broker_url=redis_server.url)
    assert table.returncode == 0, table.stderr
    rows = {line.split()[0]: line.split() for line in table.stdout.splitlines() if line.strip()}
    assert rows[UNSERVED][1:2] == ["3"]
    assert rows[SERVED][1:3] == ["0", "-"]
    assert rows[SERVED][-1] == "1"  # failed in the last hour
    assert "sibylq-fake-any-" in table.stdout

    for job in waiting:
        job.cancel()
    broker.delete(*queue_list_keys(UNSERVED), *queue_list_keys(GARBLED))


def test_the_oldest_waiting_job_is_read_from_kombus_message(
    client: Client, broker: redis.Redis
) -> None:
    queue = queue_name("fake", "status-decode")
    before = datetime.now(UTC)
    Models.create("fake", client=client, queue=queue).call_async("decode me")
    raw = broker.lindex(queue, -1)
    broker.delete(queue)
    created = job_created_at(raw)
    assert created is not None and before <= created <= datetime.now(UTC)

    assert raw is not None
    message = json.loads(raw)
    assert job_created_at(json.dumps({**message, "body": "%%% not base64"})) is None
    assert job_created_at(json.dumps({**message, "body": "W10="})) is None  # "[]"
    assert job_created_at(b"\xff\xfe") is None
    assert job_created_at(None) is None


def test_status_says_what_it_needs_without_a_broker() -> None:
    result = sibylq_status(broker_url=None)
    assert result.returncode == 2
    assert "SIBYLQ_BROKER_URL" in result.stderr and "sibylq up" in result.stderr


def test_status_reports_an_unreachable_redis() -> None:
    url = f"redis://:secret@127.0.0.1:{free_port()}/0"
    result = sibylq_status("--json", broker_url=url)
    assert result.returncode == 2
    assert "cannot read the fleet's state" in result.stderr
    assert "secret" not in result.stderr
    assert redact_url(url) in result.stderr
