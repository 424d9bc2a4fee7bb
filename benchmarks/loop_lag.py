"""7. Event-loop lag: how late an asyncio loop runs its callbacks while it submits jobs.

A web backend's loop serves many requests at once: ``jobs`` requests arrive one per loop turn,
and each submits a ``fake`` job with ``classify_async`` and awaits it, while a probe task sleeps
1 ms at a time and records how late it wakes (the loop's lag). sibylq enqueues on the
loop with asyncio I/O; the baseline is the same handlers enqueueing with a blocking call on the
loop (``Client.submit``, what ``_async`` twins did before), then awaiting the same handle.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

from producer import Client, Job, Model, Models
from wire.constants import queue_name
from wire.contract import JobKind, JobSpec, Message

from .env import Context
from .report import Result, Row, Target, alternate, median, percentile

NAME = "loop_lag"
LABELS = ["spam", "ham"]
SIDES = ("sibylq", "baseline")
PROBE_INTERVAL_S = 0.001

_serial = itertools.count()


class LagProbe:
    """Samples an event loop's lag: how late a task sleeping ``interval_s`` wakes up, and the
    CPU time the loop's thread spent meanwhile (what the lag would be on an idle machine,
    less any blocking waits: on a busy one, the lag is mostly other processes' turns)."""

    def __init__(self, interval_s: float = PROBE_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self.lags_s: list[float] = []
        self.busy_s: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> LagProbe:
        self._task = asyncio.create_task(self._run())
        await asyncio.sleep(0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            before, cpu_before = time.perf_counter(), time.thread_time()
            await asyncio.sleep(self.interval_s)
            self.lags_s.append(time.perf_counter() - before - self.interval_s)
            self.busy_s.append(time.thread_time() - cpu_before)

    @property
    def max_s(self) -> float:
        return max(self.lags_s, default=0.0)


async def _handle(side: str, model: Model) -> Any:
    """One request: submit a job and await its value."""
    text = f"Is message {next(_serial)} spam?"
    if side == "sibylq":
        return await model.classify_async(LABELS, text)
    message = Message(role="user", content=text)
    spec = JobSpec(model=str(model.ref), kind=JobKind.CLASSIFY, messages=(message,))
    job_id = model.client.submit(spec, model.queue)  # blocks the loop for its round trips
    return await Job.from_id(job_id, client=model.client)


async def _probe(side: str, model: Model, jobs: int) -> LagProbe:
    """The loop's lags while ``jobs`` requests arrive one by one (a loop turn apart)."""
    async with LagProbe() as probe:
        handling = []
        for _ in range(jobs):
            handling.append(asyncio.ensure_future(_handle(side, model)))
            await asyncio.sleep(0)
        await asyncio.gather(*handling)
    await model.client.aclose_listener()
    return probe


def run(ctx: Context) -> Result:
    jobs, repeats = ctx.size(1000, 200), ctx.size(3, 1)
    result = Result(
        NAME,
        f"event-loop lag while {jobs} request handlers each submit and await a fake job",
        sibylq_side="`await model.classify_async(...)` x jobs, gathered; sibylq worker fake -c 8",
        baseline_side="the same handlers enqueueing with a blocking Client.submit() on the loop "
        "(as the _async twins did before), then awaiting the handle",
        params={"jobs": jobs, "repeats": repeats, "probe_interval_s": PROBE_INTERVAL_S},
    )
    with ctx.cluster(NAME) as cluster:
        cluster.start_worker("fake", "-c", "8", queue=queue_name("fake"))
        model = Models.create("fake", client=Client(cluster.settings()))
        asyncio.run(_probe("sibylq", model, 20))  # warm up: connections
        probes = alternate(repeats, SIDES, lambda side: asyncio.run(_probe(side, model, jobs)))
        model.client.close()
    for label, q in (("p50", 50.0), ("p99", 99.0), ("max", 100.0)):
        lag = {side: median(percentile(p.lags_s, q) * 1000 for p in probes[side]) for side in SIDES}
        target = Target("<=", 5.0, on="sibylq") if label == "p99" else None
        result.add(Row(f"loop lag {label}", "ms", lag["sibylq"], lag["baseline"], target))
    busy = {side: median(percentile(p.busy_s, 99.0) * 1000 for p in probes[side]) for side in SIDES}
    result.add(Row("loop CPU per probe turn p99", "ms", busy["sibylq"], busy["baseline"]))
    result.notes.append(
        "lag is wall time, so on a busy machine it is mostly other processes' turns on the CPU; "
        "CPU per turn is the loop's own work between two probe turns (blocking waits excluded)"
    )
    result.samples = {
        side: [
            {
                "turns": len(p.lags_s),
                "max_lag_ms": p.max_s * 1000,
                "max_busy_ms": max(p.busy_s) * 1000,
            }
            for p in probes[side]
        ]
        for side in SIDES
    }
    return result
