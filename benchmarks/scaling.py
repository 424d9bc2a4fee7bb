"""6. Scaling: throughput with 1, 2, 4 and 8 ``fake:delay=0.2`` workers of concurrency one.

Workers are added between measurements (1, then 1 more, 2 more, 4 more), each a ``sibylq
worker fake -c 1`` process. A measurement submits ``per_worker * N`` jobs at once and awaits
them all; the baseline is linear scaling of the one-worker figure (N times it), and the
target is at least 0.9 of it. The ideal, with no overhead at all, is N / 0.2 s.
"""

from __future__ import annotations

import asyncio
import itertools
import time

from producer import Client, Model, Models
from wire.constants import queue_name

from .env import Context
from .report import Result, Row, Target, median

NAME = "scaling"
DELAY_S = 0.2
LEVELS = (1, 2, 4, 8)

_serial = itertools.count()


def rate(model: Model, jobs: int) -> float:
    """Jobs per second of ``jobs`` submitted at once, all awaited."""

    async def burst() -> None:
        handles = [
            model.classify_async(["spam", "ham"], f"msg {next(_serial)}") for _ in range(jobs)
        ]
        await asyncio.gather(*handles)
        await model.client.aclose_listener()

    started = time.perf_counter()
    asyncio.run(burst())
    return jobs / (time.perf_counter() - started)


def run(ctx: Context) -> Result:
    levels = LEVELS[:2] if ctx.quick else LEVELS
    per_worker, repeats = ctx.size(10, 4), ctx.size(2, 1)
    result = Result(
        NAME,
        f"scaling, fake:delay={DELAY_S} on concurrency-one workers",
        sibylq_side="N x `sibylq worker fake -c 1` (threads pool), facade classify_async + gather",
        baseline_side="linear: N x the one-worker throughput measured in this run",
        params={"levels": levels, "jobs_per_worker": per_worker, "repeats": repeats},
    )
    rates: dict[int, list[float]] = {}
    with ctx.cluster(NAME) as cluster:
        client = Client(cluster.settings())
        model = Models.create(f"fake:delay={DELAY_S}", client=client)
        running = 0
        for level in levels:
            cluster.start_workers(level - running, "fake", "-c", "1", queue=queue_name("fake"))
            running = level
            rate(model, level)  # warm up the new workers
            rates[level] = [rate(model, per_worker * level) for _ in range(repeats)]
        client.close()
    one = median(rates[levels[0]])
    for level in levels:
        result.add(
            Row(
                f"throughput, {level} worker{'s' if level > 1 else ''}",
                "jobs/s",
                median(rates[level]),
                level * one,
                Target(">=", 0.9) if level > 1 else None,
            )
        )
    result.notes.append(
        f"ideal (no overhead): N / {DELAY_S} s = "
        + ", ".join(f"{n / DELAY_S:.0f}" for n in levels)
        + " jobs/s"
    )
    result.samples = {"throughput_jobs_s": {str(level): rates[level] for level in levels}}
    return result
