"""No API key or Redis password leaves a process: not in stored results or tracebacks, dead
letters, worker logs, nor the errors a caller sees."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from producer import BackendError, BrokerUnavailableError, Client, Models, Settings
from tests.conftest import Worker, wait_for
from tests.openai_stub import OpenAIStub
from tests.secure_redis import PasswordRedis
from wire.constants import dead_letter_key, queue_name, result_key
from wire.contract import Failure
from wire.redact import redact, redact_url, secrets_of
from workers.redacting import redacted_failure

API_KEY = "sk-proj-7f3Kq9ZxR2mW8vT1nB4cY6dH0jL5pA"
ECHO_QUEUE = queue_name("openai", "echo-auth")
PASSWORD = "s3cret-broker-pw"


@pytest.fixture(scope="module")
def echo_worker(start_worker: Callable[..., Worker], openai_stub: OpenAIStub) -> Worker:
    env = {"OPENAI_BASE_URL": openai_stub.base_url, "OPENAI_API_KEY": API_KEY}
    return start_worker("openai", "-c", "2", "-Q", ECHO_QUEUE, queue=ECHO_QUEUE, env=env)


def test_a_key_echoed_by_the_endpoint_is_in_no_result_dead_letter_log_or_error(
    client: Client, echo_worker: Worker, dead_letters: redis.Redis
) -> None:
    model = Models.create("openai:stub-echo-auth-400", client=client, queue=ECHO_QUEUE)
    job = model.call_async("hello")
    with pytest.raises(BackendError) as raised:
        job.result(timeout=30)

    assert "bad key Bearer ***" in str(raised.value)  # the server's message, redacted
    stored = dead_letters.get(result_key(job.id))
    letter = dead_letters.get(dead_letter_key(job.id))
    assert stored is not None and letter is not None
    assert json.loads(stored)["traceback"]  # the traceback is stored, its chain included...
    wait_for("the failure in the worker's log", lambda: f"{job.id}] raised" in echo_worker.log())
    for where, text in {
        "error": str(raised.value),
        "stored result": stored.decode(),
        "dead letter": letter.decode(),
        "worker log": echo_worker.log(),
    }.items():
        assert API_KEY not in text, where  # ...but not the key
    assert "openai.BadRequestError" in json.loads(stored)["traceback"]
    assert "bad key Bearer ***" in echo_worker.log()  # logged, redacted


def test_redact_masks_secrets_urls_and_bearer_tokens() -> None:
    text = "to redis://user:pw%40x@host:6379/0 with Bearer abc.def-123 and key sk-live-123456"
    assert redact(text, ["sk-live-123456"]) == (
        "to redis://user:***@host:6379/0 with Bearer *** and key ***"
    )
    assert redact_url("rediss://:pw@host/0") == "rediss://:***@host/0"
    assert redact_url("redis://host/0") == "redis://host/0"
    assert set(secrets_of("redis://u:p%40ss@h/0", None)) >= {"p%40ss", "p@ss"}


def test_an_unexpected_errors_message_is_redacted_before_it_is_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    settings = Settings(broker_url=f"redis://:{PASSWORD}@127.0.0.1:6379/0")
    failure = Failure(
        type="RuntimeError",
        message=f"cannot use {API_KEY} at redis://:{PASSWORD}@127.0.0.1:6379/0",
        raw_text=f"echo {API_KEY}",
        raw_outputs=(f"echo {API_KEY}",),
    )
    kept = redacted_failure(failure, settings).encode()
    assert API_KEY not in json.dumps(kept) and PASSWORD not in json.dumps(kept)
    assert kept["message"] == "cannot use *** at redis://:***@127.0.0.1:6379/0"


@pytest.fixture(scope="module")
def locked_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PasswordRedis]:
    """A real redis-server with ``requirepass`` and an ACL user ``app``."""
    with PasswordRedis(tmp_path_factory.mktemp("locked-redis"), PASSWORD) as server:
        admin = server.admin()
        admin.acl_setuser("app", enabled=True, passwords=[f"+{PASSWORD}-app"],
                          commands=["+@all"], keys=["*"], channels=["*"])  # fmt: skip
        admin.close()
        yield server


@pytest.mark.parametrize(
    "userinfo", [":wrong-pw-1234", "app:wrong-pw-1234", "nobody:wrong-pw-1234"],
    ids=["wrong password", "ACL user, wrong password", "unknown ACL user"],
)  # fmt: skip
def test_a_refused_broker_password_is_not_in_the_error(
    locked_redis: PasswordRedis, userinfo: str
) -> None:
    url = f"redis://{userinfo}@127.0.0.1:{locked_redis.port}/0"
    client = Client(Settings(broker_url=url, cache=False))
    try:
        with pytest.raises(BrokerUnavailableError) as raised:
            Models.create("fake", client=client).call_async("hello")
    finally:
        client.close()

    assert "wrong-pw-1234" not in str(raised.value)
    assert redact_url(url) in str(raised.value)


def test_a_worker_refused_by_redis_exits_non_zero_without_printing_the_password(
    locked_redis: PasswordRedis, worker_env: dict[str, str], tmp_path: Path
) -> None:
    url = f"redis://app:wrong-pw-1234@127.0.0.1:{locked_redis.port}/0"
    worker = Worker(["fake"], {**worker_env, "SIBYLQ_BROKER_URL": url}, tmp_path / "w.log")
    try:
        code = worker.process.wait(timeout=60)
    finally:
        worker.stop()
    assert code != 0
    assert "invalid username-password pair" in worker.log()
    assert "wrong-pw-1234" not in worker.log()


@pytest.mark.parametrize("password", ["Zq7/Kx9+Wv3", "Zq7#Kx9", "Zq7?Kx9", "4821/Kx9"])
@pytest.mark.parametrize("command", [["worker", "fake"], ["status"], ["failed"]])
def test_a_password_not_percent_encoded_is_refused_without_a_word_of_it(
    worker_env: dict[str, str], password: str, command: list[str]
) -> None:
    url = f"redis://app:{password}@127.0.0.1:6399/0"  # as an Azure key, base64, often is
    env = {**worker_env, "SIBYLQ_BROKER_URL": url}
    result = subprocess.run([sys.executable, "-m", "sibylq", *command], env=env,
                            capture_output=True, text=True, timeout=60)  # fmt: skip

    assert result.returncode == 2
    assert "Percent-encode a password's / # ? @ and :" in result.stderr
    assert "Traceback" not in result.stderr
    for part in password.replace("#", "/").replace("?", "/").split("/"):
        assert part not in result.stdout + result.stderr
