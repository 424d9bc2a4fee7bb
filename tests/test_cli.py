"""The ``sibylq`` command."""

from __future__ import annotations

import subprocess
import sys


def _sibylq(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "producer.cli", *args], capture_output=True, text=True, timeout=60
    )


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
    result = _sibylq("worker", "anthropic:claude")
    assert result.returncode == 2
    assert "unknown provider 'anthropic'" in result.stderr


def test_redis_server_runs_the_binary_it_finds() -> None:
    result = _sibylq("redis-server", "--version")
    assert result.returncode == 0
    assert "Redis server" in result.stdout
