"""Jobs are never lost and never silently run twice when processes, workers or Redis die, or
when jobs run long.

Every test gets its own redis-server (AOF on) and its own worker subprocesses on a private
queue, so its visibility timeouts and kills reach nothing else. "Executions" are counted from
the workers' logs: Celery logs ``Task sibylq.run_job[<id>] succeeded`` once per run that
finished.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from embedded.redis_server import RedisServer
from producer import BackendError, Client, Job, JobTimeLimitError, Models, Settings
from tests.faults import restart
from tests.workers.fleet import HEARTBEAT_S, Fleet
from wire.constants import queue_name

T = TypeVar("T")

QUEUE = queue_name("fake", "resilience")
#: Kill tests use the default lease (SIBYLQ_VISIBILITY_TIMEOUT_S, 20 s): a re-run within
#: seconds cannot be a lost worker's lease running out.
DEFAULT_LEASE_S: float = Settings.model_fields["visibility_timeout_s"].default
#: The goal: a lost worker's job runs again within 30 s of its last heartbeat, by default.
RECOVERY_GOAL_S = 30
#: The lost worker's job: long enough to be running still when its worker is killed.
LOST_JOB_S = 10
#: The shortest lease the settings allow: four heartbeats.
SHORT_LEASE_S = 4 * HEARTBEAT_S
SHORT_LEASE_ENV = {"SIBYLQ_VISIBILITY_TIMEOUT_S": str(SHORT_LEASE_S)}
LOST_WORKER_ENV = {"SIBYLQ_VISIBILITY_TIMEOUT_S": "4"}
POOL_CHECK_S = 5  # celery.concurrency.asynpool.AsynPool.timers: maintain_pool every 5 s


@pytest.fixture
def fleet(server: RedisServer, tmp_path: Path) -> Iterator[Fleet]:
    fleet = Fleet(server, tmp_path, QUEUE)
    yield fleet
    fleet.stop()


@pytest.fixture
def producer(fleet: Fleet) -> Iterator[Client]:
    client = fleet.producer(no_worker_timeout_s=30.0)
    yield client
    client.close()


def fake(client: Client, delay_s: float) -> Any:
    return Models.create(f"fake:delay={delay_s}", client=client, queue=QUEUE)


def test_a_job_whose_pool_process_dies_runs_again_at_once(fleet: Fleet, producer: Client) -> None:
    worker = fleet.start("-P", "prefork", "-c", "2")
    job: Job[str] = fake(producer, 2).call_async("the OOM killer strikes")
    first = fleet.wait_for("the job to start", lambda: fleet.started(job.id), 20)
    assert first["pid"] != worker.process.pid  # a prefork child, not the worker itself

    os.kill(first["pid"], signal.SIGKILL)
    killed_at = time.time()

    assert job.result(timeout=30) == "fake output"
    rerun = job.envelope(timeout=5).timings.started_at.timestamp()
    # Requeued by task_reject_on_worker_lost (not the 900 s visibility timeout) as soon as
    # the pool notices the death: at once, or at its next 5 s check when the exit races
    # the process sentinel (celery#9588).
    assert killed_at < rerun < killed_at + POOL_CHECK_S + 2
    fleet.settle()
    assert fleet.executions(job.id) == 1
    assert fleet.attempts(job.id) == 2
    assert "exited with 'signal 9 (SIGKILL)'" in worker.log()
    assert worker.process.poll() is None


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_a_lost_workers_job_runs_on_a_live_one_a_lease_after_its_last_heartbeat(
    fleet: Fleet, producer: Client, pool: str
) -> None:
    doomed = fleet.start("-P", pool, "-c", "1")  # the default lease
    job: Job[str] = fake(producer, LOST_JOB_S).call_async("the machine is lost")
    first = fleet.wait_for("the job to start", lambda: fleet.started(job.id), 20)
    assert f"-{doomed.process.pid}@" in first["hostname"]
    survivor = fleet.start("-P", pool, "-c", "1")
    assert fleet.started(job.id) == first  # still running

    os.killpg(doomed.process.pid, signal.SIGKILL)  # the worker and its pool, all at once
    doomed.process.wait(timeout=10)
    last_beat = fleet.last_heartbeat(first["hostname"])

    assert job.result(timeout=RECOVERY_GOAL_S + LOST_JOB_S + 15) == "fake output"
    envelope = job.envelope(timeout=5)
    assert f"-{survivor.process.pid}@" in envelope.worker
    recovery_s = envelope.timings.started_at.timestamp() - last_beat
    print(f"{pool}: ran again {recovery_s:.1f} s after its worker's last heartbeat")
    # Not before the lease ran out (its last renewal and heartbeat are a beat apart at most),
    # and well within the goal, whatever the job's length.
    assert DEFAULT_LEASE_S - 2 * HEARTBEAT_S <= recovery_s < RECOVERY_GOAL_S
    fleet.settle()
    assert fleet.executions(job.id) == 1
    assert fleet.attempts(job.id) == 2
    assert f"requeued job {job.id}: its worker stopped renewing its lease" in survivor.log()


@pytest.mark.parametrize("pool", ["prefork", "threads", "solo"])
def test_a_job_far_longer_than_the_lease_runs_once_on_its_live_worker(
    fleet: Fleet, producer: Client, pool: str
) -> None:
    for _ in range(2):  # another worker, whose sweeps would take the job if they could
        fleet.start("-P", pool, "-c", "1", env=SHORT_LEASE_ENV)
    job: Job[str] = fake(producer, 5 * SHORT_LEASE_S).call_async("a long generation")

    assert job.result(timeout=60) == "fake output"
    fleet.settle()
    assert fleet.attempts(job.id) == 1
    assert fleet.executions(job.id) == 1
    assert "requeued job" not in fleet.logs_text()


def test_a_job_running_through_a_redis_outage_longer_than_the_lease_is_not_requeued(
    fleet: Fleet, producer: Client, server: RedisServer
) -> None:
    for _ in range(3):  # the job's worker, and two whose first sweep could come first
        fleet.start("-P", "prefork", "-c", "1", env=SHORT_LEASE_ENV)
    job: Job[str] = fake(producer, 4 * SHORT_LEASE_S).call_async("Redis goes away")
    fleet.wait_for("the job to start", lambda: fleet.started(job.id), 20)

    # Nobody can renew a lease meanwhile: once Redis is back, the sweeps wait a lease for
    # the live workers to renew theirs.
    restart(server, down_s=2 * SHORT_LEASE_S)

    assert job.result(timeout=60) == "fake output"
    fleet.settle()
    assert fleet.attempts(job.id) == 1
    assert fleet.executions(job.id) == 1
    assert "requeued job" not in fleet.logs_text()


@pytest.mark.parametrize("pool", ["threads", "solo", "prefork"])
def test_a_job_past_its_time_limit_fails_typed_at_the_limit_and_never_runs_again(
    fleet: Fleet, producer: Client, pool: str
) -> None:
    limit_s = 3 * SHORT_LEASE_S / 2  # a lease shorter than the limit, the job longer than both
    env = {**SHORT_LEASE_ENV, "SIBYLQ_JOB_TIME_LIMIT_S": str(limit_s)}
    for _ in range(2):  # another worker, free to take the job if it were requeued
        fleet.start("-P", pool, "-c", "1", env=env)
    job: Job[str] = fake(producer, 4 * limit_s).call_async("a runaway generation")
    fleet.wait_for("the job to start", lambda: fleet.started(job.id), 20)
    started = time.monotonic()

    with pytest.raises(JobTimeLimitError, match=rf"time limit of {limit_s:g} s") as raised:
        job.result(timeout=30)
    failed_after_s = time.monotonic() - started
    print(f"{pool}: failed {failed_after_s:.2f} s after it started (limit {limit_s:g} s)")

    assert "SIBYLQ_JOB_TIME_LIMIT_S" in str(raised.value)
    assert failed_after_s < 4 * limit_s  # at its limit, not at the job's end
    fleet.settle()
    assert fleet.attempts(job.id) == 1
    assert fleet.executions(job.id) == 0
    assert "requeued job" not in fleet.logs_text()


def test_a_redis_restart_loses_and_repeats_nothing(
    fleet: Fleet, producer: Client, server: RedisServer
) -> None:
    for _ in range(2):
        fleet.start("-P", "prefork", "-c", "2")
    model = fake(producer, 1.5)
    before: list[Job[str]] = [model.call_async(f"before {i}") for i in range(8)]
    fleet.wait_for(
        "every pool process to be busy",
        lambda: sum(fleet.started(job.id) is not None for job in before) >= 4,
        20,
    )

    server.stop()
    # The running jobs finish while Redis is down: their results must wait for it, not be lost.
    fleet.wait_for(
        "a result store to wait for Redis",
        lambda: "result Redis unreachable" in fleet.logs_text(),
        20,
    )
    server.start()

    after: list[Job[str]] = [model.call_async(f"after {i}") for i in range(4)]
    jobs = before + after
    assert [job.result(timeout=90) for job in jobs] == ["fake output"] * len(jobs)
    fleet.settle()
    # Nothing is left to redeliver, and each job ran to completion exactly once.
    assert {job.id: fleet.executions(job.id) for job in jobs} == {job.id: 1 for job in jobs}
    assert "Exception raised outside body" not in fleet.logs_text()


def test_a_job_redelivered_after_it_finished_is_not_run_again(
    fleet: Fleet, producer: Client
) -> None:
    fleet.start("-P", "prefork", "-c", "1")
    job: Job[str] = fake(producer, 2).call_async("a network blip")
    fleet.wait_for("the job to start", lambda: fleet.started(job.id), 20)
    # Cut the worker's connections while Redis stays up: kombu's Redis transport requeues
    # the unacked messages of the channel it closes, so the running job is delivered again.
    with fleet.redis() as client:
        spared = {"sibylq-producer", "sibylq-listener"}
        ours = client.client_id()
        for conn in client.client_list():
            if conn["id"] != ours and conn.get("name") not in spared:
                client.client_kill_filter(_id=conn["id"])

    assert job.result(timeout=30) == "fake output"
    fleet.wait_for(
        "the second delivery to be dropped",
        lambda: f"job {job.id} already finished (SUCCESS)" in fleet.logs_text(),
        30,
    )
    fleet.settle()
    assert fleet.executions(job.id) == 1
    assert fleet.attempts(job.id) == 2


def test_a_job_that_kills_its_process_every_time_fails_typed(
    fleet: Fleet, producer: Client
) -> None:
    worker = fleet.start("-P", "prefork", "-c", "2")  # SIBYLQ_MAX_DELIVERIES: default 3
    job: Job[str] = fake(producer, 30).call_async("SIGILL in a native library")
    killed: set[int] = set()
    for delivery in (1, 2, 3):
        run = fleet.wait_for(
            f"delivery {delivery} to start",
            lambda: fleet.started(job.id, not_pids=frozenset(killed)),
            20,
        )
        assert fleet.attempts(job.id) == delivery
        os.kill(run["pid"], signal.SIGKILL)
        killed.add(run["pid"])

    with pytest.raises(BackendError, match=f"job {job.id} was delivered 3 times"):
        job.result(timeout=30)
    fleet.settle()
    assert fleet.attempts(job.id) == 4
    assert fleet.executions(job.id) == 0
    assert worker.process.poll() is None
    assert fake(producer, 0).call("and the next job") == "fake output"


async def test_a_labeling_run_survives_killed_processes_and_workers(
    fleet: Fleet, producer: Client, tmp_path: Path
) -> None:
    import asyncio
    from collections import Counter

    from producer.labeling import label_file, make_task
    from producer.labeling.progress import NoProgress

    survivor = fleet.start("-P", "prefork", "-c", "2", env=LOST_WORKER_ENV)
    doomed = fleet.start("-P", "prefork", "-c", "2", env=LOST_WORKER_ENV)
    rows = tmp_path / "in.jsonl"
    rows.write_text("".join(json.dumps({"id": i, "text": f"sms {i}"}) + "\n" for i in range(40)))
    out = tmp_path / "out.jsonl"
    task = make_task(fake(producer, 0.3), prompt="{text}", classify=["spam", "ham"])
    run = asyncio.ensure_future(label_file(task, rows, out, progress=NoProgress(), max_in_flight=8))

    def written() -> int:
        return len(out.read_text().splitlines()) if out.exists() else 0

    while written() < 6:
        await asyncio.sleep(0.05)
    os.kill(survivor.children()[0], signal.SIGKILL)  # a process dies mid-job
    while written() < 14:
        await asyncio.sleep(0.05)
    os.killpg(doomed.process.pid, signal.SIGKILL)  # a whole machine is lost

    summary = await asyncio.wait_for(run, timeout=120)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert Counter(r["key"] for r in records) == Counter(range(40))
    assert {r["status"] for r in records} == {"done"}
    assert (summary.done, summary.failed) == (40, 0)
