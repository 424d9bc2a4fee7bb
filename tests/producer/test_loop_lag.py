"""Issue 11, item 13: a loop that submits 1,000 jobs stays responsive. Request handlers arrive
one per loop turn, each submitting a ``fake`` job with ``classify_async`` and awaiting it, while
a probe sleeps 1 ms at a time and records how late it wakes (``benchmarks.loop_lag``'s probe).

The wall-clock lag on a shared 2-core machine is mostly other processes' turns on the CPU (the
worker running the same 1,000 jobs among them), so the test asserts the loop's own share: the
CPU its thread spent between two probe turns, p99 under 5 ms. Blocking waits spend no CPU, and
on a local Redis they are short: the test records every blocking (redis-py, kombu) Redis round
trip made on the loop's thread, and there must be none. ``tests/producer/test_loop.py`` shows
the loop ticking through a slow Redis and the embedded cluster's first start."""

from __future__ import annotations

import asyncio
import itertools
import threading
from typing import Any

import pytest
from redis.connection import AbstractConnection

from benchmarks.loop_lag import LagProbe
from benchmarks.report import percentile
from producer import Client, Model, Models
from tests.conftest import Worker

JOBS = 1000
LABELS = ["spam", "ham"]
#: The issue's goal for the loop's lag, p99.
GOAL_P99_S = 0.005
#: A sanity bound on the wall-clock lag (a busy shared machine's), far above the goal.
WALL_P99_BOUND_S = 0.25

_serial = itertools.count()


async def _handle(model: Model) -> Any:
    return await model.classify_async(LABELS, f"Is message {next(_serial)} spam?")


async def _probe(model: Model, jobs: int) -> tuple[LagProbe, list[Any]]:
    async with LagProbe(interval_s=0.001) as probe:
        handling = []
        for _ in range(jobs):
            handling.append(asyncio.ensure_future(_handle(model)))
            await asyncio.sleep(0)
        values = await asyncio.wait_for(asyncio.gather(*handling), 300)
    await model.client.aclose_listener()
    return probe, values


async def test_the_loop_stays_responsive_while_it_submits_1000_jobs(
    client: Client, fake_worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = Models.create("fake", client=client)
    await _probe(model, 20)  # warm up: connections, scripts, the listener
    loop_thread = threading.get_ident()
    blocking: list[str] = []
    send: Any = AbstractConnection.send_packed_command

    def recording_send(self: AbstractConnection, command: Any, check_health: bool = True) -> None:
        if threading.get_ident() == loop_thread:
            blocking.append(repr(command)[:80])
        send(self, command, check_health)

    monkeypatch.setattr(AbstractConnection, "send_packed_command", recording_send)
    probe, values = await _probe(model, JOBS)
    monkeypatch.undo()

    assert len(values) == JOBS and set(values) <= set(LABELS)
    wall_p50, wall_p99 = (percentile(probe.lags_s, q) for q in (50.0, 99.0))
    cpu_p99 = percentile(probe.busy_s, 99.0)
    print(
        f"loop lag over {len(probe.lags_s)} probe turns while submitting {JOBS} jobs: "
        f"wall p50 {wall_p50 * 1000:.2f} ms, p99 {wall_p99 * 1000:.2f} ms, "
        f"max {probe.max_s * 1000:.1f} ms; loop CPU per turn p99 {cpu_p99 * 1000:.2f} ms"
    )
    assert blocking == [], f"{len(blocking)} blocking Redis calls on the loop: {blocking[:3]}"
    assert len(probe.lags_s) >= 100  # the probe did turn throughout
    assert cpu_p99 < GOAL_P99_S, cpu_p99
    assert wall_p99 < WALL_P99_BOUND_S, wall_p99
