"""``sibylq label`` and the labeling API: every row ends up in the output exactly once,
failures are data, runs resume, and Redis holds a bounded number of jobs."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis

from embedded.redis_server import RedisServer
from producer import Client, Models
from producer.labeling import label, label_async, make_task
from tests.conftest import Worker

PROMPT = "Is this SMS spam? {text}"


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _sms(n: int) -> list[dict[str, Any]]:
    return [{"id": i, "text": f"message number {i}"} for i in range(1, n + 1)]


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _label(env: dict[str, str], *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "sibylq", "label", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, **kw)


@pytest.fixture
def env(worker_env: dict[str, str], fake_worker: Worker) -> dict[str, str]:
    return worker_env


class TestCommand:
    def test_labels_every_row_once_and_summarises(
        self, env: dict[str, str], tmp_path: Path
    ) -> None:
        source = _write_jsonl(tmp_path / "in.jsonl", _sms(30))
        out = tmp_path / "out.jsonl"
        result = _label(env, str(source), "--model", "fake", "--classify", "spam,ham",
                        "--prompt", PROMPT, "-o", str(out))  # fmt: skip
        assert result.returncode == 0, result.stderr
        records = _records(out)
        assert sorted(r["key"] for r in records) == list(range(1, 31))
        assert {r["status"] for r in records} == {"done"}
        assert {r["result"] for r in records} <= {"spam", "ham"}
        assert all(r["prompt_tokens"] > 0 and r["latency_s"] > 0 for r in records)
        assert "done 30, failed 0, skipped 0" in result.stderr

    def test_the_summary_sums_tokens_and_prices_them(
        self, env: dict[str, str], tmp_path: Path
    ) -> None:
        source = _write_jsonl(tmp_path / "in.jsonl", _sms(10))
        out = tmp_path / "out.jsonl"
        priced = {**env, "SIBYLQ_PRICES": '{"fake": {"input": 1000000, "output": 2000000}}'}
        result = _label(priced, str(source), "--model", "fake", "--classify", "spam,ham",
                        "--prompt", PROMPT, "-o", str(out))  # fmt: skip
        assert result.returncode == 0, result.stderr
        records = _records(out)
        prompt = sum(r["prompt_tokens"] for r in records)
        completion = sum(r["completion_tokens"] for r in records)
        # $1 per prompt token, $2 per completion token: the cost is plain to check.
        assert f"tokens {prompt + completion} ({prompt} prompt + {completion} completion)" in (
            result.stderr
        )
        assert f"cost ${prompt + 2 * completion:.4f}" in result.stderr

    def test_a_rerun_skips_finished_rows_and_labels_new_ones(
        self, env: dict[str, str], tmp_path: Path
    ) -> None:
        source = _write_jsonl(tmp_path / "in.jsonl", _sms(10))
        out = tmp_path / "out.jsonl"
        args = ["--model", "fake", "--classify", "spam,ham", "--prompt", PROMPT, "-o", str(out)]
        assert _label(env, str(source), *args).returncode == 0
        _write_jsonl(source, _sms(15))  # the input grew
        result = _label(env, str(source), *args)
        assert "done 5, failed 0, skipped 10" in result.stderr
        assert Counter(r["key"] for r in _records(out)) == Counter(range(1, 16))

    def test_malformed_rows_are_reported_with_their_line_and_the_run_goes_on(
        self, env: dict[str, str], tmp_path: Path
    ) -> None:
        source = tmp_path / "in.jsonl"
        source.write_bytes(
            b'{"id": 1, "text": "fine"}\n'
            b"{not json\n"
            b'{"id": 3, "body": "no text field"}\n'
            b'{"id": 4, "text": "bad bytes \xff\xfe"}\n'
            b'{"id": 5, "text": "fine too"}\n'
        )
        out = tmp_path / "out.jsonl"
        result = _label(env, str(source), "--model", "fake", "--classify", "spam,ham",
                        "--prompt", PROMPT, "-o", str(out), "--ordered")  # fmt: skip
        assert result.returncode == 1, result.stderr  # the run ends with failed rows
        assert "3 rows failed" in result.stderr and "--retry-failed" in result.stderr
        records = _records(out)
        assert [r["line"] for r in records] == [1, 2, 3, 4, 5]
        assert [r["status"] for r in records] == ["done", "failed", "failed", "failed", "done"]
        assert "line 2 is not valid JSON" in records[1]["error"]["message"]
        assert "line 3: row has no field 'text'" in records[2]["error"]["message"]
        assert "line 4 is not UTF-8" in records[3]["error"]["message"]

    def test_retry_failed_reruns_only_failed_rows(
        self, env: dict[str, str], tmp_path: Path
    ) -> None:
        rows = _sms(4)
        del rows[2]["text"]
        source = _write_jsonl(tmp_path / "in.jsonl", rows)
        out = tmp_path / "out.jsonl"
        args = ["--model", "fake", "--classify", "spam,ham", "--prompt", PROMPT, "-o", str(out)]
        assert _label(env, str(source), *args).returncode == 1
        assert Counter(r["status"] for r in _records(out)) == {"done": 3, "failed": 1}
        again = _label(env, str(source), *args)  # without --retry-failed: still failed
        assert again.returncode == 1
        assert "skipped 4 (1 failed)" in again.stderr

        rows[2]["text"] = "fixed"
        _write_jsonl(source, rows)
        result = _label(env, str(source), *args, "--retry-failed")
        assert result.returncode == 0, result.stderr
        assert "done 1, failed 0, skipped 3" in result.stderr
        records = {r["key"]: r for r in _records(out)}
        assert len(_records(out)) == 4
        assert records[3]["status"] == "done"
        assert (records[3]["retries"], records[3]["attempts"]) == (1, 1)
        assert records[3]["job_id"].endswith("-2")

    def test_csv_in_and_out(self, env: dict[str, str], tmp_path: Path) -> None:
        source = tmp_path / "in.csv"
        source.write_text("sms_id,text\na1,hello\na2,win money now\n")
        out = tmp_path / "out.csv"
        result = _label(env, str(source), "--model", "fake", "--classify", "spam,ham",
                        "--prompt", PROMPT, "-o", str(out), "--id-field", "sms_id")  # fmt: skip
        assert result.returncode == 0, result.stderr
        lines = out.read_text().splitlines()
        assert lines[0].startswith("key,line,status,result")
        assert sorted(line.split(",")[0] for line in lines[1:]) == ["a1", "a2"]

    def test_extract_with_a_json_schema_file(self, env: dict[str, str], tmp_path: Path) -> None:
        schema = {"type": "object", "properties": {"topic": {"type": "string"}},
                  "required": ["topic"]}  # fmt: skip
        (tmp_path / "schema.json").write_text(json.dumps(schema))
        source = _write_jsonl(tmp_path / "in.jsonl", _sms(3))
        out = tmp_path / "out.jsonl"
        schema_file = str(tmp_path / "schema.json")
        result = _label(env, str(source), "--model", "fake", "--extract", schema_file,
                        "--prompt", PROMPT, "-o", str(out))  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert [r["result"] for r in _records(out)] == [{"topic": "fake"}] * 3

    def test_ctrl_c_keeps_finished_rows_and_the_rerun_completes_exactly_the_rest(
        self, env: dict[str, str], tmp_path: Path, redis_server: RedisServer
    ) -> None:
        source = _write_jsonl(tmp_path / "in.jsonl", _sms(60))
        out = tmp_path / "out.jsonl"
        args = [str(source), "--model", "fake:delay=0.1", "--classify", "spam,ham",
                "--prompt", PROMPT, "-o", str(out), "--max-in-flight", "8"]  # fmt: skip
        command = [sys.executable, "-m", "sibylq", "label", *args]
        process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while (not out.exists() or len(out.read_text().splitlines()) < 10) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == 130, stderr
        assert "Run the same command again to resume" in stderr
        first = {r["key"] for r in _records(out)}
        assert 10 <= len(first) < 60

        result = _label(env, *args)
        assert result.returncode == 0, result.stderr
        assert Counter(r["key"] for r in _records(out)) == Counter(range(1, 61))
        ids = [r["job_id"] for r in _records(out)]
        assert len(set(ids)) == 60


class TestPythonApi:
    def test_label_yields_results_as_they_complete(
        self, client: Client, fake_worker: Worker
    ) -> None:
        task = make_task(Models.create("fake", client=client), prompt=PROMPT, classify=["a", "b"])
        results = list(label(task, _sms(20)))
        assert sorted(r.key for r in results) == list(range(1, 21))
        assert all(r.ok and r.result == "a" for r in results)

    async def test_label_async_in_order(self, client: Client, fake_worker: Worker) -> None:
        task = make_task(Models.create("fake", client=client), prompt="{text}", extract=list[str])
        keys = [r.key async for r in label_async(task, _sms(25), ordered=True, max_in_flight=4)]
        assert keys == list(range(1, 26))

    def test_at_most_max_in_flight_jobs_are_queued(
        self, client: Client, fake_worker: Worker, redis_server: RedisServer
    ) -> None:
        admin = redis.Redis.from_url(redis_server.url)
        task = make_task(Models.create("fake:delay=0.05", client=client), prompt="{text}",
                         classify=["a", "b"])  # fmt: skip
        seen: list[int] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                seen.append(int(admin.llen("sibylq.fake")))
                time.sleep(0.01)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            assert len(list(label(task, _sms(200), max_in_flight=5))) == 200
        finally:
            stop.set()
            sampler.join()
            admin.close()
        assert max(seen) <= 5


def test_the_readme_example_labels_sms_with_the_bundled_model(
    worker_env: dict[str, str], llama_worker: Worker, tmp_path: Path
) -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "sms_spam_sample.jsonl"
    source = tmp_path / "sample.jsonl"
    source.write_text("".join(example.read_text().splitlines(keepends=True)[:4]))
    out = tmp_path / "labels.jsonl"
    result = _label(worker_env, str(source), "--model", "llamacpp:smollm2",
                    "--classify", "spam,ham", "--prompt", PROMPT, "-o", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    records = _records(out)
    assert sorted(r["key"] for r in records) == [1, 2, 3, 4]
    assert all(r["status"] == "done" and r["result"] in ("spam", "ham") for r in records)
    assert all(r["completion_tokens"] > 0 for r in records)


def test_a_retry_failed_run_interrupted_mid_retry_is_resumed_not_redone(
    env: dict[str, str], fake_worker: Worker, tmp_path: Path
) -> None:
    rows = _sms(3)
    del rows[1]["text"], rows[2]["text"]  # rows 2 and 3 fail: no field for the template
    source = _write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    prompt = f"Is this SMS spam? {{text}} ({uuid.uuid4().hex})"  # job ids of this test alone
    args = [str(source), "--model", "fake:delay=2", "--classify", "spam,ham", "--prompt", prompt,
            "-o", str(out), "--max-in-flight", "1", "--ordered"]  # fmt: skip
    assert _label(env, *args).returncode == 1
    rows[1]["text"], rows[2]["text"] = "fixed", "fixed too"
    _write_jsonl(source, rows)

    # Ctrl-C once row 2's retry is written: row 3's retry (attempt 2) is still running.
    retry = subprocess.Popen([sys.executable, "-m", "sibylq", "label", *args, "--retry-failed"],
                             env=env, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 60
    while [r["status"] for r in _records(out)] != ["done", "done"]:
        assert retry.poll() is None and time.monotonic() < deadline, retry.stderr
        time.sleep(0.05)
    retry.send_signal(signal.SIGINT)
    assert retry.wait(timeout=30) == 130

    resumed = _label(env, *args)  # no --retry-failed: the retry in flight is attached to

    assert resumed.returncode == 0, resumed.stderr
    third = {r["key"]: r for r in _records(out)}[3]
    assert (third["status"], third["retries"]) == ("done", 1)
    assert third["job_id"].endswith("-2")
    first_attempt = third["job_id"][: -len("-2")] + "-1"
    assert first_attempt not in fake_worker.log()  # not labeled afresh: no work paid twice
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "in.jsonl", "out.jsonl", "out.jsonl.manifest.json",
    ]  # fmt: skip
