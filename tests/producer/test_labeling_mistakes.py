"""Every mistake a new user makes with ``sibylq label`` ends in a clear error or a right output:
never stale, duplicated or mangled rows, never a traceback, never a hang.

Exit statuses: 0 every row done, 1 some rows failed, 2 a mistake found before any work,
3 the run stopped (no worker, no Redis).
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import pytest
import redis

from embedded.redis_server import RedisServer
from producer import Client, InvalidRequestError, Models, NoWorkerError
from producer.labeling import label, make_task
from producer.labeling.manifest import manifest_path
from tests.conftest import Worker
from tests.producer.labeling_cli import PROMPT, SPAM_HAM, one_error, read_records, run_label
from wire.constants import queue_name


def _sms(n: int) -> list[dict[str, Any]]:
    return [{"id": i, "text": f"message number {i}"} for i in range(1, n + 1)]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def env(worker_env: dict[str, str], fake_worker: Worker) -> dict[str, str]:
    return worker_env


# -- 1. resume reuses only rows made by the same command -----------------------------------


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (["--model", "fake:delay=0", "--classify", "spam,ham", "--prompt", PROMPT], "model"),
        (
            ["--model", "fake", "--classify", "yes,no", "--prompt", PROMPT],
            'labels ["spam","ham"] before, ["yes","no"] now',
        ),
        (["--model", "fake", "--classify", "spam,ham", "--prompt", "Spam? {text}"], "template"),
        ([*SPAM_HAM, "--max-tokens", "64"], "genconf max_tokens 1024 before, 64 now"),
        ([*SPAM_HAM, "--inst", "Answer briefly."], "inst"),
        ([*SPAM_HAM, "--id-field", "text"], "id field"),
        (["--model", "fake", "--extract", "SCHEMA", "--prompt", PROMPT], "task"),
    ],
)
def test_a_rerun_with_another_command_stops_and_says_how_to_start_fresh(
    env: dict[str, str], tmp_path: Path, change: list[str], named: str
) -> None:
    source = _write_jsonl(tmp_path / "in.jsonl", _sms(6))
    (tmp_path / "schema.json").write_text(json.dumps({"enum": ["spam", "ham"]}))
    change = [str(tmp_path / "schema.json") if arg == "SCHEMA" else arg for arg in change]
    out = tmp_path / "out.jsonl"
    assert run_label(env, str(source), *SPAM_HAM, "-o", str(out)).returncode == 0
    before = out.read_bytes(), manifest_path(out).read_bytes()

    result = run_label(env, str(source), *change, "-o", str(out))

    assert result.returncode == 2
    error = one_error(result)
    assert "holds rows made by another command" in error and named in error
    assert "another -o" in error and "--overwrite" in error
    assert (out.read_bytes(), manifest_path(out).read_bytes()) == before


def test_overwrite_replaces_the_rows_of_another_command(
    env: dict[str, str], tmp_path: Path
) -> None:
    source = _write_jsonl(tmp_path / "in.jsonl", _sms(6))
    out = tmp_path / "out.jsonl"
    assert run_label(env, str(source), *SPAM_HAM, "-o", str(out)).returncode == 0
    yes_no = ["--model", "fake", "--classify", "yes,no", "--prompt", PROMPT, "-o", str(out)]

    result = run_label(env, str(source), *yes_no, "--overwrite")

    assert result.returncode == 0, result.stderr
    assert "done 6, failed 0, skipped 0" in result.stderr
    records = read_records(out)
    assert sorted(r["key"] for r in records) == [1, 2, 3, 4, 5, 6]
    assert {r["result"] for r in records} == {"yes"}  # the fake model picks the first label
    fingerprint = json.loads(manifest_path(out).read_text())["fingerprint"]
    assert all(r["job_id"].startswith(f"label-{fingerprint}-") for r in records)
    again = run_label(env, str(source), *yes_no)  # the same command resumes again
    assert (again.returncode, len(read_records(out))) == (0, 6)
    assert "skipped 6" in again.stderr


def test_an_output_with_no_manifest_is_not_reused(env: dict[str, str], tmp_path: Path) -> None:
    source = _write_jsonl(tmp_path / "in.jsonl", _sms(3))
    out = tmp_path / "precious.jsonl"
    out.write_text('{"mine": true}\n')

    result = run_label(env, str(source), *SPAM_HAM, "-o", str(out))

    assert result.returncode == 2
    assert "no precious.jsonl.manifest.json next to it" in one_error(result)
    assert out.read_text() == '{"mine": true}\n'
    assert not manifest_path(out).exists()


# -- 2. --retry-failed keeps a CSV output CSV ------------------------------------------------


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as source:
        return list(csv.DictReader(source))


def test_retry_failed_keeps_a_csv_output_csv_and_a_rerun_adds_nothing(
    env: dict[str, str], tmp_path: Path
) -> None:
    rows = _sms(6)
    del rows[3]["text"]
    source = _write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.csv"
    args = [str(source), *SPAM_HAM, "-o", str(out)]
    assert run_label(env, *args).returncode == 1
    rows[3]["text"] = "fixed"
    _write_jsonl(source, rows)

    retried = run_label(env, *args, "--retry-failed")
    again = run_label(env, *args)

    assert (retried.returncode, again.returncode) == (0, 0), retried.stderr + again.stderr
    assert "done 1, failed 0, skipped 5" in retried.stderr
    assert "done 0, failed 0, skipped 6" in again.stderr
    assert out.read_text().splitlines()[0] == (
        "key,line,status,result,error,attempts,retries,prompt_tokens,completion_tokens,"
        "latency_s,job_id,label_probs"
    )
    table = _csv_rows(out)
    assert sorted(int(row["key"]) for row in table) == [1, 2, 3, 4, 5, 6]
    assert {row["status"] for row in table} == {"done"}
    assert {row["result"] for row in table} == {'"spam"'}  # JSON in the cell
    assert {row["error"] for row in table} == {"null"}
    retried_row = next(row for row in table if row["key"] == "4")
    assert (retried_row["retries"], retried_row["line"]) == ("1", "4")
    assert not (tmp_path / "out.csv.tmp").exists()


# -- 3. a template field no row has stops before any work; failed rows exit 1 ---------------


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_a_template_field_no_row_has_stops_before_any_work(
    env: dict[str, str], tmp_path: Path, suffix: str
) -> None:
    source = tmp_path / f"in{suffix}"
    if suffix == ".csv":
        source.write_text("id,text\n1,hello\n2,win money\n")
    else:
        _write_jsonl(source, _sms(3))
    out = tmp_path / "out.jsonl"

    result = run_label(env, str(source), "--model", "fake", "--classify", "spam,ham",
                    "--prompt", "Is this SMS spam? {body}", "-o", str(out))  # fmt: skip

    assert result.returncode == 2
    error = one_error(result)
    assert error.startswith("sibylq: error: the prompt template uses {body}")
    assert "(line 1 has: id, text)" in error or "(line 2 has: id, text)" in error
    assert not out.exists() and not manifest_path(out).exists()


def test_an_id_field_no_row_has_stops_before_any_work(env: dict[str, str], tmp_path: Path) -> None:
    source = _write_jsonl(tmp_path / "in.jsonl", _sms(3))
    out = tmp_path / "out.jsonl"

    result = run_label(env, str(source), *SPAM_HAM, "-o", str(out), "--id-field", "sms_id")

    assert result.returncode == 2
    assert "the rows have no id field 'sms_id' (line 1 has: id, text)" in one_error(result)
    assert not out.exists()


def test_a_run_that_ends_with_failed_rows_exits_1_and_says_where_the_errors_are(
    env: dict[str, str], tmp_path: Path
) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text('{"id": 1, "text": "ok"}\n' + "{not json\n" * 3)
    out = tmp_path / "out.jsonl"

    result = run_label(env, str(source), *SPAM_HAM, "-o", str(out))

    assert result.returncode == 1
    assert "done 1, failed 3, skipped 0" in result.stderr
    assert f'3 rows failed: see "error" in {out}; --retry-failed re-runs them' in result.stderr


# -- 4. an unusable output is refused before any work, leaving nothing behind ---------------


@pytest.mark.parametrize(
    ("output", "says"),
    [
        ("missing/dir/out.jsonl", "the directory {tmp}/missing/dir does not exist"),
        ("a_directory", "-o {tmp}/a_directory is a directory: name a file"),
        ("in.jsonl", "-o {tmp}/in.jsonl is the input file"),
    ],
)
def test_an_unusable_output_is_one_error_line(
    env: dict[str, str], tmp_path: Path, output: str, says: str
) -> None:
    source = _write_jsonl(tmp_path / "in.jsonl", _sms(3))
    (tmp_path / "a_directory").mkdir()
    listing = sorted(tmp_path.rglob("*"))

    result = run_label(env, str(source), *SPAM_HAM, "-o", str(tmp_path / output))

    assert result.returncode == 2
    assert says.format(tmp=tmp_path) in one_error(result)
    assert sorted(tmp_path.rglob("*")) == listing


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_a_read_only_directory_is_refused(env: dict[str, str], tmp_path: Path) -> None:
    source = _write_jsonl(tmp_path / "in.jsonl", _sms(3))
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    result = run_label(env, str(source), *SPAM_HAM, "-o", str(locked / "out.jsonl"))
    assert result.returncode == 2
    assert f"{locked} is not writable" in one_error(result)


def test_a_model_that_cannot_start_leaves_no_output(tmp_path: Path) -> None:
    """On the embedded cluster (no SIBYLQ_BROKER_URL): the worker for the model exits."""
    source = _write_jsonl(tmp_path / "in.jsonl", _sms(2))
    out = tmp_path / "out.jsonl"
    env = {name: value for name, value in os.environ.items() if not name.startswith("SIBYLQ_")}
    args = ["--model", "llamacpp:nope", "--classify", "spam,ham", "--prompt", PROMPT]

    result = run_label(env, str(source), *args, "-o", str(out))

    assert result.returncode == 2
    assert "no llama.cpp model 'nope'" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["in.jsonl"]


# -- 5. one label is refused, and labels separated by spaces are explained -----------------


def test_one_label_is_refused(env: dict[str, str], tmp_path: Path) -> None:
    source = _write_jsonl(tmp_path / "in.jsonl", _sms(2))
    out = tmp_path / "out.jsonl"
    result = run_label(env, str(source), "--model", "fake", "--classify", "spam",
                    "--prompt", PROMPT, "-o", str(out))  # fmt: skip
    assert result.returncode == 2
    assert "--classify needs two labels or more, comma-separated (--classify spam,ham)" in (
        one_error(result)
    )
    assert not out.exists()


def test_labels_separated_by_spaces_are_explained_under_the_label_usage(tmp_path: Path) -> None:
    result = run_label(os.environ.copy(), "in.jsonl", "--model", "fake", "--classify", "spam",
                    "ham", "--prompt", PROMPT, "-o", str(tmp_path / "out.jsonl"))  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith("usage: sibylq label ")
    assert result.stderr.splitlines()[-1] == (
        "sibylq label: error: unrecognized arguments: ham. "
        "--classify takes the labels comma-separated: --classify spam,ham"
    )


def test_an_unquoted_prompt_is_explained(tmp_path: Path) -> None:
    result = run_label(os.environ.copy(), "in.jsonl", "--model", "fake", "--classify", "a,b",
                    "--prompt", "Is", "this", "{text}", "-o", "out.jsonl")  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].endswith(
        "Quote a value with spaces: --prompt 'Is this {text}'"
    )


def test_a_template_that_cannot_format_a_rows_values_fails_that_row(
    env: dict[str, str], tmp_path: Path
) -> None:
    source = tmp_path / "in.csv"
    source.write_text("id,price\n1,3.5\n2,4\n")  # CSV values are text: no :.2f
    out = tmp_path / "out.jsonl"

    result = run_label(env, str(source), "--model", "fake", "--classify", "cheap,dear",
                    "--prompt", "Price {price:.2f}?", "-o", str(out))  # fmt: skip

    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    errors = [record["error"]["message"] for record in read_records(out)]
    assert len(errors) == 2
    assert all("cannot format this row's values: ValueError: Unknown format code 'f'" in error
               for error in errors)  # fmt: skip


@pytest.mark.parametrize(
    ("task", "says"),
    [
        (["--classify", "spam,ham", "--prompt", "Spam? {text!z}"], "conversion is !r, !s or !a"),
        (["--classify", "LABELS", "--prompt", PROMPT], "cannot read labels file"),
        (["--extract", "SCHEMA", "--prompt", PROMPT], "cannot read JSON schema"),
    ],
)
def test_a_bad_template_or_a_file_that_is_not_utf8_stops_before_any_work(
    env: dict[str, str], tmp_path: Path, task: list[str], says: str
) -> None:
    source = _write_jsonl(tmp_path / "in.jsonl", _sms(2))
    files = {"LABELS": tmp_path / "labels.txt", "SCHEMA": tmp_path / "schema.json"}
    files["LABELS"].write_bytes(b"spam\n\xff\xfeham\n")
    files["SCHEMA"].write_bytes(b'{"enum": ["\xff"]}')
    task = [str(files.get(arg, arg)) for arg in task]
    out = tmp_path / "out.jsonl"

    result = run_label(env, str(source), "--model", "fake", *task, "-o", str(out))

    assert result.returncode == 2
    assert says in one_error(result)
    assert not out.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may read anything")
def test_an_unreadable_input_is_one_error_line(env: dict[str, str], tmp_path: Path) -> None:
    source = _write_jsonl(tmp_path / "in.jsonl", _sms(2))
    source.chmod(0)
    result = run_label(env, str(source), *SPAM_HAM, "-o", str(tmp_path / "out.jsonl"))
    assert result.returncode == 2
    assert f"cannot read input file {source}: Permission denied" in one_error(result)


def test_the_python_api_refuses_one_label(client: Client) -> None:
    model = Models.create("fake", client=client)
    for one in (["spam"], Literal["spam"]):
        with pytest.raises(InvalidRequestError, match="two labels or more"):
            make_task(model, prompt=PROMPT, classify=one)


# -- 6. a failed row's bookkeeping agrees with its error -----------------------------------


def test_a_failed_rows_attempts_tokens_and_latency_agree_with_its_error(
    worker_env: dict[str, str], openai_worker: Worker, tmp_path: Path
) -> None:
    source = _write_jsonl(tmp_path / "in.jsonl", _sms(2))
    out = tmp_path / "out.jsonl"
    result = run_label(worker_env, str(source), "--model", "openai:stub-invalid", "--classify",
                    "spam,ham", "--prompt", PROMPT, "-o", str(out))  # fmt: skip
    assert result.returncode == 1, result.stderr
    for record in read_records(out):
        assert record["status"] == "failed"
        assert record["error"]["type"] == "OutputValidationError"
        assert record["error"]["message"].endswith("(after 3 tries)")  # SIBYLQ_REASK_MAX=2
        assert record["attempts"] == 3
        assert record["completion_tokens"] > 0 and record["latency_s"] > 0


# -- 7. a wait error ends the row or the run: never a hang ----------------------------------


def test_no_worker_stops_the_run_with_a_clear_error(
    worker_env: dict[str, str], redis_server: RedisServer, tmp_path: Path
) -> None:
    source = _write_jsonl(tmp_path / "in.jsonl", _sms(3))
    out = tmp_path / "out.jsonl"
    env = {**worker_env, "SIBYLQ_NO_WORKER_TIMEOUT_S": "1"}
    args = ["--model", "llamacpp:/models/unserved.gguf", "--classify", "spam,ham"]
    try:
        result = run_label(env, str(source), *args, "--prompt", PROMPT, "-o", str(out), timeout=60)
    finally:
        admin = redis.Redis.from_url(redis_server.url)
        admin.delete(queue_name("llamacpp", "unserved"))
        admin.close()
    assert result.returncode == 3
    error = one_error(result)
    assert "no live worker serves queue 'sibylq.llamacpp.unserved'" in error
    assert "sibylq worker llamacpp:/models/unserved.gguf" in error
    assert f"stopped; no row had finished: {out} was not created" in result.stderr
    assert "Exception in callback" not in result.stderr
    assert not out.exists()


def test_a_wait_that_times_out_is_a_failed_row(env: dict[str, str], tmp_path: Path) -> None:
    source = _write_jsonl(tmp_path / "in.jsonl", _sms(3))
    out = tmp_path / "out.jsonl"
    slow = {**env, "SIBYLQ_RESULT_TIMEOUT_S": "0.3"}
    result = run_label(slow, str(source), "--model", "fake:delay=2", "--classify", "spam,ham",
                    "--prompt", PROMPT, "-o", str(out), timeout=60)  # fmt: skip
    assert result.returncode == 1, result.stderr
    records = read_records(out)
    assert sorted(r["key"] for r in records) == [1, 2, 3]
    assert Counter(r["error"]["type"] for r in records) == {"JobTimeoutError": 3}
    assert all("gave no result within 0.3s" in r["error"]["message"] for r in records)


def test_the_python_api_raises_no_worker_instead_of_hanging(client: Client) -> None:
    model = Models.create("llamacpp:/models/unserved-api.gguf", client=client)
    task = make_task(model, prompt=PROMPT, classify=["spam", "ham"])
    try:
        with pytest.raises(NoWorkerError, match=r"sibylq\.llamacpp\.unserved-api"):
            list(label(task, _sms(3)))
    finally:
        client.redis.delete(queue_name("llamacpp", "unserved-api"))


def test_a_key_given_twice_is_an_error_not_a_copied_answer(
    env: dict[str, str], tmp_path: Path
) -> None:
    source = _write_jsonl(tmp_path / "in.jsonl", [*_sms(3), {"id": 2, "text": "another"}])
    result = run_label(env, str(source), *SPAM_HAM, "-o", str(tmp_path / "out.jsonl"))
    assert result.returncode == 2
    assert "line 4 has the same key 2 as line 2: keys must be unique" in one_error(result)
