"""Blocking waits: each thread keeps one pub/sub connection for all its waits, and a sync call
listens for its job's result from before the job is sent."""

from __future__ import annotations

import threading

from producer import Client, Job, Models
from tests.conftest import Worker, connection_ids


def test_a_thread_waits_for_one_job_after_another_on_one_connection(
    client: Client, fake_worker: Worker
) -> None:
    model = Models.create("fake", client=client)
    url = client.connect().broker_url
    assert url is not None
    model.call("warm up")  # this thread's pub/sub connection is open from now on
    before = set(connection_ids(url, "sibylq-producer"))

    answers = [model.classify(["a", "b"], f"question {i}") for i in range(20)]

    assert answers == ["a"] * 20
    assert set(connection_ids(url, "sibylq-producer")) == before


def test_threads_wait_side_by_side_each_for_its_own_jobs(
    client: Client, fake_worker: Worker
) -> None:
    model = Models.create("fake:delay=0.05", client=client)
    got: dict[int, list[str]] = {}

    def ask(thread: int) -> None:
        got[thread] = [model.call(f"thread {thread} question {i}") for i in range(5)]

    threads = [threading.Thread(target=ask, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert got == {n: ["fake output"] * 5 for n in range(4)}


def test_waiting_on_a_finished_job_by_id_reads_its_stored_result(
    client: Client, fake_worker: Worker
) -> None:
    model = Models.create("fake", client=client)
    done = model.call_async("finished long ago")
    assert done.result(timeout=30) == "fake output"

    again: Job[str] = Job.from_id(done.id, client=client)
    assert again.result(timeout=5) == "fake output"  # published before this wait subscribed
    assert model.call("finished long ago", job_id=done.id, timeout=5) == "fake output"
