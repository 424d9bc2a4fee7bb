"""One ``sibylq label`` run at a time per output: a second run on the same ``-o`` stops at once
and names the first, whose rows stay whole; a run killed with SIGKILL blocks no one; runs on
different outputs in one directory go on side by side."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from producer.labeling.lock import lock_path
from tests.conftest import Worker, wait_for
from tests.producer.labeling_cli import PROMPT, one_error, read_records, run_label

ROWS = 80
#: 80 rows at 0.5 s each on the fake worker's 8 threads: a run of about 5 s.
SLOW = ["--model", "fake:delay=0.5", "--classify", "spam,ham", "--prompt", PROMPT]


@pytest.fixture
def env(worker_env: dict[str, str], fake_worker: Worker) -> dict[str, str]:
    return worker_env


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "in.jsonl"
    rows = [{"id": i, "text": f"message number {i}"} for i in range(1, ROWS + 1)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def start_label(env: dict[str, str], source: Path, out: Path) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "sibylq", "label", str(source), *SLOW, "-o", str(out)]
    return subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)


def assert_every_row_once(out: Path) -> None:
    keys = Counter(record["key"] for record in read_records(out))
    assert sorted(keys) == list(range(1, ROWS + 1))
    assert set(keys.values()) == {1}


def test_a_second_run_on_the_same_output_stops_and_names_the_first(
    env: dict[str, str], source: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out.jsonl"
    first = start_label(env, source, out)
    wait_for("the first run to take its lock", lambda: out.exists())

    second = run_label(env, str(source), *SLOW, "-o", str(out))

    assert second.returncode == 2
    error = one_error(second)
    assert f"another sibylq label run (process {first.pid}) is writing {out}" in error
    assert "wait for it to end, or give another -o" in error
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    assert_every_row_once(out)
    assert not lock_path(out).exists()


def test_a_run_killed_with_sigkill_blocks_no_one(
    env: dict[str, str], source: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out.jsonl"
    killed = start_label(env, source, out)
    wait_for("a first row", lambda: out.exists() and out.read_text().count("\n") >= 1)
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=30)
    assert lock_path(out).exists()  # the file stays; the kernel's lock went with the process

    again = run_label(env, str(source), *SLOW, "-o", str(out))

    assert again.returncode == 0, again.stderr
    assert_every_row_once(out)
    assert not lock_path(out).exists()


def test_runs_on_different_outputs_in_one_directory_go_on_side_by_side(
    env: dict[str, str], source: Path, tmp_path: Path
) -> None:
    outs = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    runs = [start_label(env, source, out) for out in outs]
    for run in runs:
        _, stderr = run.communicate(timeout=120)
        assert run.returncode == 0, stderr
    for out in outs:
        assert_every_row_once(out)
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "a.jsonl", "a.jsonl.manifest.json", "b.jsonl", "b.jsonl.manifest.json", "in.jsonl",
    ]  # fmt: skip
