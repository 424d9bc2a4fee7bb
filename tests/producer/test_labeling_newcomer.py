"""More mistakes a newcomer makes with ``sibylq label``, beyond the issue's list (see
``test_labeling_mistakes``): each ends in one clear ``sibylq: error:`` line or a right
output, the documented exit status, no traceback, and no file left behind for nothing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from producer.labeling.manifest import manifest_path
from tests.conftest import Worker
from tests.producer.labeling_cli import PROMPT, SPAM_HAM, one_error, read_records, run_label


def _embedded_env() -> dict[str, str]:
    """No SIBYLQ_BROKER_URL: the command runs its own embedded cluster, as in the README."""
    return {name: value for name, value in os.environ.items() if not name.startswith("SIBYLQ_")}


@pytest.fixture
def env(worker_env: dict[str, str], fake_worker: Worker) -> dict[str, str]:
    return worker_env


# -- inputs with nothing to label --------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "says"),
    [
        ("empty.jsonl", "", "{tmp}/empty.jsonl holds no rows: nothing to label"),
        ("blank.jsonl", "\n\n", "{tmp}/blank.jsonl holds no rows: nothing to label"),
        ("header.csv", "id,text\n", "{tmp}/header.csv holds no rows: nothing to label"),
        (
            "array.json",
            '[{"id": 1, "text": "hi"}, {"id": 2, "text": "win"}]\n',
            "no row of {tmp}/array.json can be labeled (line 1 is not a JSON object). "
            "sibylq label reads JSON Lines (.jsonl: one JSON object a line)",
        ),
        (
            "pretty.jsonl",
            '{\n  "id": 1,\n  "text": "hi"\n}\n',
            "no row of {tmp}/pretty.jsonl can be labeled (line 1 is not valid JSON: "
            "Expecting property name enclosed in double quotes, and the 3 other rows cannot "
            "either)",
        ),
    ],
)
def test_an_input_with_no_row_to_label_is_an_error_and_writes_nothing(
    env: dict[str, str], tmp_path: Path, name: str, content: str, says: str
) -> None:
    source = tmp_path / name
    source.write_text(content)
    out = tmp_path / "out.csv"

    result = run_label(env, str(source), *SPAM_HAM, "-o", str(out))

    assert result.returncode == 2, result.stderr
    error = one_error(result)
    assert error.startswith("sibylq: error: ")
    assert says.format(tmp=tmp_path) in error
    assert sorted(path.name for path in tmp_path.iterdir()) == [name]


# -- what editors write: a byte order mark, quoted line breaks ----------------------------------


def test_a_csv_with_a_byte_order_mark_keeps_its_id_column(
    env: dict[str, str], tmp_path: Path
) -> None:
    """Excel's "CSV UTF-8" starts with a BOM: it is no part of the first column's name."""
    source = tmp_path / "in.csv"
    source.write_bytes(b'\xef\xbb\xbfid,text\n7,hello\n8,"two\nlines, quoted"\n')
    out = tmp_path / "out.jsonl"

    result = run_label(env, str(source), *SPAM_HAM, "-o", str(out))

    assert result.returncode == 0, result.stderr
    assert sorted(r["key"] for r in read_records(out)) == ["7", "8"]
    assert {r["result"] for r in read_records(out)} == {"spam"}


def test_a_csv_with_a_byte_order_mark_before_the_template_field(
    env: dict[str, str], tmp_path: Path
) -> None:
    source = tmp_path / "in.csv"
    source.write_bytes(b"\xef\xbb\xbftext\nhello\n")
    out = tmp_path / "out.jsonl"
    result = run_label(env, str(source), *SPAM_HAM, "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert [r["status"] for r in read_records(out)] == ["done"]


def test_a_jsonl_with_a_byte_order_mark_labels_its_first_row(
    env: dict[str, str], tmp_path: Path
) -> None:
    source = tmp_path / "in.jsonl"
    source.write_bytes(b'\xef\xbb\xbf{"id": 1, "text": "hi"}\n{"id": 2, "text": "win"}\n')
    out = tmp_path / "out.jsonl"
    result = run_label(env, str(source), *SPAM_HAM, "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert sorted((r["key"], r["status"]) for r in read_records(out)) == [(1, "done"), (2, "done")]


# -- a row whose template field is null ---------------------------------------------------------


def test_a_null_template_field_is_a_failed_row_not_a_prompt_about_none(
    env: dict[str, str], tmp_path: Path
) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text('{"id": 1, "text": "hi"}\n{"id": 2, "text": null}\n')
    out = tmp_path / "out.jsonl"

    result = run_label(env, str(source), *SPAM_HAM, "-o", str(out))

    assert result.returncode == 1, result.stderr
    failed = {r["key"]: r for r in read_records(out) if r["status"] == "failed"}
    assert list(failed) == [2]
    assert failed[2]["error"] == {
        "type": "InvalidRow",
        "message": "line 2: 'text' is null",
        "raw_text": None,
    }
    assert failed[2]["attempts"] == 0 and failed[2]["job_id"] is None


# -- the output a symbolic link -----------------------------------------------------------------


def test_a_dangling_link_as_output_is_one_error_line(env: dict[str, str], tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text('{"id": 1, "text": "hi"}\n')
    link = tmp_path / "out.jsonl"
    link.symlink_to(tmp_path / "missing" / "target.jsonl")

    result = run_label(env, str(source), *SPAM_HAM, "-o", str(link))

    assert result.returncode == 2
    assert f"-o {link} is a link to {tmp_path}/missing/target.jsonl, whose directory" in (
        one_error(result)
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]


def test_a_link_as_output_stays_a_link_through_retry_failed(
    env: dict[str, str], tmp_path: Path
) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text('{"id": 1, "text": "hi"}\n{"id": 2, "text": null}\n')
    (tmp_path / "data").mkdir()
    target = tmp_path / "data" / "labels.jsonl"
    link = tmp_path / "labels.jsonl"
    link.symlink_to(target)
    args = [str(source), *SPAM_HAM, "-o", str(link)]
    assert run_label(env, *args).returncode == 1
    source.write_text('{"id": 1, "text": "hi"}\n{"id": 2, "text": "fixed"}\n')

    result = run_label(env, *args, "--retry-failed")

    assert result.returncode == 0, result.stderr
    assert link.is_symlink() and link.resolve() == target
    rows = read_records(target)
    assert sorted((r["key"], r["status"]) for r in rows) == [(1, "done"), (2, "done")]
    assert manifest_path(target).exists() and not manifest_path(link).exists()


# -- --retry-failed with no output yet ------------------------------------------------------------


def test_retry_failed_with_no_output_yet_labels_every_row(
    env: dict[str, str], tmp_path: Path
) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text('{"id": 1, "text": "hi"}\n{"id": 2, "text": "win"}\n')
    out = tmp_path / "out.jsonl"
    result = run_label(env, str(source), *SPAM_HAM, "-o", str(out), "--retry-failed")
    assert result.returncode == 0, result.stderr
    assert "done 2, failed 0, skipped 0" in result.stderr
    assert sorted(r["key"] for r in read_records(out)) == [1, 2]


# -- Ctrl-C in the first second, on the embedded cluster ------------------------------------


@pytest.mark.parametrize("delay_s", [0.3, 0.8, 1.5])
def test_ctrl_c_while_the_command_starts_exits_130_quietly(tmp_path: Path, delay_s: float) -> None:
    """During the imports, the embedded cluster's start or the first row: exit 130, one line,
    no traceback, no empty output, no process left running."""
    source = tmp_path / "in.jsonl"
    source.write_text('{"id": 1, "text": "hi"}\n{"id": 2, "text": "win"}\n')
    out = tmp_path / "out.jsonl"
    command = [sys.executable, "-m", "sibylq", "label", str(source), "--model", "fake:delay=2",
               "--classify", "spam,ham", "--prompt", PROMPT, "-o", str(out)]  # fmt: skip
    process = subprocess.Popen(command, env=_embedded_env(), stderr=subprocess.PIPE, text=True)
    time.sleep(delay_s)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)

    # 130; or, when Ctrl-C comes before the command's handler is in place, the signal's own
    # end (-2), as for any Python program.
    assert process.returncode in (130, -signal.SIGINT), stderr
    assert "Traceback" not in stderr and "Exception" not in stderr, stderr
    if process.returncode == 130:
        assert "interrupted" in stderr.strip().splitlines()[-1]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["in.jsonl"]
    if "sibylq label: interrupted" in stderr:
        assert f"no row had finished: {out} was not created" in stderr


def test_a_repeated_key_on_the_embedded_cluster_is_one_error_line(tmp_path: Path) -> None:
    """The run stops while the cluster may still be starting: no traceback from its thread."""
    source = tmp_path / "in.jsonl"
    source.write_text('{"id": 1, "text": "a"}\n{"id": 1, "text": "b"}\n')
    out = tmp_path / "out.jsonl"
    result = run_label(_embedded_env(), str(source), *SPAM_HAM, "-o", str(out))
    assert result.returncode == 2
    assert "line 2 has the same key 1 as line 1: keys must be unique" in one_error(result)
    assert "Exception in thread" not in result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["in.jsonl"]


def test_ctrl_c_while_the_embedded_cluster_stops_changes_nothing(tmp_path: Path) -> None:
    """The summary is printed, the embedded cluster is stopping (impatient users press Ctrl-C
    then): the run's exit status stands, no traceback from the stop."""
    source = tmp_path / "in.jsonl"
    source.write_text("".join(f'{{"id": {i}, "text": "t{i}"}}\n' for i in range(1, 4)))
    out = tmp_path / "out.jsonl"
    command = [sys.executable, "-m", "sibylq", "label", str(source), *SPAM_HAM, "-o", str(out)]
    process = subprocess.Popen(command, env=_embedded_env(), stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    lines = []
    for line in process.stderr:
        lines.append(line)
        if line.startswith("sibylq label: done 3"):
            process.send_signal(signal.SIGINT)
            break
    _, rest = process.communicate(timeout=60)
    stderr = "".join(lines) + rest

    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert sorted(r["key"] for r in read_records(out)) == [1, 2, 3]
