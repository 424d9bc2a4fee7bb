"""The output contract of ``sibylq label``, as properties: whatever the input (JSONL or CSV,
with ids or not, failing rows), the interruptions (Ctrl-C, SIGKILL mid-write) and the re-runs
(the same command, another one, ``--retry-failed``, ``--overwrite``), the final output holds
exactly one row per input key, every one made by the final command, in the output's format.

The first property drives ``label_file`` in this process (fast, many cases); the second runs
the real command and really kills it.
"""

from __future__ import annotations

import asyncio
import csv
import json
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from producer import Client, InvalidRequestError, Models
from producer.labeling import Reuse, label_file, make_task
from producer.labeling.ids import key_text
from producer.labeling.manifest import manifest_path
from producer.labeling.output import COLUMNS
from producer.labeling.progress import Summary
from producer.labeling.runner import LabelTask
from tests.conftest import Worker, wait_for

#: The commands a case switches between: the fake model answers each one's first label, so
#: a row's result says which command made it.
COMMANDS = {
    "spam": ("Is this SMS spam? {text}", ["spam", "ham"]),
    "yes": ("Is this SMS spam? {text}", ["yes", "no"]),
    "short": ("Spam? {text}", ["spam", "ham"]),
}

# -- inputs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dataset:
    """An input file's rows and what the output must hold for each key."""

    suffix: str
    lines: list[str]  # as written, header included
    failing: dict[str, bool]  # key text -> the row fails (True) or is done


_TEXT = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\r\n"), max_size=20)


@st.composite
def datasets(draw: st.DrawFn) -> Dataset:
    """JSONL or CSV, keyed by ``id`` (ints or strings) or by line; JSONL rows after the first
    may lack ``text`` or not be JSON at all (failed rows). Texts hold commas, quotes, any
    language; no line breaks in CSV, whose keys are then plain line numbers."""
    suffix = draw(st.sampled_from([".jsonl", ".csv"]))
    n = draw(st.integers(1, 10))
    ids = draw(st.sampled_from(["line", "int", "str"]))
    texts = draw(st.lists(_TEXT, min_size=n, max_size=n))
    if ids == "int":
        keys: list[Any] = draw(st.lists(st.integers(1000, 10**9), min_size=n, max_size=n,
                                        unique=True))  # fmt: skip
    elif ids == "str":
        names = st.text('abcdefghij," é', min_size=1, max_size=6).map(lambda s: "k" + s)
        keys = draw(st.lists(names, min_size=n, max_size=n, unique=True))
    else:
        keys = [None] * n
    kinds = [draw(st.sampled_from(["ok", "ok", "no-text", "not-json"])) for _ in range(n)]
    kinds[0] = "ok"  # the first row stands for the others: the template check reads it
    if suffix == ".csv":
        return _csv_dataset(keys, texts)
    return _jsonl_dataset(keys, texts, kinds)


def _jsonl_dataset(keys: list[Any], texts: list[str], kinds: list[str]) -> Dataset:
    lines, failing = [], {}
    for line, (key, text, kind) in enumerate(zip(keys, texts, kinds, strict=True), 1):
        if kind == "not-json":
            lines.append("{not json\n")
            failing[key_text(line)] = True
            continue
        row: dict[str, Any] = {} if key is None else {"id": key}
        row["text" if kind == "ok" else "body"] = text
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
        failing[key_text(line if key is None else key)] = kind != "ok"
    return Dataset(".jsonl", lines, failing)


def _csv_dataset(keys: list[Any], texts: list[str]) -> Dataset:
    with_ids = keys[0] is not None
    rows = [["id", "text"] if with_ids else ["text"]]
    rows += [
        [str(key), text] if with_ids else [text] for key, text in zip(keys, texts, strict=True)
    ]
    lines = []
    for row in rows:
        holder = _Line()
        csv.writer(holder).writerow(row)
        lines.append(holder.text)
    failing = {key_text(str(key) if with_ids else line): False
               for line, key in enumerate(keys, 2)}  # fmt: skip
    return Dataset(".csv", lines, failing)


class _Line:
    text = ""

    def write(self, text: str) -> None:
        self.text += text


# -- the contract ------------------------------------------------------------------------------


def read_output(out: Path) -> list[dict[str, Any]]:
    """The output's records, parsed in the format its name says; raises if it is not that."""
    if out.suffix == ".csv":
        with out.open(newline="", encoding="utf-8") as source:
            reader = csv.reader(source)
            assert tuple(next(reader)) == COLUMNS
            return [dict(zip(COLUMNS, cells, strict=True)) for cells in reader]
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


def assert_contract(out: Path, dataset: Dataset, command: str) -> None:
    """One row per input key, each made by ``command``, right status, right format."""
    manifest = json.loads(manifest_path(out).read_text())
    template, labels = COMMANDS[command]
    assert (manifest["template"], manifest["schema"]["properties"]["output"]["enum"]) == (
        template,
        labels,
    )
    records = read_output(out)
    keys = [key_text(record["key"]) for record in records]
    assert sorted(keys) == sorted(dataset.failing), "one row per input key"
    for record in records:
        failing = dataset.failing[key_text(record["key"])]
        assert record["status"] == ("failed" if failing else "done"), record
        if not failing:
            result = record["result"] if out.suffix != ".csv" else json.loads(record["result"])
            assert result == labels[0], f"a row made by another command: {record}"
        if record["job_id"]:
            assert record["job_id"].startswith(f"label-{manifest['fingerprint']}-")


# -- property 1: in this process, interruptions at any row, kills mid-write ----------------------


class SimulatedInterruptError(Exception):
    """Stands for Ctrl-C after a given number of rows."""


class InterruptAfter:
    def __init__(self, rows: int | None) -> None:
        self.rows = rows
        self.seen = 0

    def update(self, summary: Summary) -> None:
        self.seen += 1
        if self.rows is not None and self.seen >= self.rows:
            raise SimulatedInterruptError

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class Step:
    command: str
    reuse: Reuse
    interrupt_after: int | None  # rows; None: runs to the end
    kill_mid_write: bool  # after the interruption, the last line is torn


steps = st.builds(
    Step,
    command=st.sampled_from(sorted(COMMANDS)),
    reuse=st.sampled_from(list(Reuse)),
    interrupt_after=st.none() | st.integers(1, 10),
    kill_mid_write=st.booleans(),
)


def _task(client: Client, command: str) -> LabelTask:
    template, labels = COMMANDS[command]
    return make_task(Models.create("fake", client=client), prompt=template, classify=labels)


def _run(client: Client, source: Path, out: Path, step: Step) -> None:
    async def run() -> None:
        try:
            await label_file(
                _task(client, step.command),
                source,
                out,
                progress=InterruptAfter(step.interrupt_after),
                max_in_flight=4,
                reuse=step.reuse,
            )
        finally:
            await client.aclose_listener()

    asyncio.run(run())


def _tear_last_line(out: Path, fraction: float) -> None:
    """Leave the last line cut short, as a kill in the middle of its write would."""
    data = out.read_bytes()
    start = data.rstrip(b"\n").rfind(b"\n") + 1
    last = len(data) - start  # its newline included
    if last > 1:
        out.write_bytes(data[: start + min(last - 1, max(1, int(last * fraction)))])


def _snapshot(out: Path) -> tuple[bytes | None, bytes | None]:
    paths = (out, manifest_path(out))
    return tuple(path.read_bytes() if path.exists() else None for path in paths)  # type: ignore[return-value]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dataset=datasets(),
    out_suffix=st.sampled_from([".jsonl", ".csv"]),
    runs=st.lists(steps, min_size=1, max_size=4),
    tear=st.floats(0.1, 0.9),
)
def test_the_output_holds_one_row_per_key_made_by_the_last_command(
    client: Client,
    fake_worker: Worker,
    dataset: Dataset,
    out_suffix: str,
    runs: list[Step],
    tear: float,
) -> None:
    with tempfile.TemporaryDirectory() as directory:
        source = Path(directory) / f"in{dataset.suffix}"
        source.write_text("".join(dataset.lines), encoding="utf-8")
        out = Path(directory) / f"out{out_suffix}"
        made_by: str | None = None  # the command whose rows the output holds
        for step in runs:
            holds_rows = out.exists() and out.stat().st_size > 0
            refused = holds_rows and made_by != step.command and step.reuse is not Reuse.OVERWRITE
            before = _snapshot(out)
            try:
                _run(client, source, out, step)
            except InvalidRequestError as exc:
                event("refused: another command")
                assert refused, exc
                assert "another command" in str(exc)
                assert _snapshot(out) == before, "a refused run changed the output"
                continue
            except SimulatedInterruptError:
                event("interrupted")
                if step.kill_mid_write and out.exists():
                    _tear_last_line(out, tear)
            assert not refused, "rows of another command were reused"
            if _snapshot(out) != before:
                made_by = step.command

        last = runs[-1].command
        final = Reuse.RETRY_FAILED if made_by in (None, last) else Reuse.OVERWRITE
        _run(client, source, out, Step(last, final, None, False))
        assert_contract(out, dataset, last)
        rows = read_output(out)
        _run(client, source, out, Step(last, Reuse.KEEP, None, False))
        assert read_output(out) == rows, "a plain re-run of a finished output changed it"


# -- property 2: the real command, really interrupted (SIGINT, SIGKILL) --------------------------


def _command(source: Path, out: Path, command: str, *extra: str) -> list[str]:
    template, labels = COMMANDS[command]
    return [sys.executable, "-m", "sibylq", "label", str(source), "--model",
            "fake:delay=0.2", "--classify", ",".join(labels), "--prompt", template,
            "-o", str(out), "--max-in-flight", "2", "-q", *extra]  # fmt: skip


def _rows_written(out: Path) -> int:
    return out.read_bytes().count(b"\n") if out.exists() else 0


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dataset=datasets(),
    out_suffix=st.sampled_from([".jsonl", ".csv"]),
    kill=st.sampled_from([signal.SIGINT, signal.SIGKILL]),
    after_rows=st.integers(1, 8),
    then=st.sampled_from(["same", "retry-failed", "other-command"]),
)
def test_the_real_command_killed_at_any_row_resumes_to_the_same_contract(
    worker_env: dict[str, str],
    fake_worker: Worker,
    dataset: Dataset,
    out_suffix: str,
    kill: signal.Signals,
    after_rows: int,
    then: str,
) -> None:
    env = worker_env
    with tempfile.TemporaryDirectory() as directory:
        source = Path(directory) / f"in{dataset.suffix}"
        source.write_text("".join(dataset.lines), encoding="utf-8")
        out = Path(directory) / f"out{out_suffix}"
        process = subprocess.Popen(_command(source, out, "spam"), env=env,
                                   stderr=subprocess.PIPE, text=True)  # fmt: skip
        target = max(1, min(after_rows, len(dataset.failing) - 1))  # mid-run when it can be
        wait_for(
            f"{target} rows, or the end",
            lambda: process.poll() is not None or _rows_written(out) >= target,
            timeout_s=60,
        )
        process.send_signal(kill)  # nothing when it has ended
        _, stderr = process.communicate(timeout=60)
        # Finished (0, 1), interrupted (130), killed; or SIGINT came as the process exited.
        assert process.returncode in (0, 1, 130, -signal.SIGKILL, -signal.SIGINT), stderr
        event(f"first run's exit status: {process.returncode}")
        assert "Traceback" not in stderr

        extra = {"same": [], "retry-failed": ["--retry-failed"], "other-command": []}[then]
        again = subprocess.run(_command(source, out, "yes" if then == "other-command" else "spam",
                                        *extra), env=env, capture_output=True, text=True,
                               timeout=120)  # fmt: skip
        held_rows = out.exists() and out.stat().st_size > 0
        if then == "other-command" and held_rows:
            assert again.returncode == 2, again.stderr
            assert "another command" in again.stderr
            command = "spam"
            final = subprocess.run(_command(source, out, command), env=env, capture_output=True,
                                   text=True, timeout=120)  # fmt: skip
        else:
            command = "yes" if then == "other-command" else "spam"
            final = again
        failures = any(dataset.failing.values())
        assert final.returncode == (1 if failures else 0), final.stderr
        assert_contract(out, dataset, command)
