"""deploy/healthcheck.py (``sibylq-healthcheck`` in the images): healthy exactly while this
host's worker on the queue keeps its heartbeat in Redis, checked against a real Redis and
the workers' own heartbeat code."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from types import ModuleType

import pytest

from embedded.redis_server import RedisServer
from wire.settings import Settings, get_settings
from workers.heartbeat import Heartbeat

from .helpers import DEPLOY, ROOT

SCRIPT = DEPLOY / "healthcheck.py"


@pytest.fixture(scope="module")
def healthcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location("sibylq_healthcheck", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def model() -> str:
    """A model of its own, so that no other test's worker shares the queue."""
    return f"llamacpp:deploy-check-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A Redis of these tests' own: the heartbeats they write stay out of other tests'."""
    with RedisServer(tmp_path_factory.mktemp("healthcheck-redis")) as server:
        yield server


@pytest.fixture
def broker(own_redis: RedisServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("SIBYLQ_BROKER_URL", own_redis.url)
    monkeypatch.delenv("SIBYLQ_RESULT_BACKEND", raising=False)
    get_settings.cache_clear()
    yield own_redis.url
    get_settings.cache_clear()


def beat(url: str, model: str, host: str) -> Heartbeat:
    """One heartbeat, as a worker named the way ``sibylq worker`` names it sends it."""
    settings = Settings(
        broker_url=url, worker_model=model, heartbeat_interval_s=60, visibility_timeout_s=240
    )
    queue = healthcheck_queue(model)
    heartbeat = Heartbeat(settings, f"sibylq-llamacpp-x-{os.getpid()}@{host}", [queue])
    heartbeat.beat()
    return heartbeat


def stop(heartbeat: Heartbeat) -> None:
    """What a worker does when it shuts down: its entries leave Redis at once."""
    heartbeat.start()
    heartbeat.stop()


def healthcheck_queue(model: str) -> str:
    return f"sibylq.llamacpp.{model.partition(':')[2]}"


def test_the_queue_is_the_models_or_the_one_given(healthcheck: ModuleType) -> None:
    assert healthcheck.queue_of("openai") == "sibylq.openai"
    assert healthcheck.queue_of("llamacpp:smollm2") == "sibylq.llamacpp.smollm2"
    assert healthcheck.queue_of("llamacpp:/models/qwen.gguf") == "sibylq.llamacpp.qwen"
    assert healthcheck.queue_of("sibylq.openai.llama-server") == "sibylq.openai.llama-server"


def test_healthy_while_this_hosts_worker_beats(
    healthcheck: ModuleType, broker: str, model: str, capsys: pytest.CaptureFixture[str]
) -> None:
    heartbeat = beat(broker, model, socket.gethostname())
    assert healthcheck.main([model]) == 0
    assert "healthy" in capsys.readouterr().out
    stop(heartbeat)
    assert healthcheck.main([model]) == 1
    assert "no live worker" in capsys.readouterr().err


def test_another_hosts_worker_does_not_count(
    healthcheck: ModuleType, broker: str, model: str
) -> None:
    heartbeat = beat(broker, model, "some-other-pod")
    try:
        assert healthcheck.main([model]) == 1
    finally:
        stop(heartbeat)


def test_an_expired_heartbeat_does_not_count(
    healthcheck: ModuleType, broker: str, model: str
) -> None:
    """A worker that died without stopping leaves its set member; its info key expires."""
    import redis

    from wire.constants import worker_info_key

    heartbeat = beat(broker, model, socket.gethostname())
    client = redis.Redis.from_url(broker)
    client.delete(worker_info_key(f"sibylq-llamacpp-x-{os.getpid()}@{socket.gethostname()}"))
    client.close()
    try:
        assert healthcheck.main([model]) == 1
    finally:
        stop(heartbeat)


def test_unhealthy_when_redis_is_unreachable_or_the_setup_is_wrong(
    healthcheck: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    from embedded.redis_server import free_port

    monkeypatch.setenv("SIBYLQ_BROKER_URL", f"redis://127.0.0.1:{free_port()}/0")
    get_settings.cache_clear()
    try:
        assert healthcheck.main(["openai"]) == 1
        assert healthcheck.main(["nonsense:model"]) == 2
        assert healthcheck.main([]) == 2
        monkeypatch.delenv("SIBYLQ_BROKER_URL")
        get_settings.cache_clear()
        assert healthcheck.main(["openai"]) == 2
    finally:
        get_settings.cache_clear()


def test_it_runs_as_the_images_command(broker: str, model: str) -> None:
    heartbeat = beat(broker, model, socket.gethostname())
    try:
        result = subprocess.run(
            [sys.executable, str(SCRIPT), model],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**os.environ, "SIBYLQ_BROKER_URL": broker},
            timeout=30,
        )
    finally:
        stop(heartbeat)
    assert result.returncode == 0, result.stderr
    assert SCRIPT.read_text().startswith("#!/usr/bin/env python3\n")
