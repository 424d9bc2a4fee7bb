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
import re
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from embedded.redis_server import RedisServer
from producer import Client, Job, JobFailedError, Models, Settings
from tests.conftest import Worker, wait_for
from tests.faults import FaultyProxy, restart
from wire.constants import TASK_NAME, queue_name, result_key, workers_key
from wire.deadletters import DeadLetter, list_dead, undecodable_id

QUEUE = queue_name("fake", "consumer-faults")
TEMPLATE_QUEUE = queue_name("fake", "consumer-faults-template")  # served by no worker
HEARTBEAT_S = 0.5
#: How Celery logs the end of a delivery: the job ran, was dropped, or failed.
_ENDED = ("succeeded", "ignored", "raised")
POOLS = {
    "prefork": ("-P", "prefork", "-c", "2"),
    "threads": ("-P", "threads", "-c", "2"),
    "solo": ("-P", "solo", "-c", "1"),
}


class Fleet:
    """The test's workers (each may reach its broker through a proxy), and their logs."""

    def __init__(self, server: RedisServer, logs: Path) -> None:
        self.server = server
        self.logs = logs
        self.workers: list[Worker] = []

    def start(self, *args: str, broker: str | None = None, model: str = "fake") -> Worker:
        env = {
            **os.environ,
            "SIBYLQ_BROKER_URL": broker or self.server.url,
            "SIBYLQ_RESULT_BACKEND": self.server.url,
            "SIBYLQ_HEARTBEAT_INTERVAL_S": str(HEARTBEAT_S),
            "SIBYLQ_CACHE": "false",
            "PYTHONUNBUFFERED": "1",
        }
        log_path = self.logs / f"worker-{len(self.workers)}.log"
        worker = Worker([model, "-Q", QUEUE, *args], env, log_path)
        self.workers.append(worker)
        return worker.wait_ready(self.server.url, QUEUE)

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.server.url, socket_connect_timeout=2)

    def logs_text(self) -> str:
        return "\n".join(worker.log() for worker in self.workers)

    def executions(self, job_id: str) -> int:
        return len(re.findall(re.escape(f"Task {TASK_NAME}[{job_id}] succeeded"), self.logs_text()))

    def meta(self, job_id: str) -> dict[str, Any] | None:
        with self.redis() as client:
            raw = client.get(result_key(job_id))
        return None if raw is None else dict(json.loads(raw))

    def started(self, job_id: str) -> Any:
        meta = self.meta(job_id)
        return meta["result"] if meta is not None and meta["status"] == "STARTED" else None

    def wait_for(self, what: str, probe: Callable[[], Any], timeout_s: float = 30) -> Any:
        return wait_for(what, probe, timeout_s, detail=lambda: self.logs_text()[-6000:])

    def beats_since(self, worker: Worker, since: float) -> bool:
        """Whether ``worker`` (the same process) has stamped its heartbeat after ``since``."""
        with self.redis() as client:
            beats = client.zrange(workers_key(QUEUE), 0, -1, withscores=True)
        mine = [at for name, at in beats if f"-{worker.process.pid}@" in name.decode()]
        return bool(mine) and mine[0] > since

    def unfinished_deliveries(self) -> Counter[str]:
        """Per job id, deliveries received and not yet ended (ran, ignored or failed), from
        Celery's log lines."""
        events = re.findall(rf"Task {re.escape(TASK_NAME)}\[([^\]]+)\] (\w+)", self.logs_text())
        received = Counter(job_id for job_id, what in events if what == "received")
        ended = Counter(job_id for job_id, what in events if what in _ENDED)
        return received - ended

    def settle(self, killed: int = 0) -> None:
        """Every job acknowledged, none queued, and every delivery ended but the ``killed``
        ones (their process died: Celery logs no end for them): nothing can run again. (An
        acknowledgement by a first run can also remove the index entry of a second delivery of
        the same message: kombu's delivery tag is the message's.)"""
        with self.redis() as client:
            self.wait_for(
                "every job to be acknowledged and every delivery to end",
                lambda: (
                    client.hlen("unacked") == 0
                    and client.llen(QUEUE) == 0
                    and self.unfinished_deliveries().total() == killed
                ),
            )

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis", appendonly=True) as started:
        yield started


@pytest.fixture
def fleet(server: RedisServer, tmp_path: Path) -> Iterator[Fleet]:
    fleet = Fleet(server, tmp_path)
    yield fleet
    fleet.stop()


@pytest.fixture
def producer(server: RedisServer) -> Iterator[Client]:
    client = Client(
        Settings(
            broker_url=server.url,
            heartbeat_interval_s=HEARTBEAT_S,
            no_worker_timeout_s=60.0,
            broker_timeout_s=60.0,
            cache=False,
        )
    )
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
    fleet.settle()
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
    fleet.settle()
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
        delivery_info = {**message["properties"]["delivery_info"], "routing_key": QUEUE}
        renamed["properties"] = {
            **message["properties"],
            "correlation_id": job_id,
            "delivery_info": delivery_info,
        }
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
    return {
        "a JSON object for a body": (entry(with_body(message, b'{"a": 1}')), True),
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
    fleet.settle()

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
