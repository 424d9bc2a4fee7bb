"""Lanes: an interactive job is served ahead of bulk work waiting on the same workers."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from producer import Models
from producer.client import Client
from producer.job import JobStatus
from tests.conftest import Worker
from wire.errors import InvalidRequestError

QUEUE = "sibylq.test-lanes"


def test_an_interactive_job_overtakes_queued_bulk_jobs(
    client: Client, start_worker: Callable[..., Worker]
) -> None:
    start_worker("fake", "-c", "1", "-Q", QUEUE, queue=QUEUE)
    bulk = Models.create("fake:delay=0.2", client=client, queue=QUEUE, lane="bulk")
    interactive = Models.create("fake:delay=0.2", client=client, queue=QUEUE)
    backlog = [bulk.extract_async(int, f"bulk row {n}") for n in range(15)]

    interactive.extract(int, "a user is waiting", timeout=30)
    bulk_done = sum(job.status() == JobStatus.SUCCESS for job in backlog)

    # At most the bulk job running when it arrived (and one already fetched) went first.
    assert bulk_done <= 2
    assert all(isinstance(job.result(timeout=30), int) for job in backlog)


def test_a_job_can_pick_its_lane(client: Client, start_worker: Callable[..., Worker]) -> None:
    model = Models.create("fake", client=client, queue="sibylq.fake")

    assert model.lane == "interactive"
    with pytest.raises(InvalidRequestError, match="lane must be one of"):
        model.extract_async(int, "x", lane="urgent")
    with pytest.raises(InvalidRequestError, match="lane must be one of"):
        Models.create("fake", client=client, lane="fast")  # type: ignore[arg-type]
