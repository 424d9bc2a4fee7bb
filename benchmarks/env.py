"""What every benchmark runs on: a private Redis, worker subprocesses, and samplers of Redis.

Each benchmark gets a fresh ``Cluster`` (its own ``redis-server`` on a free port, its own
workers), so no benchmark sees another's queues, results or leftover workers. Every process
it starts has sibylq's answer cache off (``SIBYLQ_CACHE=false``): the benchmarks measure the
queue, not the cache.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

import redis

from embedded.redis_server import RedisServer, free_port
from producer import Settings
from wire.constants import workers_key

from .bare_celery import BARE_QUEUE, BareClient

#: The environment of every process a benchmark starts (and of the benchmark process itself).
BENCH_ENV = {"SIBYLQ_CACHE": "false", "PYTHONUNBUFFERED": "1"}

#: Workers log warnings only, sibylq's and bare Celery's alike: the benchmarks measure the
#: queue, not two log lines per job.
WORKER_LOGLEVEL = "WARNING"

REPO_ROOT = Path(__file__).absolute().parent.parent


class Process:
    """A child process in its own session, its output in a log file; ``stop()`` ends it."""

    def __init__(self, name: str, command: Sequence[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.log_path = log
        self._log = log.open("wb")
        self.popen = subprocess.Popen(
            list(command),
            env=env,
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self.alive():
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        self._log.close()


class Cluster:
    """A private Redis plus the workers (and stub servers) one benchmark starts."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.redis_server = RedisServer(workdir / "redis")
        self._processes: list[Process] = []

    def __enter__(self) -> Cluster:
        self.redis_server.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def url(self) -> str:
        return self.redis_server.url

    @property
    def port(self) -> int:
        return self.redis_server.port

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The environment of a process on this cluster."""
        return {**os.environ, **BENCH_ENV, "SIBYLQ_BROKER_URL": self.url, **(extra or {})}

    def settings(self) -> Settings:
        """Producer settings for this cluster (the rest from the environment)."""
        return Settings(broker_url=self.url)

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def spawn(self, name: str, command: Sequence[str], env: dict[str, str]) -> Process:
        log = self.workdir / f"{len(self._processes):02d}-{name}.log"
        process = Process(name, command, env, log)
        self._processes.append(process)
        return process

    def start_worker(
        self,
        model: str,
        *args: str,
        queue: str,
        env: dict[str, str] | None = None,
        processes: int = 1,
    ) -> Process:
        """``sibylq worker MODEL ARGS [--processes N]``, once its heartbeats (one per process)
        show for ``queue``."""
        extra = ("--processes", str(processes)) if processes > 1 else ()
        return self.start_workers(1, model, *args, *extra, queue=queue, env=env, each=processes)[0]

    def start_workers(
        self,
        count: int,
        model: str,
        *args: str,
        queue: str,
        env: dict[str, str] | None = None,
        each: int = 1,
    ) -> list[Process]:
        """``count`` workers started together (their imports overlap), once the heartbeats of
        each one's ``each`` processes show for ``queue``."""
        command = [sys.executable, "-m", "workers", model, "-l", WORKER_LOGLEVEL]
        processes = [
            self.spawn("worker-" + model.replace(":", "-"), [*command, *args], self.env(env))
            for _ in range(count)
        ]
        client = self.redis()
        try:
            for process in processes:
                _wait_beating(client, queue, process, f"worker {model} {' '.join(args)}", each)
        finally:
            client.close()
        return processes

    def start_bare_worker(self, pool: str, concurrency: int, queue: str = BARE_QUEUE) -> Process:
        """A bare Celery worker (``benchmarks.bare_celery``), once it answers a ping."""
        hostname = f"bare-{len(self._processes)}@{socket.gethostname()}"
        command = [
            sys.executable, "-m", "celery", "-A", "benchmarks.bare_celery", "worker",
            f"--queues={queue}", f"--pool={pool}", f"--concurrency={concurrency}",
            f"--loglevel={WORKER_LOGLEVEL}", "--without-gossip", "--without-mingle",
            f"--hostname={hostname}",
        ]  # fmt: skip
        process = self.spawn("bare-celery", command, self.env({"BENCH_BROKER_URL": self.url}))
        with BareClient(self.url, queue) as client:
            wait_until(
                f"bare Celery worker {hostname}",
                lambda: client.app.control.ping(destination=[hostname], timeout=0.5),
                process,
                timeout_s=90,
            )
        return process

    def start_openai_stub(self) -> str:
        """The OpenAI-compatible stub (tests/openai_stub.py) in its own process; its base URL."""
        port = free_port()
        command = [sys.executable, "-m", "benchmarks.stub_server", "--port", str(port)]
        process = self.spawn("openai-stub", command, self.env())
        base_url = f"http://127.0.0.1:{port}/v1"
        wait_until("the OpenAI stub", lambda: _http_ok(f"{base_url}/models"), process)
        return base_url

    def close(self) -> None:
        while self._processes:
            self._processes.pop().stop()
        self.redis_server.stop()


def _wait_beating(
    client: redis.Redis, queue: str, process: Process, what: str, expected: int = 1
) -> None:
    """Wait until ``expected`` of the ``sibylq worker`` processes in ``process`` (itself, or
    the children of ``--processes``) stamp heartbeats for ``queue`` (a node name is
    ``sibylq-<provider>-<model>-<pid>@<host>``)."""

    def beating() -> bool:
        members = [str(member) for member in client.zrange(workers_key(queue), 0, -1)]
        marks = [f"-{pid}@" for pid in (process.pid, *_children(process.pid))]
        return sum(any(mark in member for member in members) for mark in marks) >= expected

    wait_until(what, beating, process, timeout_s=120)


def _children(pid: int) -> list[int]:
    try:
        listed = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(child) for child in listed.split()]


def wait_until(
    what: str, probe: Callable[[], object], process: Process | None = None, timeout_s: float = 60.0
) -> None:
    """Poll ``probe()`` until it is true; fail with the process's log if it dies or times out."""
    deadline = time.monotonic() + timeout_s
    while not probe():
        if process is not None and not process.alive():
            raise RuntimeError(f"{what}: {process.name} exited:\n{process.log_tail()}")
        if time.monotonic() > deadline:
            tail = process.log_tail() if process is not None else ""
            raise RuntimeError(f"timed out waiting for {what}\n{tail}")
        time.sleep(0.05)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except (urllib.error.URLError, ConnectionError):
        return False


# -- sampling Redis while a measurement runs ---------------------------------------------------


class RedisSampler:
    """Samples Redis in a thread: peak ``used_memory``, and the connections this process holds.

    A connection belongs to this process when its client address (``CLIENT LIST`` ``addr``) is
    the local end of one of this process's sockets (``/proc/self/fd`` and ``/proc/net/tcp``).
    ``opened`` counts every such connection seen (the sampler's own excluded), ``peak`` the
    most at once. ``connections_received`` is Redis's count of every connection accepted
    meanwhile, from any process: a cross-check that no short-lived connection went unseen.
    """

    def __init__(self, url: str, port: int, interval_s: float = 0.05) -> None:
        self._client = redis.Redis.from_url(url, client_name="bench-sampler")
        self._port = port
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one redis-py connection, two threads
        self._thread = threading.Thread(target=self._run, name="redis-sampler", daemon=True)
        self._own_id = int(self._client.client_id())
        self.memory_start = self._used_memory()
        self.memory_peak = self.memory_start
        self._received_start = self._received()
        self.connections_received = 0
        self.opened: set[int] = set()
        self.peak = 0
        self._cpu_at_end = 0.0

    def __enter__(self) -> RedisSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._cpu_at_end = self.cpu_s()
        self._stop.set()
        self._thread.join()
        self.sample()
        self.connections_received = self._received() - self._received_start
        self._client.close()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.sample()

    def cpu_s(self) -> float:
        """CPU time the sampler thread has used so far, to subtract from the process's."""
        ident = self._thread.ident
        if ident is None:
            return 0.0
        try:
            return time.clock_gettime(time.pthread_getcpuclockid(ident))
        except OSError:  # the thread has ended
            return self._cpu_at_end

    def sample(self) -> None:
        with self._lock:
            memory = self._used_memory()
        self.memory_peak = max(self.memory_peak, memory)
        ours = self.open_now()
        self.opened |= ours
        self.peak = max(self.peak, len(ours))

    def open_now(self) -> set[int]:
        """The ids of this process's connections open now."""
        ports = own_ports_to(self._port)
        with self._lock:
            entries = self._client.client_list()
        return {
            int(entry["id"]) for entry in entries if _port_of(str(entry.get("addr", ""))) in ports
        } - {self._own_id}

    def _used_memory(self) -> int:
        return int(self._client.info("memory")["used_memory"])

    def _received(self) -> int:
        return int(self._client.info("stats")["total_connections_received"])


def _port_of(addr: str) -> int:
    _, _, port = addr.rpartition(":")
    return int(port) if port.isdigit() else -1


def own_ports_to(remote_port: int) -> set[int]:
    """The local ports of this process's TCP connections to ``remote_port`` (Linux)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[len("socket:[") : -1])
    ports = set()
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            local, remote, inode = fields[1], fields[2], fields[9]
            if inode in inodes and int(remote.rpartition(":")[2], 16) == remote_port:
                ports.add(int(local.rpartition(":")[2], 16))
    return ports


def cpu_s() -> float:
    """CPU time of this process (all its threads), user plus system."""
    return time.process_time()


# -- what a benchmark is given ------------------------------------------------------------------


class Context:
    """A run's options: ``quick`` (smoke sizes), where results go, scratch space."""

    def __init__(self, *, quick: bool, out: Path, workdir: Path, rows: int | None) -> None:
        self.quick = quick
        self.out = out
        self.workdir = workdir
        self.rows = rows

    def size(self, full: int, quick: int) -> int:
        """``full`` normally, ``quick`` in smoke mode."""
        return quick if self.quick else full

    def cluster(self, name: str) -> Cluster:
        directory = self.workdir / name
        directory.mkdir(parents=True, exist_ok=True)
        return Cluster(directory)
