"""``sibylq label`` really interrupted at random moments, over a chain of re-runs.

``test_labeling_properties`` kills the command once, after a chosen number of rows. Here a
case chains up to three runs, each with a random command (the same one, another one, or
``--retry-failed`` / ``--overwrite``) and a random signal (SIGINT, SIGKILL or none) sent after
a random delay: during start-up and imports, before the first row, mid-run, during a
``--retry-failed`` rewrite, or after the end. After every run, whatever its end:

- no traceback, an exit status the command documents;
- a refused run (exit 2) is one that would have mixed two commands' rows, and changed nothing;
- an output that holds rows always has the manifest of the command that made them;
- an interrupted run (Ctrl-C) leaves no empty output behind.

Then the last command, run to its end (``--retry-failed``, or ``--overwrite`` when the output
holds another command's rows), must leave exactly one row per input key, made by it.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from producer.labeling.lock import LOCK_SUFFIX
from producer.labeling.manifest import manifest_path
from tests.conftest import Worker
from tests.producer.test_labeling_properties import (
    COMMANDS,
    Dataset,
    assert_contract,
    datasets,
    read_output,
)

#: Exit statuses a run may end with here: done, rows failed, refused, interrupted; or a
#: signal that came before Python's own SIGINT handler was in place, or SIGKILL.
EXITS = (0, 1, 2, 130, -signal.SIGINT, -signal.SIGKILL)


@dataclass(frozen=True)
class Run:
    command: str  # a key of COMMANDS
    flag: str | None  # None, "--retry-failed" or "--overwrite"
    signal: signal.Signals | None
    delay_s: float  # from the start of the process to the signal


runs = st.builds(
    Run,
    command=st.sampled_from(sorted(COMMANDS)),
    flag=st.sampled_from([None, None, "--retry-failed", "--overwrite"]),
    signal=st.sampled_from([signal.SIGINT, signal.SIGKILL, None]),
    delay_s=st.floats(0.0, 4.0),
)


def _argv(source: Path, out: Path, command: str, *extra: str) -> list[str]:
    template, labels = COMMANDS[command]
    return [sys.executable, "-m", "sibylq", "label", str(source), "--model",
            "fake:delay=0.2", "--classify", ",".join(labels), "--prompt", template,
            "-o", str(out), "--max-in-flight", "2", "-q", *extra]  # fmt: skip


def _holds_rows(out: Path) -> bool:
    if not out.exists():
        return False
    lines = out.read_bytes().count(b"\n")
    return lines > (1 if out.suffix == ".csv" else 0)


def _made_by(out: Path) -> tuple[str, list[str]] | None:
    path = manifest_path(out)
    if not path.exists():
        return None
    manifest = json.loads(path.read_text())
    return manifest["template"], manifest["labels"]


def _files(directory: Path) -> dict[str, bytes]:
    """The directory's files but a lock file (``OUT.lock``): one a killed run left holds no
    lock any more, and the next run, even a refused one, takes it over and removes it."""
    return {
        path.name: path.read_bytes()
        for path in sorted(directory.iterdir())
        if path.suffix != LOCK_SUFFIX
    }


#: Where a traceback from sibylq's own code would point.
OUR_CODE = re.compile(r"[/\\](sibylq|producer|workers|wire|embedded)[/\\][\w/\\]*\.py")


def _our_traceback(stderr: str) -> bool:
    """A traceback through sibylq's code. A Ctrl-C while the interpreter itself starts (its
    ``site`` imports, before any of sibylq runs: "Fatal Python error: init_import_site",
    seen at 30 ms on a slow machine) is beyond the reach of any Python program."""
    return "Traceback" in stderr and bool(OUR_CODE.search(stderr))


def _run(source: Path, out: Path, env: dict[str, str], run: Run) -> tuple[int, str]:
    extra = [run.flag] if run.flag else []
    process = subprocess.Popen(_argv(source, out, run.command, *extra), env=env,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    if run.signal is not None:
        deadline = time.monotonic() + run.delay_s
        while process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if process.poll() is None:
            process.send_signal(run.signal)
    _, stderr = process.communicate(timeout=120)
    return process.returncode, stderr


@settings(
    max_examples=8,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],  # explain: minutes
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    dataset=datasets(),
    out_suffix=st.sampled_from([".jsonl", ".csv"]),
    chain=st.lists(runs, min_size=1, max_size=3),
)
def test_runs_killed_at_random_moments_never_mix_commands_or_leave_debris(
    worker_env: dict[str, str],
    fake_worker: Worker,
    dataset: Dataset,
    out_suffix: str,
    chain: list[Run],
) -> None:
    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        source = directory / f"in{dataset.suffix}"
        source.write_text("".join(dataset.lines), encoding="utf-8")
        out = directory / f"out{out_suffix}"
        for run in chain:
            before = _files(directory)
            held = _holds_rows(out)
            made_by = _made_by(out)
            wanted = COMMANDS[run.command]
            refusal_due = (
                held and run.flag != "--overwrite" and made_by != (wanted[0], list(wanted[1]))
            )
            returncode, stderr = _run(source, out, worker_env, run)
            event(f"exit {returncode}")
            assert returncode in EXITS, stderr
            assert not _our_traceback(stderr), stderr
            if returncode == 2:
                assert refusal_due, stderr
                assert "holds rows made by another command" in stderr, stderr
                assert _files(directory) == before, "a refused run changed a file"
            elif returncode in (0, 1):
                assert not refusal_due, "rows of another command were reused"
            if _holds_rows(out):
                assert _made_by(out) is not None, "rows with no manifest"
            if returncode == 130 and not held and out.exists():
                assert _holds_rows(out), "an interrupted run left an empty output"

        last = chain[-1].command
        template, labels = COMMANDS[last]
        fresh = not _holds_rows(out) or _made_by(out) == (template, list(labels))
        final = "--retry-failed" if fresh else "--overwrite"
        done = subprocess.run(_argv(source, out, last, final), env=worker_env,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        failures = any(dataset.failing.values())
        assert done.returncode == (1 if failures else 0), done.stderr
        assert_contract(out, dataset, last)
        rows = read_output(out)
        again = subprocess.run(_argv(source, out, last), env=worker_env,
                               capture_output=True, text=True, timeout=120)  # fmt: skip
        assert again.returncode == done.returncode, again.stderr
        assert read_output(out) == rows, "a plain re-run of a finished output changed it"
        leftovers = {path.name for path in directory.iterdir()} - {
            source.name, out.name, manifest_path(out).name,
        }  # fmt: skip
        assert not leftovers, f"files left behind: {leftovers}"
