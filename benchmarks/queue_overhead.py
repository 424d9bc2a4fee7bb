"""1. Queue overhead: round trips of ``fake`` jobs through the facade against bare Celery.

Latency: one job at a time, ``model.classify(...)`` (enqueue, then a blocking wait), and
``await model.classify_async(...)`` in one event loop, against ``send_task(...).get()`` of a
no-op task. Throughput: a burst of jobs submitted at once,
awaited with ``asyncio.gather`` (the facade) against ``get()`` on each ``AsyncResult`` in turn
(faster here than ``ResultSet.join_native()``, which adds about half a second to a burst).
Both workers run on the same Redis with a threads pool of 8.
"""

from __future__ import annotations

import asyncio
import itertools
import time

from producer import Client, Model, Models
from wire.constants import queue_name

from .bare_celery import BareClient
from .env import Context
from .report import Result, Row, Target, alternate, median, percentile

NAME = "queue_overhead"
LABELS = ["spam", "ham"]
POOL, CONCURRENCY = "threads", 8
#: sibylq's blocking ``classify()``, ``await classify_async()``, bare Celery.
LATENCY_SIDES = ("sibylq", "await", "baseline")

_serial = itertools.count()


def _text() -> str:
    """A distinct prompt per job."""
    return f"Is message {next(_serial)} spam?"


class Sides:
    """The two ways of running one job, and of running a burst of them."""

    def __init__(self, model: Model, bare: BareClient) -> None:
        self.model = model
        self.bare = bare

    def round_trips(self, side: str, trips: int) -> list[float]:
        """Seconds of each of ``trips`` jobs run one after the other."""
        if side == "await":
            return asyncio.run(self._awaited(trips))
        seconds = []
        for _ in range(trips):
            started = time.perf_counter()
            if side == "sibylq":
                self.model.classify(LABELS, _text())
            else:
                self.bare.noop(_text()).get()
            seconds.append(time.perf_counter() - started)
        return seconds

    async def _awaited(self, trips: int) -> list[float]:
        seconds = []
        for _ in range(trips):
            started = time.perf_counter()
            await self.model.classify_async(LABELS, _text())
            seconds.append(time.perf_counter() - started)
        await self.model.client.aclose_listener()
        return seconds

    def burst(self, side: str, jobs: int) -> float:
        """Jobs per second of ``jobs`` submitted at once and all waited for."""
        started = time.perf_counter()
        if side == "sibylq":
            asyncio.run(self._facade_burst(jobs))
        else:
            for handle in [self.bare.noop(_text()) for _ in range(jobs)]:
                handle.get()
        return jobs / (time.perf_counter() - started)

    async def _facade_burst(self, jobs: int) -> None:
        handles = [self.model.classify_async(LABELS, _text()) for _ in range(jobs)]
        await asyncio.gather(*handles)
        await self.model.client.aclose_listener()


def run(ctx: Context) -> Result:
    trips, burst, repeats = ctx.size(200, 30), ctx.size(500, 100), ctx.size(3, 1)
    result = Result(
        NAME,
        "queue overhead, fake jobs vs bare Celery no-op",
        sibylq_side=f"Models.create('fake').classify() / classify_async(); sibylq worker fake "
        f"-P {POOL} -c {CONCURRENCY}",
        baseline_side="bare Celery send_task(no-op).get(), a burst: get() on each in turn; "
        f"celery worker -P {POOL} -c {CONCURRENCY}, JSON, acks_late, prefetch 1, same Redis",
        params={"round_trips": trips, "burst_jobs": burst, "repeats": repeats},
    )
    with ctx.cluster(NAME) as cluster:
        cluster.start_worker("fake", "-P", POOL, "-c", str(CONCURRENCY), queue=queue_name("fake"))
        cluster.start_bare_worker(POOL, CONCURRENCY)
        client = Client(cluster.settings())
        with BareClient(cluster.url) as bare:
            sides = Sides(Models.create("fake", client=client), bare)
            for side in LATENCY_SIDES:  # warm up: connections, imports, caches
                sides.round_trips(side, 20)
            for side in ("sibylq", "baseline"):
                sides.burst(side, 50)
            latencies = alternate(
                repeats, LATENCY_SIDES, lambda side: sides.round_trips(side, trips)
            )
            rates = alternate(
                repeats, ("sibylq", "baseline"), lambda side: sides.burst(side, burst)
            )
        client.close()
    _fill(result, latencies, rates)
    return result


def _fill(
    result: Result, latencies: dict[str, list[list[float]]], rates: dict[str, list[float]]
) -> None:
    def stat(side: str, q: float) -> float:
        return median(percentile(series, q) * 1000 for series in latencies[side])

    result.add(
        Row("round trip p50", "ms", stat("sibylq", 50), stat("baseline", 50), Target("<=", 1.2))
    )
    result.add(Row("round trip p99", "ms", stat("sibylq", 99), stat("baseline", 99)))
    result.add(Row("round trip p50, await", "ms", stat("await", 50), stat("baseline", 50)))
    result.add(Row("round trip p99, await", "ms", stat("await", 99), stat("baseline", 99)))
    result.add(
        Row("burst throughput", "jobs/s", median(rates["sibylq"]), median(rates["baseline"]))
    )
    result.samples = {
        "p50_ms": {
            side: [percentile(s, 50) * 1000 for s in runs] for side, runs in latencies.items()
        },
        "p99_ms": {
            side: [percentile(s, 99) * 1000 for s in runs] for side, runs in latencies.items()
        },
        "throughput_jobs_s": rates,
    }
