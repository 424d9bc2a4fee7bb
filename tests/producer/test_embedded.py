"""The embedded cluster: a private Redis and workers as child processes, and no orphans.

Real processes throughout. "Gone" means no such process or a zombie: orphans are reaped
by PID 1, which may take a moment.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from embedded.cluster import EmbeddedCluster, default_cluster
from embedded.redis_server import RedisServer
from producer import Client, ConfigurationError, Models, Settings
from wire.constants import queue_name, workers_key

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")

#: A program that starts the default cluster with workers for its arguments, each from a
#: short-lived thread, prints what it started, and sleeps.
PARENT = textwrap.dedent(
    """
    import json, signal, sys, threading, time
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started ignoring it
    from embedded import cluster as embedded
    if sys.argv[1] == "watchdog":
        embedded._die_with_parent = lambda: None
    cluster = embedded.default_cluster()
    for model in sys.argv[2:]:
        thread = threading.Thread(target=cluster.ensure_worker, args=(model,))
        thread.start()
        thread.join()
    time.sleep(0.2)  # the threads are gone; the workers must not have gone with them
    print(json.dumps({"pids": cluster.pids, "directory": str(cluster.directory)}), flush=True)
    time.sleep(600)
    """
)


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, process group) from /proc, or None if there is no such process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1]), int(fields[2])


def _running(pid: int) -> bool:
    """A zombie leader whose other threads are still exiting counts as running."""
    stat = _stat(pid)
    if stat is None or stat[0] != "Z":
        return stat is not None
    with contextlib.suppress(OSError):
        for thread in os.listdir(f"/proc/{pid}/task"):
            if not Path(f"/proc/{pid}/task/{thread}/stat").read_text().count(") Z "):
                return True
    return False


def _family(pids: list[int]) -> set[int]:
    """``pids``, the members of their process groups and their children (pool processes)."""
    found = set(pids)
    for entry in os.listdir("/proc"):
        stat = _stat(int(entry)) if entry.isdigit() else None
        if stat is not None and stat[0] != "Z" and (stat[1] in pids or stat[2] in pids):
            found.add(int(entry))
    return found


def _wait_gone(pids: set[int], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (left := {pid for pid in pids if _running(pid)}) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"still running: {_describe(left)}"


def _describe(pids: set[int]) -> list[str]:
    return [Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode() for pid in pids]


_PROGRAMS: list[_Program] = []


@pytest.fixture(autouse=True)
def _no_program_left() -> Iterator[None]:
    """A failed test must not leave its parent program (and so its cluster) running."""
    yield
    while _PROGRAMS:
        program = _PROGRAMS.pop().process
        if program.poll() is None:
            program.kill()
            program.communicate()


class _Program:
    """A ``python -c`` child whose stdout lines can be awaited without hanging the suite."""

    def __init__(self, *args: str) -> None:
        self.args = args
        self.process = subprocess.Popen(
            [sys.executable, "-c", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        _PROGRAMS.append(self)

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line)

    def line(self, timeout_s: float = 60.0) -> str:
        try:
            return self._lines.get(timeout=timeout_s)
        except queue.Empty:
            self.process.kill()
            _, stderr = self.process.communicate()
            raise AssertionError(f"no output; stderr:\n{stderr}") from None

    def finish(self, timeout_s: float = 20.0) -> tuple[int, str]:
        _, stderr = self.process.communicate(timeout=timeout_s)
        return self.process.returncode, stderr


def _start_parent(mode: str, *models: str) -> tuple[_Program, dict[str, Any], set[int]]:
    return _started_parent(_Program(PARENT, mode, *models))


def _started_parent(parent: _Program) -> tuple[_Program, dict[str, Any], set[int]]:
    """Once ``parent`` has printed its cluster: it, the cluster, and every process of it."""
    info = json.loads(parent.line())
    family = _family(info["pids"])
    assert all(_running(pid) for pid in family)
    for log in Path(info["directory"]).glob("worker-*.log"):  # no PDEATHSIG at thread exit
        assert "Warm shutdown" not in log.read_text(), log.read_text()
    assert len(family) > len(info["pids"]) or "llamacpp:smollm2" not in parent.args
    return parent, info, family


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedCluster]:
    with EmbeddedCluster(tmp_path_factory.mktemp("embedded")) as cluster:
        yield cluster


def test_a_job_runs_on_the_cluster(cluster: EmbeddedCluster) -> None:
    cluster.ensure_worker("fake")
    client = Client(Settings(broker_url=cluster.url))
    try:
        assert Models.create("fake", client=client).call("hi") == "fake output"
    finally:
        client.close()


def test_ensure_worker_starts_one_worker_per_queue(cluster: EmbeddedCluster) -> None:
    cluster.ensure_worker("fake")
    pids = cluster.pids
    cluster.ensure_worker("fake:delay=0.1")  # the same queue
    assert cluster.pids == pids
    assert len(_family(pids)) == len(pids)
    store = redis.Redis.from_url(cluster.url)
    assert store.zcard(workers_key(queue_name("fake"))) == 1
    store.close()


def test_a_worker_that_died_is_started_again(cluster: EmbeddedCluster) -> None:
    cluster.ensure_worker("fake")
    (worker,) = cluster.pids[2:]
    os.kill(worker, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while worker in cluster.pids and time.monotonic() < deadline:
        cluster.ensure_worker("fake")  # returns at once until the worker is seen dead
        time.sleep(0.05)
    assert worker not in cluster.pids
    client = Client(Settings(broker_url=cluster.url))
    try:
        assert Models.create("fake", client=client).call("again") == "fake output"
    finally:
        client.close()


def test_an_unknown_llama_model_fails_fast_saying_why(cluster: EmbeddedCluster) -> None:
    started = time.monotonic()
    with pytest.raises(ConfigurationError, match="no-such-model") as failure:
        cluster.ensure_worker("llamacpp:no-such-model")
    assert "SIBYLQ_MODELS_DIR" in str(failure.value)  # the worker's own explanation
    assert time.monotonic() - started < 15


def test_default_cluster_is_one_per_process() -> None:
    found: list[EmbeddedCluster] = []
    threads = [threading.Thread(target=lambda: found.append(default_cluster())) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    cluster = found[0]
    try:
        assert len(found) == 4
        assert all(other is cluster for other in found)
        assert redis.Redis.from_url(cluster.url).ping()
    finally:
        cluster.stop()


def test_stop_leaves_no_process_and_is_idempotent(tmp_path: Path) -> None:
    cluster = EmbeddedCluster(tmp_path)
    cluster.ensure_worker("fake")  # starts the cluster too
    family = _family(cluster.pids)
    assert len(family) == 3  # redis-server, the watchdog, the worker
    cluster.stop()
    assert not {pid for pid in family if _running(pid)}
    cluster.stop()
    with pytest.raises(ConfigurationError):
        _ = cluster.url


def test_a_temporary_directory_is_removed_at_stop() -> None:
    with EmbeddedCluster() as cluster:
        directory = cluster.directory
        assert (directory / "redis").is_dir()
    assert not directory.exists()


def test_nothing_outlives_a_killed_parent() -> None:
    """SIGKILL runs no handler: PDEATHSIG and the watchdog must clean up. The llama.cpp
    worker has a prefork pool: its pool process must go too."""
    parent, info, family = _start_parent("both", "fake", "llamacpp:smollm2")
    parent.process.kill()
    parent.finish()
    _wait_gone(family)
    deadline = time.monotonic() + 10
    while Path(info["directory"]).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(info["directory"]).exists()  # the watchdog removed it


def test_each_layer_suffices_alone() -> None:
    """PDEATHSIG alone (the watchdog is killed first), and the watchdog alone (no PDEATHSIG
    set): two parents, side by side to save time."""
    programs = [_Program(PARENT, layer, "llamacpp:smollm2") for layer in ("pdeathsig", "watchdog")]
    parents = [_started_parent(program) for program in programs]
    pdeathsig_only = parents[0][1]
    os.kill(pdeathsig_only["pids"][1], signal.SIGKILL)  # its watchdog
    for program in programs:
        program.process.kill()
        program.finish()
    _wait_gone(set().union(*(family for _, _, family in parents)))
    for _, info, _ in parents:
        shutil.rmtree(info["directory"], ignore_errors=True)


def test_sigterm_stops_the_cluster_in_order_and_still_kills_the_parent() -> None:
    parent, info, family = _start_parent("both", "fake")
    parent.process.terminate()
    returncode, _ = parent.finish()
    assert returncode == -signal.SIGTERM
    # No waiting: stopped and reaped by the parent's handler before it died (PDEATHSIG alone
    # would leave the worker in its warm shutdown at this point).
    assert not {pid for pid in family if _running(pid)}
    assert not Path(info["directory"]).exists()


def test_ctrl_c_stops_the_cluster_without_swallowing_keyboard_interrupt() -> None:
    parent, info, family = _start_parent("both", "fake")
    parent.process.send_signal(signal.SIGINT)
    returncode, stderr = parent.finish()
    assert "KeyboardInterrupt" in stderr
    assert returncode == -signal.SIGINT
    assert not {pid for pid in family if _running(pid)}  # stopped by atexit, no waiting
    assert not Path(info["directory"]).exists()


def test_up_serves_until_ctrl_c() -> None:
    program = _Program(
        "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "from embedded.cluster import run_up; sys.exit(run_up(['fake']))"
    )
    while not (line := program.line()).strip().startswith("export SIBYLQ_BROKER_URL="):
        pass
    url = line.strip().partition("=")[2]
    family = _family([program.process.pid]) - {program.process.pid}
    client = Client(Settings(broker_url=url))
    try:
        assert Models.create("fake", client=client).call("hi") == "fake output"
    finally:
        client.close()
    program.process.send_signal(signal.SIGINT)
    returncode, stderr = program.finish()
    assert returncode == 0, stderr
    assert not {pid for pid in family if _running(pid)}


def _up(*models: str) -> tuple[_Program, str]:
    """``sibylq up MODELS`` in a child, once it has printed its URL."""
    program = _Program(
        "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        f"from sibylq.cli import main; sys.exit(main(['up', *{list(models)!r}]))"
    )
    while not (line := program.line()).strip().startswith("export SIBYLQ_BROKER_URL="):
        pass
    return program, line.strip().partition("=")[2]


def _kill_redis(url: str) -> int:
    """SIGKILL the redis-server answering at ``url``; returns its port."""
    store = redis.Redis.from_url(url)
    os.kill(int(store.info("server")["process_id"]), signal.SIGKILL)
    store.close()
    return int(url.rsplit(":", 1)[1].split("/")[0])


def test_up_starts_a_killed_redis_again_on_the_same_port_with_what_it_held() -> None:
    program, url = _up("fake")
    store = redis.Redis.from_url(url)
    store.set("kept", "yes")
    time.sleep(1.5)  # the append-only file is flushed every second
    _kill_redis(url)
    while "started again" not in (line := program.line(timeout_s=30)):
        pass
    assert "status -9" in line
    assert store.get("kept") == b"yes"
    client = Client(Settings(broker_url=url))
    try:  # the worker reconnected to the new process
        assert Models.create("fake", client=client).call("after") == "fake output"
    finally:
        client.close()
        store.close()
    program.process.send_signal(signal.SIGINT)
    returncode, stderr = program.finish()
    assert returncode == 0, stderr


def test_up_exits_non_zero_when_its_redis_cannot_be_started_again() -> None:
    program, url = _up("fake")
    family = _family([program.process.pid]) - {program.process.pid}
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        program.process.send_signal(signal.SIGSTOP)  # so that it cannot restart Redis first
        port = _kill_redis(url)
        deadline = time.monotonic() + 10
        while True:  # the port is free once the kernel has ended the process
            try:
                squatter.bind(("127.0.0.1", port))
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        squatter.listen()
        program.process.send_signal(signal.SIGCONT)
        returncode, stderr = program.finish(timeout_s=40)
    assert returncode == 2, stderr
    assert "redis-server exited (status -9) and could not be started again" in stderr
    assert "Traceback" not in stderr
    _wait_gone(family)


def test_a_redis_that_exits_at_start_is_explained_by_its_log(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        with pytest.raises(ConfigurationError, match="exited with status 1") as failure:
            RedisServer(tmp_path, port=port).start()
    assert "Address already in use" in str(failure.value)  # quoted from redis.log


def test_another_redis_on_the_port_is_not_taken_for_ours(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "theirs") as theirs:
        ours = RedisServer(tmp_path / "ours", port=theirs.port)
        with pytest.raises(ConfigurationError, match=r"taken by another Redis|exited with status"):
            ours.start()  # whichever comes first: theirs answers, or ours fails to bind
        assert ours.pid is None  # stopped, not left running
        assert redis.Redis(port=theirs.port).ping()
