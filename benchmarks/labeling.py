"""5. Bulk labeling: a ``sibylq label`` run with ``fake`` on 2 worker processes.

sibylq: the CLI itself (``sibylq label INPUT --model fake --classify spam,ham ...``, default
``--max-in-flight 256``) on a JSONL file of SMS texts, its own rows/s from its summary line,
and Redis's peak ``used_memory`` sampled meanwhile. Baseline: bare Celery, a no-op task per
row on 2 bare worker processes, sent by a loop that keeps 256 in flight (``get()`` on the
oldest, then send the next), writes each result as a JSON line and deletes the stored results
in batches of 256, as ``sibylq label`` does. Both pairs of workers use a threads pool of 8.

The ratio comes from runs of equal size (``interleaved_rows``, 5,000), alternating sibylq and
baseline, so the machine's noise falls on both; then one run of all ``--rows`` rows (100,000
by default) gives the rows/s and peak Redis memory of a full-size run.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from celery.result import AsyncResult

from producer.constants import queue_name, result_key

from .bare_celery import BareClient
from .env import Cluster, Context, RedisSampler
from .llama import DATA
from .report import Result, Row, Target, median

NAME = "labeling"
PROMPT = "Is this SMS spam? {text}"
WORKERS, POOL, CONCURRENCY = 2, "threads", 8
IN_FLIGHT = 256
_SUMMARY = re.compile(r"done (\d+), failed (\d+).*? in ([\d.]+)s \(([\d.]+) rows/s\)")


def write_input(path: Path, rows: int) -> Path:
    """``rows`` JSONL rows ``{"id", "text"}``, cycling through the SMS dataset's texts."""
    texts = [f"synthetic message {i}" for i in range(100)]
    if DATA.is_file():
        texts = [json.loads(line)["text"] for line in DATA.open()]
    with path.open("w") as out:
        for index in range(rows):
            out.write(json.dumps({"id": index, "text": texts[index % len(texts)]}) + "\n")
    return path


@dataclass(frozen=True)
class Run:
    rows_s: float
    peak_memory_bytes: int  # Redis used_memory's peak over its value at the start
    wall_s: float


def sibylq_label(cluster: Cluster, source: Path, tag: str) -> Run:
    """One ``sibylq label`` run over ``source``; rows/s is the CLI's own figure. ``tag`` makes
    the prompt, hence every job id, the run's own (a run never resumes another)."""
    output = cluster.workdir / f"labels-{tag}.jsonl"
    command = [
        sys.executable, "-m", "producer.cli", "label", str(source), "--model", "fake",
        "--classify", "spam,ham", "--prompt", f"{PROMPT} ({tag})", "-o", str(output),
    ]  # fmt: skip
    with RedisSampler(cluster.url, cluster.port, interval_s=0.1) as sampler:
        started = time.perf_counter()
        process = cluster.spawn("sibylq-label", command, cluster.env())
        code = process.popen.wait()
        wall = time.perf_counter() - started
    log = process.log_tail(5)
    # The last match: the summary. Progress updates end in \r, not \n: a "line" of the log
    # holds every update, each with the rate so far.
    found = _SUMMARY.findall(log)
    if code != 0 or not found:
        raise RuntimeError(f"sibylq label failed ({code}):\n{log}")
    _, failed, _, rate = found[-1]
    if int(failed):
        raise RuntimeError(f"sibylq label: {failed} rows failed:\n{log}")
    return Run(float(rate), sampler.memory_peak - sampler.memory_start, wall)


def bare_label(cluster: Cluster, rows: int) -> Run:
    """The bare Celery loop over ``rows`` rows."""
    output = cluster.workdir / "bare.jsonl"
    texts = [PROMPT.format(text=f"message {i}") for i in range(rows)]
    with (
        BareClient(cluster.url) as bare,
        RedisSampler(cluster.url, cluster.port, interval_s=0.1) as sampler,
        output.open("w") as out,
    ):
        redis = cluster.redis()
        pending: deque[AsyncResult[Any]] = deque()
        finished: list[str] = []

        def collect() -> None:
            oldest = pending.popleft()
            out.write(json.dumps({"id": oldest.id, "result": oldest.get(timeout=120)}) + "\n")
            finished.append(result_key(oldest.id))
            if len(finished) == IN_FLIGHT:
                redis.delete(*finished)
                finished.clear()

        started = time.perf_counter()
        for text in texts:
            if len(pending) >= IN_FLIGHT:
                collect()
            pending.append(bare.noop(text))
        while pending:
            collect()
        wall = time.perf_counter() - started
        redis.close()
    return Run(rows / wall, sampler.memory_peak - sampler.memory_start, wall)


def run(ctx: Context) -> Result:
    rows = ctx.rows or ctx.size(100_000, 500)
    chunk, repeats = min(rows, ctx.size(5_000, 300)), ctx.size(3, 1)
    result = Result(
        NAME,
        f"bulk labeling, {rows:,} rows with fake",
        sibylq_side=f"`sibylq label` CLI (256 in flight), {WORKERS} x `sibylq worker fake -P "
        f"{POOL} -c {CONCURRENCY}`",
        baseline_side=f"bare Celery no-op per row, 256 in flight, {WORKERS} x celery worker "
        f"-P {POOL} -c {CONCURRENCY}",
        params={"rows": rows, "interleaved_rows": chunk, "repeats": repeats},
    )
    with ctx.cluster(NAME) as cluster:
        source = write_input(cluster.workdir / "input.jsonl", rows)
        part = source if chunk == rows else write_input(cluster.workdir / "part.jsonl", chunk)
        cluster.start_workers(
            WORKERS, "fake", "-P", POOL, "-c", str(CONCURRENCY), queue=queue_name("fake")
        )
        for _ in range(WORKERS):
            cluster.start_bare_worker(POOL, CONCURRENCY)
        bare_label(cluster, 200)  # warm up
        runs: dict[str, list[Run]] = {"sibylq": [], "baseline": []}
        for repeat in range(repeats):  # interleaved: the machine's noise falls on both
            runs["sibylq"].append(sibylq_label(cluster, part, f"run {repeat}"))
            runs["baseline"].append(bare_label(cluster, chunk))
        full = sibylq_label(cluster, source, "full") if rows > chunk else None
    _fill(result, runs, full, chunk, rows)
    return result


def _fill(
    result: Result, runs: dict[str, list[Run]], full: Run | None, chunk: int, rows: int
) -> None:
    mine, theirs = runs["sibylq"], runs["baseline"]
    bare_rate = median(run.rows_s for run in theirs)
    bare_memory = median(run.peak_memory_bytes for run in theirs) / 2**20
    label = f"throughput, {chunk:,}-row runs, interleaved"
    result.add(
        Row(label, "rows/s", median(run.rows_s for run in mine), bare_rate, Target(">=", 0.8))
    )
    biggest = full or max(mine, key=lambda run: run.peak_memory_bytes)
    if full is not None:
        result.add(Row(f"throughput, one {rows:,}-row run", "rows/s", full.rows_s, bare_rate))
    result.add(
        Row(
            f"Redis peak memory over idle, {rows:,} rows",
            "MiB",
            biggest.peak_memory_bytes / 2**20,
            bare_memory,
        )
    )
    result.add(Row(f"wall time of the {rows:,}-row run", "s", biggest.wall_s))
    if full is not None:
        result.notes.append(
            f"baseline figures are from its {chunk:,}-row runs; the {rows:,}-row run is one run"
        )
    result.samples = {
        side: [asdict(run) for run in side_runs] for side, side_runs in runs.items()
    } | {"full": None if full is None else asdict(full)}
