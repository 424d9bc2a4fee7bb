"""A handle that has resolved gives its outcome again at once, and the shared listener is right
for any interleaving of repeated and concurrent watches of the same job."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from producer import Client, Envelope, Job, Models
from tests.conftest import Worker
from wire.cache import store_as_result
from wire.contract import Timings, Usage


async def test_a_resolved_handle_awaited_again_answers_at_once(
    client: Client, fake_worker: Worker
) -> None:
    model = Models.create("fake", client=client)
    job = model.classify_async(["only"], "q")

    async def twice() -> list[Any]:
        first = await job
        again = await job
        envelope = await job.envelope_async()
        return [first, again, job.value_of(envelope)]

    assert await asyncio.wait_for(twice(), 30) == ["only"] * 3


async def test_gather_over_the_same_handles_twice(client: Client, fake_worker: Worker) -> None:
    model = Models.create("fake", client=client)
    jobs: list[Any] = [model.classify_async([f"l{i}"], f"q{i}") for i in range(50)]

    async def twice() -> list[Any]:
        return [await asyncio.gather(*jobs), await asyncio.gather(*jobs)]

    expected = [f"l{i}" for i in range(50)]
    assert await asyncio.wait_for(twice(), 30) == [expected, expected]


# -- any interleaving, against the listener alone: results are stored by hand ---------------

JOBS, HANDLES_PER_JOB = 3, 2

Op = tuple[str, Any]  # ("await" | "envelope" | "sync", handle) | ("gather", [handle, ...])

handle_ids = st.integers(0, JOBS * HANDLES_PER_JOB - 1)
ops = st.one_of(
    st.tuples(st.sampled_from(["await", "envelope", "sync", "yield"]), handle_ids),
    st.tuples(st.just("gather"), st.lists(handle_ids, min_size=1, max_size=6)),
)
strands = st.lists(st.lists(ops, min_size=1, max_size=6), min_size=1, max_size=4)
# Where, in the run of the strands, each job's result is stored: loop turns to wait first.
store_delays = st.lists(st.integers(0, 6), min_size=JOBS, max_size=JOBS)


def _envelope(value: str) -> Envelope:
    now = datetime.now(UTC)
    timings = Timings(created_at=now, started_at=now, finished_at=now)
    return Envelope(
        value=value, raw_text=value, finish_reason="stop", usage=Usage(), model="fake",
        worker="test", timings=timings,
    )  # fmt: skip


async def _turns(count: int) -> None:
    for _ in range(count):
        await asyncio.sleep(0)


async def _run_op(op: Op, handles: list[Job[Any]]) -> Any:
    kind, arg = op
    if kind == "await":
        return await handles[arg]
    if kind == "envelope":
        return handles[arg].value_of(await handles[arg].envelope_async())
    if kind == "sync":
        return await asyncio.to_thread(handles[arg].result, 10)
    if kind == "gather":
        return await asyncio.gather(*(handles[i] for i in arg))
    return await _turns(arg)


def _expected(op: Op) -> Any:
    kind, arg = op
    value = lambda i: f"v{i // HANDLES_PER_JOB}"  # noqa: E731
    return {"gather": lambda: [value(i) for i in arg], "yield": lambda: None}.get(
        kind, lambda: value(arg)
    )()


async def _scenario(client: Client, plan: list[list[Op]], delays: list[int]) -> None:
    job_ids = [f"rewait-{uuid.uuid4()}" for _ in range(JOBS)]
    handles = [
        Job.from_id(job_id, client=client) for job_id in job_ids for _ in range(HANDLES_PER_JOB)
    ]

    async def strand(sequence: list[Op]) -> list[Any]:
        return [await _run_op(op, handles) for op in sequence]

    async def store(job: int) -> None:
        await _turns(delays[job])
        await asyncio.to_thread(
            store_as_result, client.redis, job_ids[job], _envelope(f"v{job}"), 60
        )

    try:
        runs = asyncio.gather(*map(strand, plan), *map(store, range(JOBS)))
        results = (await asyncio.wait_for(runs, 20))[: len(plan)]
        assert results == [[_expected(op) for op in sequence] for sequence in plan]
    finally:
        await client.aclose_listener()
        client.forget(job_ids)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=strands, delays=store_delays)
def test_any_interleaving_of_waits_on_the_same_jobs_ends_with_the_right_values(
    client: Client, plan: list[list[Op]], delays: list[int]
) -> None:
    asyncio.run(_scenario(client, plan, delays))
