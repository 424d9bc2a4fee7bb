"""``python -m benchmarks --quick`` runs every benchmark end to end (small sizes) and writes, for
each, a table of sibylq's figures beside the baseline's measured in the same run."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

NAMES = ("queue_overhead", "remote", "llama", "fanout", "labeling", "scaling", "loop_lag")


def test_every_benchmark_runs_and_compares_with_its_baseline(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=280,
    )

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in NAMES:
        report = json.loads((tmp_path / f"{name}.json").read_text())
        compared = [
            row
            for row in report["rows"]
            if isinstance(row["sibylq"], float | int) and isinstance(row["baseline"], float | int)
        ]
        assert compared, f"{name} compared nothing"
        assert all(math.isfinite(row["sibylq"]) for row in compared), name
        assert report["baseline_side"], name


def test_a_run_writes_its_summary_into_an_output_folder_it_creates(tmp_path: Path) -> None:
    out = tmp_path / "new" / "folder"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "llama", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "SIBYLQ_BENCH_DATA": str(tmp_path / "absent.jsonl")},
    )

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "llama: skipped: no dataset at" in result.stdout
    assert json.loads((out / "summary.json").read_text())["failed"] == []


def test_a_run_stopped_by_sigterm_stops_the_workers_and_redis_it_started(tmp_path: Path) -> None:
    command = ["queue_overhead", "--quick", "--keep", "--out", str(tmp_path / "out")]
    run = subprocess.Popen(
        [sys.executable, "-m", "benchmarks", *command],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert run.stdout is not None
    scratch = Path(run.stdout.readline().removeprefix("scratch (kept):").strip())
    try:
        deadline = time.monotonic() + 120
        while len(_started_in(scratch)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        started = _started_in(scratch)
        assert len(started) >= 2, "no Redis and worker started within 120 s"

        run.send_signal(signal.SIGTERM)
        status = run.wait(timeout=60)

        assert not _started_in(scratch) & started, "left running"
        assert status == 128 + signal.SIGTERM
    finally:
        run.kill()
        for pid in _started_in(scratch):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(scratch, ignore_errors=True)


def _started_in(folder: Path) -> set[int]:
    """The processes whose standard output or working directory is in ``folder`` (a
    benchmark's workers log into its scratch folder; its Redis works in it)."""
    pids = set()
    for proc in Path("/proc").iterdir():
        try:
            places = (os.readlink(proc / "fd" / "1"), os.readlink(proc / "cwd"))
        except OSError:
            continue
        if any(place.startswith(str(folder) + os.sep) for place in places):
            pids.add(int(proc.name))
    return pids
