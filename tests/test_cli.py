"""The ``sibylq`` command."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import redis

from embedded.redis_server import RedisServer
from producer import Client, Job
from sibylq import deadletters
from sibylq.cli import build_parser, main
from tests.conftest import Worker
from tests.dead_letters import EXPIRE_S, FAKE, PARKED, bury, dead_letter, undecodable_letter
from wire.constants import DEAD_LETTERS_KEY, dead_letter_key
from wire.deadletters import DeadLetter, list_dead, record
from wire.settings import get_settings


def _sibylq(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sibylq", *args], capture_output=True, text=True, timeout=60
    )


# -- help and version ------------------------------------------------------------------------


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (commands,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(commands.choices)


def _help(capsys: pytest.CaptureFixture[str], *command: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_the_top_level_help_says_what_sibylq_is_with_examples(
    capsys: pytest.CaptureFixture[str],
) -> None:
    text = _help(capsys)
    assert "The ``sibylq`` command." not in text
    assert "Typed LLM jobs at scale" in text
    assert "examples:\n  sibylq label examples/sms_spam_sample.jsonl" in text
    for command in _commands():
        assert f"    {command}" in text


def test_version_is_the_installed_one() -> None:
    result = _sibylq("--version")
    assert (result.returncode, result.stdout) == (0, f"sibylq {version('sibylq')}\n")


@pytest.mark.parametrize("command", sorted(set(_commands()) - {"redis-server"}))
def test_every_command_helps_on_its_own(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A description, an example, help for every argument, and the defaults that exist."""
    parser = _commands()[command]
    assert parser.description and len(parser.description) > 40
    assert parser.epilog and "example" in parser.epilog and f"sibylq {command}" in parser.epilog
    for action in parser._actions:
        assert action.help, f"sibylq {command} {action.dest} has no help"
    options = _help(capsys, command).split("\noptions:\n")[1].split("\n\n")[0]
    entries = re.split(r"\n(?=  -)", options)
    for action in parser._actions:
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            (entry,) = (entry for entry in entries if action.option_strings[-1] in entry)
            assert "default" in entry, f"sibylq {command} {action.dest}: default not shown"


def test_label_help_lists_the_exit_statuses(capsys: pytest.CaptureFixture[str]) -> None:
    text = _help(capsys, "label")
    statuses = text.split("exit status:\n")[1].split("\n")
    assert [line.split()[0] for line in statuses if line[:3].strip().isdigit()] == [
        "0", "1", "2", "3", "130",
    ]  # fmt: skip


def test_queue_prints_where_a_models_jobs_go() -> None:
    result = _sibylq("queue", "llamacpp:/models/Qwen.gguf")
    assert result.returncode == 0
    assert result.stdout.strip() == "sibylq.llamacpp.Qwen"


def test_a_worker_for_an_unknown_model_fails_at_once_saying_why() -> None:
    result = _sibylq("worker", "llamacpp:no-such-model")
    assert result.returncode == 2
    assert "no llama.cpp model 'no-such-model'" in result.stderr
    assert "SIBYLQ_MODELS_DIR" in result.stderr


def test_an_unknown_provider_fails_at_once() -> None:
    result = _sibylq("worker", "cohere:command-r")
    assert result.returncode == 2
    assert "unknown provider 'cohere'" in result.stderr


def test_redis_server_runs_the_binary_it_finds() -> None:
    result = _sibylq("redis-server", "--version")
    assert result.returncode == 0
    assert "Redis server" in result.stdout


# -- dead letters: `sibylq failed` and `sibylq retry` ----------------------------------------


def _sibylq_at(broker_url: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    """``sibylq ARGS`` with ``SIBYLQ_BROKER_URL`` set to ``broker_url`` (None: unset)."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("SIBYLQ_")}
    if broker_url is not None:
        env["SIBYLQ_BROKER_URL"] = broker_url
    return subprocess.run(
        [sys.executable, "-m", "sibylq", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("command", [["failed"], ["retry", "--all"]])
def test_dead_letter_commands_need_the_fleets_broker(command: list[str]) -> None:
    result = _sibylq_at(None, *command)
    assert result.returncode == 2
    assert "SIBYLQ_BROKER_URL is not set" in result.stderr


def test_failed_says_so_when_no_job_failed(
    redis_server: RedisServer, dead_letters: redis.Redis
) -> None:
    result = _sibylq_at(redis_server.url, "failed")
    assert (result.returncode, result.stdout) == (0, "no failed jobs\n")
    assert _sibylq_at(redis_server.url, "failed", "--json").stdout == ""


def test_failed_shows_a_table_newest_first_with_the_last_output_cut_short(
    redis_server: RedisServer, dead_letters: redis.Redis
) -> None:
    long_output = "{\n" + "x" * 500
    record(dead_letters, dead_letter("older", ago_s=60), EXPIRE_S)
    record(dead_letters, dead_letter("newer", raw_outputs=("first", long_output)), EXPIRE_S)

    result = _sibylq_at(redis_server.url, "failed")

    assert result.returncode == 0, result.stderr
    header, newer, older = result.stdout.splitlines()
    assert header.split()[:4] == ["JOB", "ID", "QUEUE", "FAILED"]
    assert newer.startswith("newer ") and older.startswith("older ")
    assert all(word in newer for word in ("sibylq.fake", "OutputValidationError", " 2 "))
    assert "{ xxx" in newer and "x" * 100 not in newer
    assert '{"name": "Ann"' in older


def test_failed_json_lines_carry_everything(
    redis_server: RedisServer, dead_letters: redis.Redis
) -> None:
    letters = [
        dead_letter("on-fake", ago_s=2, raw_outputs=("one", "two", "three")),
        dead_letter("on-parked", queue=PARKED),
    ]
    for letter in letters:
        record(dead_letters, letter, EXPIRE_S)

    everything = _sibylq_at(redis_server.url, "failed", "--json")
    one_queue = _sibylq_at(redis_server.url, "failed", "--json", "--queue", FAKE)

    parsed = [DeadLetter.decode(json.loads(line)) for line in everything.stdout.splitlines()]
    assert parsed == letters[::-1]
    assert [json.loads(line)["job_id"] for line in one_queue.stdout.splitlines()] == ["on-fake"]
    assert json.loads(one_queue.stdout)["failure"]["raw_outputs"] == ["one", "two", "three"]


def test_failed_purge_forgets_a_queues_failed_jobs(
    redis_server: RedisServer, dead_letters: redis.Redis
) -> None:
    record(dead_letters, dead_letter("forget-me", queue=PARKED), EXPIRE_S)
    record(dead_letters, dead_letter("keep-me"), EXPIRE_S)

    result = _sibylq_at(redis_server.url, "failed", "--purge", "--queue", PARKED)

    assert (result.returncode, result.stdout) == (0, "forgot 1 failed job\n")
    assert [letter.job_id for letter in list_dead(dead_letters)] == ["keep-me"]


def test_a_record_that_cannot_be_read_blocks_neither_the_list_nor_retry_nor_the_purge(
    redis_server: RedisServer, dead_letters: redis.Redis, client: Client, fake_worker: Worker
) -> None:
    record(dead_letters, dead_letter("readable"), EXPIRE_S)
    dead_letters.set(dead_letter_key("garbled"), b"{not a dead letter")
    dead_letters.zadd(DEAD_LETTERS_KEY, {"garbled": time.time()})

    listed = _sibylq_at(redis_server.url, "failed")

    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[1].startswith("readable ")
    assert "1 record(s) cannot be read" in listed.stderr and "garbled" in listed.stderr
    retried = _sibylq_at(redis_server.url, "retry", "--all")
    assert retried.returncode == 0, retried.stderr
    assert retried.stdout.splitlines() == ["re-enqueued 1 failed job", "readable"]
    assert "sibylq retry: 1 record(s) cannot be read" in retried.stderr
    assert "garbled" in retried.stderr
    assert Job.from_id("readable", client=client, queue=FAKE).result(30) == "fake output"
    purged = _sibylq_at(redis_server.url, "failed", "--purge")
    assert (purged.returncode, purged.stdout) == (0, "forgot 1 failed job\n")
    assert dead_letters.zcard(DEAD_LETTERS_KEY) == 0


def test_a_lone_surrogate_in_a_failure_is_shown_escaped(
    redis_server: RedisServer, dead_letters: redis.Redis
) -> None:
    record(dead_letters, dead_letter("odd", raw_outputs=("half an emoji \ud83d",)), EXPIRE_S)

    result = _sibylq_at(redis_server.url, "failed")

    assert result.returncode == 0, result.stderr
    assert "half an emoji \\ud83d" in result.stdout


def test_retry_reenqueues_the_named_jobs_which_then_succeed(
    redis_server: RedisServer, dead_letters: redis.Redis, client: Client, fake_worker: Worker
) -> None:
    for job_id in ("cli-retry-1", "cli-retry-2", "cli-left-dead"):
        bury(dead_letters, dead_letter(job_id))

    result = _sibylq_at(redis_server.url, "retry", "cli-retry-1", "cli-retry-2")

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["re-enqueued 2 failed jobs", "cli-retry-1", "cli-retry-2"]
    for job_id in ("cli-retry-1", "cli-retry-2"):
        assert Job.from_id(job_id, client=client, queue=FAKE).result(30) == "fake output"
    assert [letter.job_id for letter in list_dead(dead_letters)] == ["cli-left-dead"]


def test_retry_cut_short_by_redis_going_away_names_the_jobs_it_re_enqueued(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis stops right after the first job is re-enqueued: the run fails (exit 2), and it
    says which job did go, since the others are still dead letters to retry later."""
    with RedisServer(tmp_path / "redis") as server:
        store = redis.Redis.from_url(server.url)
        for job_id in ("went-1", "stayed-2"):
            bury(store, dead_letter(job_id))
        store.close()
        monkeypatch.setenv("SIBYLQ_BROKER_URL", server.url)
        monkeypatch.setenv("SIBYLQ_BROKER_TIMEOUT_S", "1")
        get_settings.cache_clear()
        remove = deadletters._remove_unless_changed  # a retry's last step

        def remove_then_lose_redis(*args: Any) -> None:
            remove(*args)
            server.stop()

        monkeypatch.setattr(deadletters, "_remove_unless_changed", remove_then_lose_redis)
        try:
            status = main(["retry", "went-1", "stayed-2"])
        finally:
            get_settings.cache_clear()
    out, err = capsys.readouterr()
    assert status == 2
    assert out.splitlines() == [
        "re-enqueued 1 failed job before the error below; the others are still failed",
        "went-1",
    ]
    assert err.startswith("sibylq: error: cannot reach Redis")


def test_retry_all_of_one_queue(
    redis_server: RedisServer, dead_letters: redis.Redis, client: Client, fake_worker: Worker
) -> None:
    bury(dead_letters, dead_letter("cli-all-fake"))
    bury(dead_letters, dead_letter("cli-all-parked", queue=PARKED))

    result = _sibylq_at(redis_server.url, "retry", "--all", "--queue", FAKE)

    assert result.stdout.splitlines() == ["re-enqueued 1 failed job", "cli-all-fake"]
    assert Job.from_id("cli-all-fake", client=client, queue=FAKE).result(30) == "fake output"
    assert [letter.job_id for letter in list_dead(dead_letters)] == ["cli-all-parked"]


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["no-such-job"], "no failed job no-such-job"),
        ([], "give JOB_IDs or --all"),
        (["some-id", "--all"], "give JOB_IDs or --all"),
        (["some-id", "--queue", FAKE], "--queue goes with --all"),
    ],
)
def test_retry_refuses_what_it_cannot_do(
    redis_server: RedisServer, dead_letters: redis.Redis, args: list[str], error: str
) -> None:
    result = _sibylq_at(redis_server.url, "retry", *args)
    assert (result.returncode, result.stdout) == (2, "")
    assert error in result.stderr


def test_failed_lists_an_undecodable_message_and_retry_refuses_it(
    redis_server: RedisServer, dead_letters: redis.Redis
) -> None:
    record(dead_letters, undecodable_letter(b"not json{", "broken-message"), EXPIRE_S)

    listed = _sibylq_at(redis_server.url, "failed")
    named = _sibylq_at(redis_server.url, "retry", "broken-message")
    every = _sibylq_at(redis_server.url, "retry", "--all")

    assert listed.returncode == 0 and "broken-message" in listed.stdout
    assert "ContractError" in listed.stdout
    assert named.returncode == 2 and "no worker could decode the message" in named.stderr
    assert every.returncode == 0
    assert "re-enqueued 0 failed jobs\nskipped 1 undecodable message" in every.stdout
    assert [letter.job_id for letter in list_dead(dead_letters)] == ["broken-message"]
