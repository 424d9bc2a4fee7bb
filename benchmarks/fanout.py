"""4. Async fan-out: thousands of ``fake`` jobs awaited at once, from one event loop.

Both sides submit the same jobs through the facade (``classify_async``), then wait for all of
them: sibylq with ``asyncio.gather`` over the job handles (one shared pub/sub listener),
the baseline with ``asyncio.gather`` over ``asyncio.to_thread(AsyncResult(id).get)`` (Celery's
blocking wait, on the event loop's default thread pool).

Each run is a fresh client process (``python -m benchmarks.fanout --client ...``), so what it
counts is that client's alone: wall time, its CPU per result (the sampler thread's own CPU
subtracted), and the Redis connections it held: those opened to wait (first seen after the
last job was submitted), all of them, and the most at once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

from producer import Client, Job, Models, Settings
from wire.constants import queue_name

from .bare_celery import create_bare_app
from .env import REPO_ROOT, Cluster, Context, RedisSampler, cpu_s
from .report import Result, Row, Target, alternate, median

NAME = "fanout"
LABELS = ["spam", "ham"]
WORKERS, POOL = 2, "solo"  # solo: the fastest Celery pool for jobs this short
SIDES = ("sibylq", "baseline")


@dataclass(frozen=True)
class FanOut:
    jobs: int
    wall_s: float
    cpu_s: float
    wait_cpu_s: float
    wait_connections: int
    all_connections: int
    peak_connections: int


# -- the client process ------------------------------------------------------------------------


def _waiter(side: str, url: str) -> Callable[[list[Job[Any]]], Awaitable[Any]]:
    if side == "sibylq":
        return lambda jobs: asyncio.gather(*jobs)
    app = create_bare_app(url)
    return lambda jobs: asyncio.gather(
        *(asyncio.to_thread(app.AsyncResult(job.id).get, timeout=600) for job in jobs)
    )


async def _fan_out(side: str, url: str, jobs: int, sampler: RedisSampler) -> FanOut:
    model = Models.create("fake", client=Client(Settings(broker_url=url)))
    wait = _waiter(side, url)
    cpu_start, sampler_start, started = cpu_s(), sampler.cpu_s(), time.perf_counter()
    handles = [model.classify_async(LABELS, f"Is message {serial} spam?") for serial in range(jobs)]
    submitted = sampler.opened | sampler.open_now()
    cpu_submitted, sampler_submitted = cpu_s(), sampler.cpu_s()
    await wait(handles)
    wall = time.perf_counter() - started
    cpu_end, sampler_end = cpu_s(), sampler.cpu_s()
    sampler.sample()
    return FanOut(
        jobs=jobs,
        wall_s=wall,
        cpu_s=(cpu_end - cpu_start) - (sampler_end - sampler_start),
        wait_cpu_s=(cpu_end - cpu_submitted) - (sampler_end - sampler_submitted),
        wait_connections=len(sampler.opened - submitted),
        all_connections=len(sampler.opened),
        peak_connections=sampler.peak,
    )


def client_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fanout")
    parser.add_argument("--client", choices=SIDES, required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--jobs", type=int, required=True)
    args = parser.parse_args(argv)
    with RedisSampler(args.url, args.port) as sampler:
        outcome = asyncio.run(_fan_out(args.client, args.url, args.jobs, sampler))
    print(json.dumps(asdict(outcome)), flush=True)


# -- the benchmark -----------------------------------------------------------------------------


def fan_out(cluster: Cluster, side: str, jobs: int) -> FanOut:
    command = [
        sys.executable, "-m", "benchmarks.fanout", "--client", side,
        "--url", cluster.url, "--port", str(cluster.port), "--jobs", str(jobs),
    ]  # fmt: skip
    done = subprocess.run(
        command, cwd=REPO_ROOT, env=cluster.env(), capture_output=True, text=True, timeout=600
    )
    if done.returncode != 0:
        raise RuntimeError(f"fan-out client ({side}) failed:\n{done.stderr[-3000:]}")
    return FanOut(**json.loads(done.stdout.strip().splitlines()[-1]))


def run(ctx: Context) -> Result:
    # One run per side at 10,000 (about a minute each, bound by the workers), so the whole
    # suite fits its time; the figures compared differ by far more than the noise.
    jobs, small, repeats = ctx.size(10_000, 500), ctx.size(500, 100), 1
    result = Result(
        NAME,
        f"async fan-out, {jobs:,} fake jobs awaited at once",
        sibylq_side="await asyncio.gather(*jobs): one pub/sub listener per event loop",
        baseline_side="await asyncio.gather(*(asyncio.to_thread(AsyncResult(id).get) ...)), "
        "default executor",
        params={
            "jobs": jobs,
            "small": small,
            "repeats": repeats,
            "workers": f"{WORKERS} x sibylq worker fake -P {POOL}",
        },
    )
    with ctx.cluster(NAME) as cluster:
        cluster.start_workers(WORKERS, "fake", "-P", POOL, queue=queue_name("fake"))
        few = {side: fan_out(cluster, side, small) for side in SIDES}
        runs = alternate(repeats, SIDES, lambda side: fan_out(cluster, side, jobs))
    _fill(result, runs, few)
    return result


def _fill(result: Result, runs: dict[str, list[FanOut]], few: dict[str, FanOut]) -> None:
    def row(
        metric: str, unit: str, pick: Callable[[FanOut], float], target: Target | None = None
    ) -> None:
        mine, theirs = (median(pick(run) for run in runs[side]) for side in SIDES)
        result.add(Row(metric, unit, mine, theirs, target))

    jobs, small = runs["sibylq"][0].jobs, few["sibylq"].jobs
    row("wall time", "s", lambda run: run.wall_s)
    row("client CPU per result", "us", lambda run: run.cpu_s / run.jobs * 1e6)
    row("client CPU per result, waiting only", "us", lambda run: run.wait_cpu_s / run.jobs * 1e6)
    at_most_3 = Target("<=", 3, on="sibylq")
    waiting = f"Redis connections opened to wait, {jobs:,} jobs"
    row(waiting, "", lambda run: run.wait_connections, at_most_3)
    result.add(
        Row(
            f"Redis connections opened to wait, {small:,} jobs",
            "",
            few["sibylq"].wait_connections,
            few["baseline"].wait_connections,
            at_most_3,
        )
    )
    row("Redis connections of the client, all", "", lambda run: run.all_connections)
    row("Redis connections of the client, most at once", "", lambda run: run.peak_connections)
    result.samples = {
        "runs": {side: [asdict(run) for run in side_runs] for side, side_runs in runs.items()},
        "small": {side: asdict(run) for side, run in few.items()},
    }


if __name__ == "__main__":
    client_main(sys.argv[1:])
