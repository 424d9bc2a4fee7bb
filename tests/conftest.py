"""Real parts for every test: a private redis-server, real Celery workers as subprocesses,
an OpenAI-compatible stub, and llama-cpp-python's own OpenAI-compatible server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import redis

from embedded.redis_server import RedisServer, free_port
from producer import Client, Settings
from tests.dead_letters import without_dead_letters
from tests.faults import FaultyProxy
from tests.openai_stub import OpenAIStub
from wire.constants import queue_name, workers_key

HEARTBEAT_S = 0.5
LLAMA_SERVER_QUEUE = queue_name("openai", "llama-server")


class Worker:
    """A ``sibylq worker`` subprocess, ready once its heartbeat shows in Redis."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.args = args
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "workers", *args],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, url: str, queue: str, timeout_s: float = 60.0) -> Worker:
        client = redis.Redis.from_url(url)
        deadline = time.monotonic() + timeout_s
        while client.zcount(workers_key(queue), time.time() - 5, "+inf") == 0:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker {self.args} did not start:\n{self.log()}")
            time.sleep(0.1)
        client.close()
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def children(self) -> list[int]:
        """Pids of the worker's child processes (its prefork pool, or ``--processes``)."""
        path = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return [int(pid) for pid in path.read_text().split()] if path.exists() else []

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()


T = TypeVar("T")


def wait_for(
    what: str,
    probe: Callable[[], T | None],
    timeout_s: float = 20,
    detail: Callable[[], str] = str,
) -> T:
    """Poll ``probe`` until it gives something truthy; fail saying ``what`` (and ``detail()``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = probe()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{detail()}")
        time.sleep(0.02)


def connection_ids(url: str, *names: str) -> list[int]:
    """Ids of the Redis connections whose client name is one of ``names``."""
    admin = redis.Redis.from_url(url)
    try:
        return [int(conn["id"]) for conn in admin.client_list() if conn.get("name") in names]
    finally:
        admin.close()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="session")
def worker_env(redis_server: RedisServer) -> dict[str, str]:
    return {
        **os.environ,
        "SIBYLQ_BROKER_URL": redis_server.url,
        "SIBYLQ_HEARTBEAT_INTERVAL_S": str(HEARTBEAT_S),
        # The answer cache would answer the suite's many identical prompts without a worker;
        # the tests of the cache (tests/producer/test_cache.py) turn it on.
        "SIBYLQ_CACHE": "false",
        "PYTHONUNBUFFERED": "1",
    }


@pytest.fixture(scope="session")
def settings(redis_server: RedisServer) -> Settings:
    return Settings(
        broker_url=redis_server.url,
        heartbeat_interval_s=HEARTBEAT_S,
        # A loaded machine delays a busy llama.cpp worker's heartbeats by seconds.
        no_worker_timeout_s=6.0,
        broker_timeout_s=20.0,
        cache=False,  # as in worker_env
    )


@pytest.fixture(scope="session")
def client(settings: Settings) -> Iterator[Client]:
    client = Client(settings)
    yield client
    client.close()


@pytest.fixture(scope="session")
def start_worker(
    redis_server: RedisServer, worker_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Worker]]:
    started: list[Worker] = []
    logs = tmp_path_factory.mktemp("worker-logs")

    def start(*args: str, queue: str, env: dict[str, str] | None = None) -> Worker:
        log_path = logs / f"worker-{len(started)}.log"
        full_env = {**worker_env, **(env or {})}
        worker = Worker(list(args), full_env, log_path)
        started.append(worker)
        return worker.wait_ready(full_env["SIBYLQ_BROKER_URL"], queue)

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture
def dead_letters(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """The result Redis, with no dead letter recorded before or after the test."""
    yield from without_dead_letters(redis_server.url)


@pytest.fixture
def proxy(redis_server: RedisServer) -> Iterator[FaultyProxy]:
    """A fault-injecting TCP proxy (``tests.faults``) in front of the session's Redis: give a
    component ``proxy.url()`` and the faults reach it alone."""
    with FaultyProxy(redis_server.port) as proxy:
        yield proxy


@pytest.fixture(scope="session")
def fake_worker(start_worker: Callable[..., Worker]) -> Worker:
    return start_worker("fake", "-c", "8", queue=queue_name("fake"))


@pytest.fixture(scope="session")
def llama_worker(start_worker: Callable[..., Worker]) -> Worker:
    return start_worker("llamacpp:smollm2", queue=queue_name("llamacpp", "smollm2"))


@pytest.fixture(scope="session")
def openai_stub() -> Iterator[OpenAIStub]:
    with OpenAIStub() as stub:
        yield stub


@pytest.fixture(scope="session")
def openai_worker(start_worker: Callable[..., Worker], openai_stub: OpenAIStub) -> Worker:
    env = {"OPENAI_BASE_URL": openai_stub.base_url, "OPENAI_API_KEY": "sk-test-secret"}
    return start_worker("openai", "-c", "16", queue=queue_name("openai"), env=env)


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """llama-cpp-python's OpenAI-compatible server, serving the bundled SmolLM2."""
    from workers.model_files import resolve_model_path

    port = free_port()
    log = (tmp_path_factory.mktemp("llama-server") / "server.log").open("wb")
    model = resolve_model_path("smollm2", Settings())
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(model)]
    process = subprocess.Popen(
        [*command, "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base_url = f"http://127.0.0.1:{port}/v1"
    _wait_http(f"{base_url}/models", process)
    yield base_url
    process.terminate()
    process.wait(timeout=15)
    log.close()


@pytest.fixture(scope="session")
def llama_server_worker(start_worker: Callable[..., Worker], llama_server: str) -> Worker:
    env = {"OPENAI_BASE_URL": llama_server, "OPENAI_API_KEY": "sk-none"}
    return start_worker(
        "openai", "-c", "4", "-Q", LLAMA_SERVER_QUEUE, queue=LLAMA_SERVER_QUEUE, env=env
    )


def _wait_http(url: str, process: subprocess.Popen[bytes], timeout_s: float = 60.0) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (urllib.error.URLError, ConnectionError):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not come up") from None
            time.sleep(0.2)
