"""``python -m benchmarks --quick`` runs every benchmark end to end (small sizes) and writes, for
each, a table of sibylq's figures beside the baseline's measured in the same run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
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
