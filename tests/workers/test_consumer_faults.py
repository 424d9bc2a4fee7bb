"""A worker's consumer under faults and hostile input, on every pool workers run: it survives a
Redis restart or a broken connection mid-job, never runs a job twice because its connection
broke, sets aside what it cannot decode, and exits non-zero when it must stop.

Every test gets its own redis-server (AOF on) and ``fake`` workers on a private queue. Faults
are real: a redis-server restarted, a loopback proxy (``tests.faults``) between one worker and
its broker that resets and refuses connections, raw entries pushed onto the queue list.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from embedded.redis_server import RedisServer
from producer import Client, Job, JobCancelledError, JobFailedError, Models
from tests.conftest import Worker
from tests.faults import FaultyProxy, restart
from tests.workers.fleet import Fleet
from wire.constants import queue_name
from wire.deadletters import DeadLetter, list_dead, undecodable_id

QUEUE = queue_name("fake", "consumer-faults")
TEMPLATE_QUEUE = queue_name("fake", "consumer-faults-template")  # served by no worker
POOLS = {
    "prefork": ("-P", "prefork", "-c", "2"),
    "threads": ("-P", "threads", "-c", "2"),
    "solo": ("-P", "solo", "-c", "1"),
}


@pytest.fixture
def fleet(server: RedisServer, tmp_path: Path) -> Iterator[Fleet]:
    fleet = Fleet(server, tmp_path, QUEUE, env={"SIBYLQ_CACHE": "false"})
    yield fleet
    fleet.stop()


@pytest.fixture
def producer(fleet: Fleet) -> Iterator[Client]:
    client = fleet.producer(cache=False)
    yield client
    client.close()


@pytest.fixture
def proxy(server: RedisServer) -> Iterator[FaultyProxy]:
    with FaultyProxy(server.port) as proxy:
        yield proxy


def fake(client: Client, delay_s: float, queue: str = QUEUE) -> Any:
    return Models.create(f"fake:delay={delay_s}", client=client, queue=queue)


def expect_alive(fleet: Fleet, worker: Worker, producer: Client) -> None:
    """The same worker process is up, heartbeating, and runs the next job."""
    since = time.time()
    fleet.wait_for("a heartbeat of the same process", lambda: fleet.beats_since(worker, since))
    assert worker.process.poll() is None
    assert fake(producer, 0).call("the next job") == "fake output"
    assert "Unrecoverable error" not in worker.log()


# -- item: a Redis restart or a broken connection mid-job ---------------------------------------


@pytest.mark.parametrize("fault", ["restart", "reset-then-refused"])
@pytest.mark.parametrize("pool", POOLS)
def test_a_broker_outage_mid_job_neither_stops_the_worker_nor_loses_the_job(
    fleet: Fleet,
    producer: Client,
    server: RedisServer,
    proxy: FaultyProxy,
    pool: str,
    fault: str,
) -> None:
    worker = fleet.start(*POOLS[pool], broker=proxy.url() if fault != "restart" else None)
    job: Job[str] = fake(producer, 2).call_async("Redis goes away")
    fleet.wait_for("the job to start", lambda: fleet.started(job.id))

    if fault == "restart":
        restart(server, down_s=0.5)
    else:  # the connection is reset and, for a moment, every reconnect is refused
        proxy.refuse()
        # A solo worker, busy with the job, notices when its ack fails.
        fleet.wait_for(
            "the worker to notice",
            lambda: any(word in worker.log() for word in ("Connection to broker lost", "ack")),
        )
        proxy.heal()

    assert job.result(timeout=60) == "fake output"
    expect_alive(fleet, worker, producer)
    fleet.settle(killed=0)
    assert fleet.executions(job.id) == 1


def test_a_worker_that_stops_on_an_unrecoverable_error_exits_non_zero(fleet: Fleet) -> None:
    worker = fleet.start(*POOLS["threads"])
    with fleet.redis() as client:
        client.set(QUEUE, "not a list")  # a clobbered queue: BRPOP answers WRONGTYPE

    assert worker.process.wait(timeout=30) == 1
    assert "Unrecoverable error" in worker.log()


# -- item: a broken connection does not run a job twice -------------------------------------------


@pytest.mark.parametrize("pool", POOLS)
def test_a_reset_connection_does_not_run_the_running_job_again(
    fleet: Fleet, producer: Client, proxy: FaultyProxy, pool: str
) -> None:
    worker = fleet.start(*POOLS[pool], broker=proxy.url())
    job: Job[str] = fake(producer, 2).call_async("a network blip")
    fleet.wait_for("the job to start", lambda: fleet.started(job.id))
    # Redis stays up: kombu requeues the running job at once, and the reconnected consumer
    # pops it again while the first run goes on.
    proxy.reset()

    waited = job.envelope(timeout=30)
    fleet.settle(killed=0)
    assert fleet.executions(job.id) == 1
    stored = fleet.meta(job.id)
    assert stored is not None and stored["result"] == waited.encode()
    if pool != "solo":  # a solo worker's loop is busy with the job: it pops nothing meanwhile
        assert f"job {job.id} is already running on this worker" in worker.log()
    expect_alive(fleet, worker, producer)


def test_a_held_delivery_runs_the_job_when_the_first_run_dies(
    fleet: Fleet, producer: Client, proxy: FaultyProxy
) -> None:
    worker = fleet.start(*POOLS["prefork"], broker=proxy.url())
    job: Job[str] = fake(producer, 3).call_async("blip, then the OOM killer")
    first = fleet.wait_for("the job to start", lambda: fleet.started(job.id))
    proxy.reset()
    fleet.wait_for(
        "the new delivery to be held",
        lambda: f"job {job.id} is already running on this worker" in worker.log(),
    )

    os.kill(first["pid"], signal.SIGKILL)

    assert job.result(timeout=60) == "fake output"
    assert job.envelope(timeout=5).worker == first["hostname"]
    fleet.settle(killed=1)
    assert fleet.executions(job.id) == 1
    expect_alive(fleet, worker, producer)


# -- items: hostile queue entries end as a dead letter, and a stored failure when they name a job --


def template(client: Client, server: RedisServer) -> dict[str, Any]:
    """A real queue entry as the producer sends it (kombu's envelope around Celery's message)."""
    job_id = fake(client, 0, queue=TEMPLATE_QUEUE).call_async("a template").id
    entry = redis.Redis.from_url(server.url).rpop(TEMPLATE_QUEUE)
    assert entry is not None
    message = dict(json.loads(entry))
    assert message["headers"]["id"] == job_id
    return message


def body_of(message: dict[str, Any]) -> Any:
    return json.loads(base64.b64decode(message["body"]))


def with_body(message: dict[str, Any], body: bytes) -> dict[str, Any]:
    return {**message, "body": base64.b64encode(body).decode()}


def renamed(message: dict[str, Any], job_id: str) -> dict[str, Any]:
    """``message`` as if sent for ``job_id`` to ``QUEUE``, with the parts it has."""
    renamed = dict(message)
    if "headers" in message:
        renamed["headers"] = {**message["headers"], "id": job_id, "root_id": job_id}
    if "properties" in message:
        renamed["properties"] = {**message["properties"], "correlation_id": job_id}
        delivery_info = message["properties"].get("delivery_info")
        if isinstance(delivery_info, dict) and "routing_key" in delivery_info:
            renamed["properties"]["delivery_info"] = {**delivery_info, "routing_key": QUEUE}
    return renamed


def deep_schema(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


def hostile_entries(message: dict[str, Any]) -> dict[str, tuple[bytes, bool]]:
    """Broken variants of a real entry: name -> (raw entry, whether it names its job)."""
    args, kwargs, embed = body_of(message)
    chained = json.dumps([args, kwargs, {**embed, "chain": [{}]}]).encode()

    def entry(changed: dict[str, Any]) -> bytes:
        return json.dumps(changed).encode()

    job = args[0]
    no_id = {
        **message,
        "headers": {k: v for k, v in message["headers"].items() if k != "id"},
        "properties": {k: v for k, v in message["properties"].items() if k != "correlation_id"},
    }
    properties = message["properties"]
    deep: Any = "leaf"
    for _ in range(600):
        deep = [deep]
    return {
        "a JSON object for a body": (entry(with_body(message, b'{"a": 1}')), True),
        "no delivery info": (
            entry({**message, "properties": {**properties, "delivery_info": None}}),
            True,
        ),
        "a delivery info without a routing key": (
            entry({**message, "properties": {**properties, "delivery_info": {"exchange": ""}}}),
            True,
        ),
        "a header nested 600 deep": (
            entry({**message, "headers": {**message["headers"], "x": deep}}),
            True,
        ),
        "a property nested 600 deep": (
            entry({**message, "properties": {**properties, "x": deep}}),
            True,
        ),
        "a body that is not JSON": (entry(with_body(message, b"not json{")), True),
        "no body": (entry({k: v for k, v in message.items() if k != "body"}), True),
        "invalid UTF-8 in the body": (
            entry(with_body(message, json.dumps([args, kwargs, embed]).encode() + b"\xff")),
            True,
        ),
        "no properties": (entry({k: v for k, v in message.items() if k != "properties"}), True),
        "a pickle content type": (
            entry({**message, "content-type": "application/x-python-serialize"}),
            True,
        ),
        "callbacks": (
            entry(with_body(message, chained)),
            True,
        ),
        "no job id": (entry(no_id), False),
        "an entry that is not JSON": (b"\x00not json at all \xff", False),
        "an entry that is a JSON list": (b"[1, 2, 3]", False),
        "a job that is not a job": (
            entry(with_body(message, json.dumps([[{"x": 1}], kwargs, embed]).encode())),
            True,
        ),
        "a schema nested 600 deep": (
            entry(
                with_body(
                    message,
                    json.dumps(
                        [[{**job, "kind": "json", "json_schema": deep_schema(600)}], kwargs, embed]
                    ).encode(),
                )
            ),
            True,
        ),
    }


@pytest.mark.parametrize("pool", POOLS)
def test_hostile_entries_are_set_aside_and_the_worker_goes_on(
    fleet: Fleet, producer: Client, server: RedisServer, pool: str
) -> None:
    message = template(producer, server)
    worker = fleet.start(*POOLS[pool])
    sent: dict[str, tuple[bytes, str | None]] = {}
    for index, (case, (raw, names_job)) in enumerate(hostile_entries(message).items()):
        job_id = f"hostile-{pool}-{index}"
        if names_job:
            raw = json.dumps(renamed(json.loads(raw), job_id)).encode()
        sent[case] = (raw, job_id if names_job else None)
    pushed_at = time.time()
    with fleet.redis() as client:
        for raw, _ in sent.values():
            client.lpush(QUEUE, raw)

    # Whoever waits on a job named by a broken entry gets an error, not an endless wait.
    for case, (_, job_id) in sent.items():
        if job_id is not None:
            with pytest.raises(JobFailedError) as failed:
                Job.from_id(job_id, client=producer, queue=QUEUE).result(timeout=30)
            assert failed.value.remote_type == "ContractError", case
    expect_alive(fleet, worker, producer)
    assert fleet.beats_since(worker, pushed_at)
    fleet.settle(killed=0)

    letters = {letter.job_id: letter for letter in list_dead(fleet.redis(), limit=None)}
    for case, (raw, job_id) in sent.items():
        letter = letters.get(job_id or undecodable_id(raw))
        assert letter is not None, f"no dead letter for {case}"
        assert letter.queue == QUEUE
        assert_kept_as_received(letter, raw, case)


def assert_kept_as_received(letter: DeadLetter, raw: bytes, case: str) -> None:
    assert letter.job is None and letter.message is not None, case
    if case == "a job that is not a job":  # screened as a message, refused as a job
        assert json.loads(letter.message.raw()) == body_of(json.loads(raw))[0][0]
    else:
        assert letter.message.raw() == raw, case


# -- item: a worker runs only the models it serves ------------------------------------------------


@pytest.mark.parametrize(
    ("worker_model", "job_model"), [("openai", "fake:delay=30"), ("fake", "openai:gpt-4o-mini")]
)
def test_a_worker_refuses_a_job_for_a_model_it_does_not_serve(
    fleet: Fleet, producer: Client, worker_model: str, job_model: str
) -> None:
    worker = fleet.start("-c", "2", model=worker_model)
    job = Models.create(job_model, client=producer, queue=QUEUE).call_async("wrong queue")

    with pytest.raises(JobFailedError, match=f"serves {worker_model}, not {job_model}") as failed:
        job.result(timeout=20)
    assert failed.value.remote_type == "ConfigurationError"
    assert worker.process.poll() is None
    assert [letter.job_id for letter in list_dead(fleet.redis())] == [job.id]


# -- item: a job cancelled while no worker is up never runs ---------------------------------------


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_a_job_cancelled_while_no_worker_is_up_never_runs(
    fleet: Fleet, producer: Client, pool: str
) -> None:
    cancelled: Job[str] = fake(producer, 0).call_async("cancelled before any worker came")
    cancelled.cancel()

    with pytest.raises(JobCancelledError):
        cancelled.result(timeout=10)  # at once: no worker needs to hear the cancel

    fleet.start(*POOLS[pool])  # a worker that never heard the cancel pops the job
    assert fake(producer, 0).call("queued after it") == "fake output"
    fleet.settle(killed=0)
    assert fleet.executions(cancelled.id) == 0
    with pytest.raises(JobCancelledError):
        Job.from_id(cancelled.id, client=producer, queue=QUEUE).result(timeout=10)
