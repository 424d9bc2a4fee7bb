"""``sibylq worker --processes N``: N worker processes that share the concurrency and live and
die together."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from producer import Client, JobStatus, Models
from tests.conftest import Worker, wait_for
from wire.constants import queue_name, workers_key
from workers.supervisor import split_concurrency

QUEUE = queue_name("fake", "supervised")


@pytest.mark.parametrize(
    ("total", "processes", "shares"),
    [(64, 2, [32, 32]), (5, 2, [3, 2]), (1, 3, [1, 1, 1]), (8, 1, [8])],
)
def test_the_concurrency_is_shared_evenly_with_at_least_one_each(
    total: int, processes: int, shares: list[int]
) -> None:
    assert split_concurrency(total, processes) == shares


def _gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()


def _live_workers(url: str, queue: str) -> int:
    with redis.Redis.from_url(url) as client:
        return int(client.zcount(workers_key(queue), time.time() - 2, "+inf"))


def _wait_both_beating(url: str, queue: str) -> None:
    wait_for("both processes' heartbeats", lambda: _live_workers(url, queue) == 2, 30)


def _two_processes(queue: str, env: dict[str, str], tmp_path: Path) -> Worker:
    """``sibylq worker fake --processes 2`` on ``queue``, once both processes beat."""
    worker = Worker(["fake", "--processes", "2", "-c", "2", "-Q", queue], env, tmp_path / "w.log")
    _wait_both_beating(env["SIBYLQ_BROKER_URL"], queue)
    return worker


def test_two_processes_each_take_half_the_concurrency_and_share_the_jobs(
    client: Client, start_worker: Callable[..., Worker]
) -> None:
    worker = start_worker("fake", "--processes", "2", "-c", "4", "-Q", QUEUE, queue=QUEUE)
    url = client.connect().broker_url
    assert url is not None
    _wait_both_beating(url, QUEUE)
    assert len(worker.children()) == 2
    assert worker.log().count("concurrency: 2 (thread)") == 2

    model = Models.create("fake:delay=0.3", client=client, queue=QUEUE)
    jobs = [model.call_async(f"job {i}") for i in range(8)]
    by_worker = Counter(job.envelope(timeout=30).worker for job in jobs)
    assert len(by_worker) == 2, by_worker


def test_a_signal_to_the_supervisor_stops_every_process_warmly(
    client: Client, worker_env: dict[str, str], tmp_path: Path
) -> None:
    queue = queue_name("fake", "supervised-stop")
    worker = _two_processes(queue, worker_env, tmp_path)
    children = worker.children()
    job = Models.create("fake:delay=1", client=client, queue=queue).call_async("finish me")
    wait_for("the job to start", lambda: job.status() == JobStatus.STARTED, 10)

    os.kill(worker.process.pid, signal.SIGTERM)  # the supervisor alone, not its group

    assert worker.process.wait(timeout=30) == 0
    assert job.result(timeout=5) == "fake output"  # warm: the running job finished first
    assert all(_gone(pid) for pid in children)
    worker.stop()


def test_when_one_process_dies_the_others_stop_and_the_worker_exits_with_its_code(
    worker_env: dict[str, str], tmp_path: Path
) -> None:
    queue = queue_name("fake", "supervised-crash")
    worker = _two_processes(queue, worker_env, tmp_path)
    first, second = worker.children()

    os.kill(first, signal.SIGKILL)

    assert worker.process.wait(timeout=30) == 128 + signal.SIGKILL  # as a shell reports it
    assert _gone(second)
    assert "stopping the others" in worker.log()
    worker.stop()


def test_processes_are_refused_for_a_prefork_pool_with_a_clear_error(
    worker_env: dict[str, str],
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "sibylq", "worker", "fake", "-P", "prefork", "--processes",
         "2"],
        env=worker_env,
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert "--processes is for threads pools" in done.stderr
