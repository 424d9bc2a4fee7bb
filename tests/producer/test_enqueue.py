"""Enqueueing rides out Redis outages within SIBYLQ_BROKER_TIMEOUT_S, never queues a job twice,
and fails in time past its budget. The producer talks to Redis through a FaultyProxy; workers
talk to Redis directly, so the faults reach the producer alone."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from embedded.redis_server import RedisServer
from producer import BrokerUnavailableError, Client, Job, Models, Settings
from producer.enqueue import Pause, Push, enqueue_flow, try_timeout_s
from tests.conftest import HEARTBEAT_S, Worker, wait_for
from tests.faults import FaultyProxy, restart
from wire.constants import attempts_key, queue_list_key, queue_name
from wire.contract import JobKind, JobSpec, Message

FAKE = queue_name("fake")


def _client(url: str, budget_s: float = 20.0) -> Client:
    return Client(
        Settings(
            broker_url=url,
            heartbeat_interval_s=HEARTBEAT_S,
            no_worker_timeout_s=0,  # the producer cannot see workers while Redis is cut off
            broker_timeout_s=budget_s,
            cache=False,
        )
    )


def _spec(text: str) -> JobSpec:
    return JobSpec(model="fake", kind=JobKind.TEXT, messages=(Message(role="user", content=text),))


def _deliveries(url: str, job_ids: list[str]) -> list[int]:
    """How many times a worker checked each job in (1: it was delivered once)."""
    admin = redis.Redis.from_url(url)
    try:
        return [int(admin.get(attempts_key(job_id)) or 0) for job_id in job_ids]
    finally:
        admin.close()


def _in_background(*steps: Callable[[], Any] | float) -> threading.Thread:
    """Run ``steps`` in a thread: callables are called, numbers are seconds to wait."""

    def run() -> None:
        for step in steps:
            time.sleep(step) if isinstance(step, float) else step()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _submit_while(thread: threading.Thread, submit: Callable[[int], Job[Any]]) -> list[Job[Any]]:
    """Submit jobs one after another until ``thread`` ends (a fault and its end), and one more."""
    jobs = [submit(0)]
    while thread.is_alive() and len(jobs) < 500:
        jobs.append(submit(len(jobs)))
        time.sleep(0.01)
    jobs.append(submit(len(jobs)))
    return jobs


def _ran_once(url: str, queue: str, jobs: list[Job[Any]]) -> None:
    """Every job finished, and was delivered once: a second queue entry of a job would have
    been checked in (and dropped) by the worker, counting a second delivery."""
    assert [job.result(timeout=60) for job in jobs] == ["fake output"] * len(jobs)
    admin = redis.Redis.from_url(url)
    wait_for("the queue to drain", lambda: admin.llen(queue) == 0)
    admin.close()
    assert _deliveries(url, [job.id for job in jobs]) == [1] * len(jobs)


# -- the flow alone: decisions with a fake clock, no I/O --------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_flow_retries_with_backoff_until_the_budget_then_fails(client: Client) -> None:
    plan = client.plan(_spec("flow"), FAKE, "flow-1", priority=0, once=False)
    clock = _Clock()
    flow = enqueue_flow(plan, clock)
    step = flow.send(None)
    pauses = []
    with pytest.raises(BrokerUnavailableError, match=r"while enqueueing job flow-1"):
        while True:
            assert isinstance(step, Push)
            clock.now += 0.5  # each try times out after half a second
            step = flow.send(redis.ConnectionError("refused"))
            assert isinstance(step, Pause)
            pauses.append(step.seconds)
            clock.now += step.seconds
            step = flow.send(None)
    assert pauses[:3] == [0.05, 0.1, 0.2] and max(pauses) <= 1.0
    assert clock.now >= plan.budget_s


def test_the_flow_retries_the_same_message_and_ends_when_a_try_answers(client: Client) -> None:
    plan = client.plan(_spec("flow"), FAKE, "flow-2", priority=9, once=True)
    flow = enqueue_flow(plan, _Clock())
    first = flow.send(None)
    assert isinstance(first, Push)
    assert isinstance(flow.send(redis.TimeoutError("lost reply")), Pause)
    assert flow.send(None) == first  # same message, same delivery tag
    with pytest.raises(StopIteration) as done:
        flow.send(1)
    assert done.value.value is True


# -- the message -------------------------------------------------------------------------------


def test_the_message_is_the_one_kombu_pushes_for_send_task(
    client: Client, redis_server: RedisServer
) -> None:
    spec = _spec("same message")
    queue = "sibylq.test-message"
    admin = redis.Redis.from_url(redis_server.url)
    admin.delete(queue)
    client.celery.send_task(
        "sibylq.run_job", args=[spec.encode()], task_id="m-1", queue=queue, routing_key=queue,
        argsrepr="<text job for fake>", kwargsrepr="{}",
    )  # fmt: skip
    client.submit(spec, queue, "m-1")
    ours, kombus = (json.loads(raw) for raw in admin.lrange(queue, 0, -1))
    admin.delete(queue)
    for message in (ours, kombus):
        message["body"] = json.loads(base64.b64decode(message["body"]))
        for volatile in ("delivery_tag", "reply_to", "argsrepr", "kwargsrepr"):
            message["properties"].pop(volatile, None)
    assert ours == kombus


def test_a_retried_push_of_the_same_enqueue_queues_the_job_once(
    client: Client, redis_server: RedisServer
) -> None:
    plan = client.plan(_spec("twice"), "sibylq.test-twice", "twice-1", priority=0, once=False)
    assert client.send(plan) and client.send(plan)  # the second: a retry after a lost reply
    admin = redis.Redis.from_url(redis_server.url)
    assert admin.llen(queue_list_key("sibylq.test-twice", 0)) == 1
    again = client.plan(_spec("twice"), "sibylq.test-twice", "twice-1", priority=0, once=False)
    client.send(again)  # a new enqueue of the same id (a dead letter's retry) does queue it
    assert admin.llen("sibylq.test-twice") == 2
    admin.delete("sibylq.test-twice")


# -- faults ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["refuse", "blackhole"])
@pytest.mark.parametrize("window_s", [0.5, 5.0])
def test_a_cut_during_submit_is_ridden_out_and_each_job_runs_once(
    proxy: FaultyProxy, fake_worker: Worker, redis_server: RedisServer, fault: str, window_s: float
) -> None:
    client = _client(proxy.url())
    model = Models.create("fake", client=client)
    cutting = _in_background(0.2, getattr(proxy, fault), window_s, proxy.heal)
    jobs = _submit_while(cutting, lambda n: model.call_async(f"sync {fault} {window_s} {n}"))
    _ran_once(redis_server.url, FAKE, jobs)
    client.close()


@pytest.mark.parametrize("fault", ["refuse", "blackhole"])
async def test_a_cut_during_async_submits_is_ridden_out_and_each_job_runs_once(
    proxy: FaultyProxy, fake_worker: Worker, redis_server: RedisServer, fault: str
) -> None:
    client = _client(proxy.url())
    model = Models.create("fake", client=client)
    getattr(proxy, fault)()
    jobs = [model.call_async(f"async {fault} {n}") for n in range(50)]
    await asyncio.sleep(2.0)
    proxy.heal()
    assert await asyncio.wait_for(asyncio.gather(*jobs), 60) == ["fake output"] * 50
    await asyncio.to_thread(_ran_once, redis_server.url, FAKE, jobs)
    await client.aclose_listener()
    client.close()


def test_a_reply_lost_after_the_push_landed_does_not_queue_the_job_twice(
    proxy: FaultyProxy, redis_server: RedisServer
) -> None:
    queue = "sibylq.test-lost-reply"  # nobody serves it: the queue shows every push
    client = _client(proxy.url(), budget_s=4.0)  # each try waits 1 s at most
    client.submit(_spec("warm up"), queue, "lost-0")  # connected, script loaded
    proxy.delay(0.7)  # the push lands after 0.7 s; its reply would come back after 1.4 s
    _in_background(1.2, proxy.heal)
    started = time.monotonic()
    client.submit(_spec("reply lost"), queue, "lost-1")
    assert time.monotonic() - started > try_timeout_s(4.0)  # the first try timed out
    admin = redis.Redis.from_url(redis_server.url)
    assert [json.loads(raw)["headers"]["id"] for raw in admin.lrange(queue, 0, -1)] == [
        "lost-1",
        "lost-0",
    ]
    admin.delete(queue)
    client.close()


def test_past_the_budget_submit_fails_in_time(proxy: FaultyProxy, fake_worker: Worker) -> None:
    budget_s = 2.0
    client = _client(proxy.url(), budget_s=budget_s)
    model = Models.create("fake", client=client)
    for fault in (proxy.refuse, proxy.blackhole):
        fault()
        started = time.monotonic()
        with pytest.raises(BrokerUnavailableError, match="SIBYLQ_BROKER_TIMEOUT_S=2"):
            model.call_async("never enqueued")
        took = time.monotonic() - started
        assert budget_s <= took < budget_s + try_timeout_s(budget_s) + 1.5, took
        proxy.heal()
    client.close()


async def test_past_the_budget_an_awaited_submit_fails_in_time(
    proxy: FaultyProxy, fake_worker: Worker
) -> None:
    budget_s = 2.0
    client = _client(proxy.url(), budget_s=budget_s)
    model = Models.create("fake", client=client)
    proxy.blackhole()
    started = time.monotonic()
    job = model.call_async("never enqueued")
    assert time.monotonic() - started < 0.5  # the handle comes back at once
    with pytest.raises(BrokerUnavailableError, match="while enqueueing"):
        await job
    took = time.monotonic() - started
    assert budget_s <= took < budget_s + try_timeout_s(budget_s) + 1.5, took
    proxy.heal()
    await client.aclose_listener()
    client.close()


def test_a_redis_restart_during_submit_is_ridden_out(
    tmp_path: Path, worker_env: dict[str, str]
) -> None:
    with RedisServer(tmp_path / "aof", appendonly=True) as server:
        client = _client(server.url)
        model = Models.create("fake", client=client)
        restarting = _in_background(0.2, lambda: restart(server, down_s=1.0))
        jobs = _submit_while(restarting, lambda n: model.call_async(f"restart {n}"))
        # The worker starts after the restart: a worker that was consuming during it can keep
        # a delivery whose ack was lost (a worker-side matter this test is not about).
        env = {**worker_env, "SIBYLQ_BROKER_URL": server.url}
        worker = Worker(["fake", "-c", "4"], env, tmp_path / "worker.log")
        try:
            worker.wait_ready(server.url, FAKE)
            _ran_once(server.url, FAKE, jobs)
        finally:
            client.close()
            worker.stop()


def test_a_job_id_enqueued_once_attaches_after_a_cut(
    proxy: FaultyProxy, fake_worker: Worker, redis_server: RedisServer
) -> None:
    client = _client(proxy.url())
    spec = _spec("once")
    proxy.refuse()
    _in_background(1.0, proxy.heal)
    assert client.submit_once(spec, FAKE, "once-after-cut") is True
    assert client.submit_once(spec, FAKE, "once-after-cut") is False
    assert Job.from_id("once-after-cut", client=client).result(timeout=30) is not None
    assert _deliveries(redis_server.url, ["once-after-cut"]) == [1]
    wait_for("nothing left queued", lambda: redis.Redis.from_url(redis_server.url).llen(FAKE) == 0)
    client.forget(["once-after-cut"])
    client.close()
