"""2. Remote concurrency: one remote-API worker against a plain asyncio script, on one stub.

The OpenAI-compatible stub (its own process) answers every request after a fixed 250 ms
(model ``stub-slow-250``). sibylq: one ``sibylq worker openai -c N --processes 2`` (N threads
over two processes, one per core) and the facade, text jobs (``call_async``) submitted at once
and awaited with ``asyncio.gather``. Baseline: a process of its own with ``AsyncOpenAI`` and
``asyncio.Semaphore(N)``, sending the same requests. Each measurement is ``rounds * N``
requests, at most ``MAX_REQUESTS`` (the 2 cores saturate well below N=256's ideal of 1,024
requests/s: more requests would only take longer).

At N=64 the same worker on one process is measured too: a threads-pool worker runs the SDK's
and Celery's per-request Python under one GIL (~6 ms of CPU a request here, against ~3 ms for
the asyncio script), so one process tops out near one core's worth of requests.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable
from types import TracebackType

from producer import Client, JobFailedError, Model, Models
from wire.constants import queue_list_keys, queue_name

from .env import REPO_ROOT, Cluster, Context, Process
from .report import Result, Row, Target, alternate, median

NAME = "remote"
STUB_MODEL = "stub-slow-250"
LATENCY_S = 0.25
TARGET_AT = 64
MAX_REQUESTS = 512
PROCESSES = 2
ONE_PROCESS = "sibylq, one process"

_serial = itertools.count()


class AsyncioBaseline:
    """``benchmarks.asyncio_baseline`` in a process of its own, driven over stdin/stdout."""

    def __init__(self, cluster: Cluster, base_url: str, concurrency: int) -> None:
        command = [
            sys.executable, "-m", "benchmarks.asyncio_baseline", "--base-url", base_url,
            "--model", STUB_MODEL, "--concurrency", str(concurrency),
        ]  # fmt: skip
        self._process = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env=cluster.env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._readline() == "ready"

    def _readline(self) -> str:
        assert self._process.stdout is not None
        line = self._process.stdout.readline().strip()
        if not line:
            raise RuntimeError(f"asyncio baseline exited ({self._process.wait()})")
        return line

    def rate(self, requests: int) -> float:
        assert self._process.stdin is not None
        self._process.stdin.write(f"{requests}\n")
        self._process.stdin.flush()
        answer = json.loads(self._readline())
        return float(answer["requests"]) / float(answer["elapsed_s"])

    def __enter__(self) -> AsyncioBaseline:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._process.stdin is not None
        self._process.stdin.close()
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


def facade_rate(model: Model, requests: int) -> float:
    """Requests per second of ``requests`` text jobs submitted at once, all awaited."""

    async def burst() -> None:
        handles = [
            model.call_async(f"Say something about number {next(_serial)}.")
            for _ in range(requests)
        ]
        await asyncio.gather(*handles)
        await model.client.aclose_listener()

    started = time.perf_counter()
    asyncio.run(burst())
    return requests / (time.perf_counter() - started)


def _measure(model: Model, baseline: AsyncioBaseline, requests: int) -> Callable[[str], float]:
    def measure(side: str) -> float:
        return baseline.rate(requests) if side == "baseline" else facade_rate(model, requests)

    return measure


def _start(cluster: Cluster, level: int, env: dict[str, str], processes: int) -> Process:
    queue = queue_name("openai")
    return cluster.start_worker(
        "openai", "-c", str(level), queue=queue, env=env, processes=processes
    )


def run(ctx: Context) -> Result:
    levels = (16, 64) if ctx.quick else (16, 64, 256)
    rounds, repeats = ctx.size(6, 2), ctx.size(3, 1)
    requests = {level: min(level * rounds, MAX_REQUESTS) for level in levels}
    result = Result(
        NAME,
        f"remote concurrency, OpenAI-compatible stub at {LATENCY_S * 1000:.0f} ms a request",
        sibylq_side=f"one `sibylq worker openai -c N --processes {PROCESSES}` (threads pool), "
        "facade call_async + asyncio.gather",
        baseline_side="one asyncio process: AsyncOpenAI + asyncio.Semaphore(N), same requests",
        params={
            "levels": levels,
            "requests_per_run": requests,
            "repeats": {"target level": repeats, "others": max(1, repeats - 1)},
        },
    )
    rates: dict[int, dict[str, list[float]]] = {}
    with ctx.cluster(NAME) as cluster:
        base_url = cluster.start_openai_stub()
        client = Client(cluster.settings())
        model = Models.create(f"openai:{STUB_MODEL}", client=client)
        env = {"OPENAI_BASE_URL": base_url, "OPENAI_API_KEY": "sk-bench"}
        for level in levels:
            worker = _start(cluster, level, env, PROCESSES)
            with AsyncioBaseline(cluster, base_url, level) as baseline:
                try:
                    facade_rate(model, level)  # warm up: the worker's threads, HTTP connections
                    measure = _measure(model, baseline, requests[level])
                    # The target's level gets a repeat more than the others (time is short).
                    times = repeats if level == TARGET_AT else max(1, repeats - 1)
                    rates[level] = alternate(times, ("sibylq", "baseline"), measure)
                    if level == TARGET_AT:
                        worker.stop()
                        worker = _start(cluster, level, env, 1)
                        facade_rate(model, level)
                        one = alternate(times - 1 or 1, (ONE_PROCESS, "baseline"), measure)
                        rates[level][ONE_PROCESS] = one[ONE_PROCESS]
                        rates[level]["baseline"] += one["baseline"]
                except JobFailedError as exc:
                    result.notes.append(f"N={level}: sibylq jobs FAILED: {exc}")
                    worker.stop()
                    with cluster.redis() as admin:  # what the failed burst left queued
                        admin.delete(*queue_list_keys(queue_name("openai")))
                    only = [baseline.rate(requests[level]) for _ in range(repeats)]
                    rates[level] = {"sibylq": [math.nan], "baseline": only}
            worker.stop()
        client.close()
    ideal = 1 / LATENCY_S
    for level in levels:
        result.add(
            Row(
                f"throughput at N={level}",
                "req/s",
                median(rates[level]["sibylq"]),
                median(rates[level]["baseline"]),
                Target(">=", 0.9) if level == TARGET_AT else None,
            )
        )
        if ONE_PROCESS in rates[level]:
            result.add(
                Row(
                    f"throughput at N={level}, worker on one process",
                    "req/s",
                    median(rates[level][ONE_PROCESS]),
                    median(rates[level]["baseline"]),
                )
            )
    result.notes.append(
        f"ideal (no overhead): N / {LATENCY_S} s = "
        + ", ".join(f"{n * ideal:.0f}" for n in levels)
        + " req/s"
    )
    result.samples = {"throughput_req_s": {str(level): rates[level] for level in levels}}
    return result
