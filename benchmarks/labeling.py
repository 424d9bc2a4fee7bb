"""5. Bulk labeling: a ``sibylq label`` run with ``fake`` on 2 worker processes.

sibylq: the CLI itself (``sibylq label INPUT --model fake --classify spam,ham ...``, default
``--max-in-flight 256``) on a JSONL file of SMS texts, its own rows/s from its summary line,
and Redis's peak ``used_memory`` sampled meanwhile. Baseline: bare Celery, a no-op task per
row on 2 bare worker processes, sent by a loop that keeps 256 in flight (``get()`` on the
oldest, then send the next), writes each result as a JSON line and deletes the stored results
in batches of 256, as ``sibylq label`` does. Every worker is a ``solo`` pool (one process, one
job at a time): the fastest Celery pool for jobs this short, on both sides.

One sibylq run of all ``--rows`` rows (100,000 by default) is measured between two baseline
runs of ``baseline_rows`` (4,000): the baseline's rate is steady within a few thousand rows,
and a 100,000-row bare run would double the benchmark's time. The ratio is the full run's
rows/s over the baseline runs' median.
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

from wire.constants import queue_name, result_key

from .bare_celery import BareClient
from .env import Cluster, Context, RedisSampler
from .llama import DATA
from .report import Result, Row, Target, median

NAME = "labeling"
PROMPT = "Is this SMS spam? {text}"
WORKERS, POOL, CONCURRENCY = 2, "solo", 1
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
        sys.executable, "-m", "sibylq", "label", str(source), "--model", "fake",
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
    chunk = min(rows, ctx.size(4_000, 300))
    result = Result(
        NAME,
        f"bulk labeling, {rows:,} rows with fake",
        sibylq_side=f"`sibylq label` CLI (256 in flight), {WORKERS} x `sibylq worker fake -P "
        f"{POOL}`",
        baseline_side=f"bare Celery no-op per row, 256 in flight, {WORKERS} x celery worker "
        f"-P {POOL}",
        params={"rows": rows, "baseline_rows": chunk, "baseline_runs": 2},
    )
    with ctx.cluster(NAME) as cluster:
        source = write_input(cluster.workdir / "input.jsonl", rows)
        cluster.start_workers(WORKERS, "fake", "-P", POOL, queue=queue_name("fake"))
        for _ in range(WORKERS):
            cluster.start_bare_worker(POOL, CONCURRENCY)
        bare_label(cluster, 200)  # warm up both
        sibylq_label(cluster, write_input(cluster.workdir / "warmup.jsonl", 200), "warm-up")
        before = bare_label(cluster, chunk)
        full = sibylq_label(cluster, source, "full")
        after = bare_label(cluster, chunk)
    _fill(result, full, [before, after], rows, chunk)
    return result


def _fill(result: Result, full: Run, baseline: list[Run], rows: int, chunk: int) -> None:
    bare_rate = median(run.rows_s for run in baseline)
    bare_memory = median(run.peak_memory_bytes for run in baseline) / 2**20
    result.add(Row("throughput", "rows/s", full.rows_s, bare_rate, Target(">=", 0.8)))
    result.add(
        Row(
            f"Redis peak memory over idle, {rows:,} rows",
            "MiB",
            full.peak_memory_bytes / 2**20,
            bare_memory,
        )
    )
    result.add(Row(f"wall time of the {rows:,}-row run", "s", full.wall_s))
    result.notes.append(
        f"baseline figures: the median of its {chunk:,}-row runs before and after sibylq's"
    )
    result.samples = {"sibylq": asdict(full), "baseline": [asdict(run) for run in baseline]}
