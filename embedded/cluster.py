"""The zero-config default: a private Redis and the workers a program needs, as child processes.

``EmbeddedCluster`` starts a ``redis-server`` on a free port of 127.0.0.1 and, on demand, one
``python -m workers MODEL`` per queue (so the workers get the same pool defaults
as ``sibylq worker``; this module never imports ``workers``). ``default_cluster()`` is the
process-wide one, started on first use; ``run_up()`` is the body of ``sibylq up MODEL...``.

Children must never outlive the program, however it ends:

* **Normal exit and Ctrl-C**: an ``atexit`` hook stops every started cluster, in order:
  SIGTERM to each worker's process group (the worker and its pool children), wait, SIGKILL
  the stragglers, then stop Redis. An uncaught ``KeyboardInterrupt`` ends the program through
  ``atexit`` too; a caught one leaves the cluster running (e.g. a Jupyter cell interrupt).
  Every child runs in its own session, so a terminal's Ctrl-C reaches the program only, and
  the program stops its children in order rather than all of them dying at once.
* **SIGTERM**: Python's default would end the process without ``atexit``. When SIGTERM still
  has its default action, the first started cluster installs a handler (main thread only)
  that stops every cluster and then re-raises SIGTERM with the default action, so the exit
  status stays "killed by SIGTERM".
* **The parent is killed (SIGKILL, OOM) or its handlers never run**, two independent layers:

  - On Linux each child (redis-server and workers) gets ``PR_SET_PDEATHSIG`` = SIGTERM, set
    through ``prctl`` in ``preexec_fn``. The kernel sends it when the *thread* that forked the
    child exits, not the process, so every child is forked by one long-lived daemon thread
    (``_Spawner``): a worker started from a short-lived thread (an executor, ``to_thread``)
    would otherwise be killed when that thread ends. A daemon thread ends with the process.
  - A watchdog: a tiny ``python -I -S watchdog.py`` process per cluster (``_watchdog``,
    stdlib only, written into the cluster's directory), in its own session, reads its stdin
    from a pipe whose only writer is the parent. The parent tells it each child's process
    group as it starts it (and when it has reaped it). At EOF, which comes when the parent
    closes the pipe or dies by any means, it sends SIGTERM to the workers' groups, waits,
    SIGKILLs them, does the same to Redis, and removes the cluster's temporary directory.
    Process groups catch Celery's prefork pool children, which PDEATHSIG (direct children
    only) does not reach, SIGKILL catches a worker stuck in its shutdown, and none of it
    needs prctl.

  A process that ``fork()``s without ``exec`` (multiprocessing's "fork") shares the pipe's
  write end with its children; if they outlive the parent the watchdog waits for them, but
  PDEATHSIG still fires. ``tests/producer/test_embedded.py`` SIGKILLs parents and checks that
  redis-server, the workers and their pool children are gone: with both layers, with
  PDEATHSIG alone (the watchdog killed first) and with the watchdog alone (no prctl).

A cluster belongs to the process that started it: in a forked child ``stop()`` does nothing.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import inspect
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from queue import SimpleQueue
from types import FrameType, TracebackType
from typing import IO, Any, TypeVar

import redis

from wire.constants import workers_key
from wire.errors import ConfigurationError
from wire.modelref import ModelRef, parse_model_ref

from .redis_server import RedisServer

T = TypeVar("T")

#: How long a worker may take to show its first heartbeat.
WORKER_START_TIMEOUT_S = 60.0
#: How long stop() waits after SIGTERM before it SIGKILLs (per cluster, not per worker).
STOP_GRACE_S = 10.0
#: How long the watchdog waits after SIGTERM before it SIGKILLs, once the parent is gone.
WATCHDOG_GRACE_S = 3.0
#: Lines of a failed worker's log quoted in the error.
LOG_TAIL_LINES = 25

_PR_SET_PDEATHSIG = 1


def _watchdog(grace_s: float, temporary_directory: str) -> None:
    """The watchdog process's program, run from its source: keep it (and
    ``_watchdog_stop``) stdlib-only, with imports inside.

    stdin lines: ``worker PGID`` / ``redis PGID`` register a process group, ``- PGID``
    forgets one. At EOF every group still registered is stopped, workers before Redis, and
    the cluster's temporary directory (if it has one) is removed.
    """
    import shutil
    import sys

    live: dict[int, str] = {}
    for line in sys.stdin:  # ends at EOF: the parent closed the pipe, or died
        role, _, pgid = line.strip().partition(" ")
        if role == "-":
            live.pop(int(pgid), None)
        elif pgid:
            live[int(pgid)] = role
    for role in ("worker", "redis"):  # workers first: they deregister their heartbeats
        _watchdog_stop([pgid for pgid, group_role in live.items() if group_role == role], grace_s)
    if temporary_directory:
        shutil.rmtree(temporary_directory, ignore_errors=True)


def _watchdog_stop(groups: list[int], grace_s: float) -> None:
    """SIGTERM the process groups, wait up to ``grace_s`` for them to go, SIGKILL the rest."""
    import contextlib
    import os
    import signal
    import time

    def alive(pgid: int) -> bool:
        try:
            os.killpg(pgid, 0)
        except OSError:
            return False
        return True

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pgid in groups:
            with contextlib.suppress(OSError):  # gone already
                os.killpg(pgid, sig)
        deadline = time.monotonic() + grace_s
        while groups and time.monotonic() < deadline:
            time.sleep(0.05)
            groups = [pgid for pgid in groups if alive(pgid)]


class _Spawner:
    """One long-lived daemon thread that forks every child (see the module docstring)."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._jobs: SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="sibylq-spawner", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            function, future = self._jobs.get()
            try:
                future.set_result(function())
            except BaseException as exc:  # handed to the caller
                future.set_exception(exc)

    def call(self, function: Callable[[], T]) -> T:
        if threading.current_thread() is self._thread:
            return function()
        future: Future[T] = Future()
        self._jobs.put((function, future))
        return future.result()


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that sets PR_SET_PDEATHSIG, or None off Linux."""
    if sys.platform != "linux":
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before fork, not in the child
    parent = os.getpid()
    sigterm = int(signal.SIGTERM)

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, sigterm, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl: nobody will signal us
            os.kill(os.getpid(), sigterm)

    return preexec


def _spawn(
    command: list[str],
    *,
    log: IO[bytes] | None = None,
    on_start: Callable[[subprocess.Popen[bytes]], None] | None = None,
    **popen: Any,
) -> subprocess.Popen[bytes]:
    """Start ``command`` from the spawner thread, in its own session, to die with this process.

    ``on_start`` runs in the spawner right after the fork, so a caller interrupted meanwhile
    (Ctrl-C) cannot lose track of the child.
    """
    stderr = subprocess.STDOUT if log is not None else None

    def start() -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=stderr,
            start_new_session=True,
            preexec_fn=_die_with_parent(),
            **popen,
        )
        if on_start is not None:
            on_start(process)
        return process

    return _PROCESS.spawner().call(start)


class _Redis(RedisServer):
    """``RedisServer`` whose process is started by ``_spawn`` (own session, PDEATHSIG)."""

    def __init__(
        self,
        directory: Path,
        on_start: Callable[[subprocess.Popen[bytes]], None],
        *,
        appendonly: bool,
    ) -> None:
        super().__init__(directory, appendonly=appendonly)
        self._on_start = on_start

    def _popen(self, command: list[str]) -> subprocess.Popen[bytes]:
        return _spawn(command, on_start=self._on_start)


@dataclass
class _Worker:
    model: str
    queue: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-LOG_TAIL_LINES:])


class EmbeddedCluster:
    """A private ``redis-server`` plus workers started on demand, all child processes.

    ``with EmbeddedCluster() as cluster: cluster.ensure_worker("fake")`` then point a
    ``Settings(broker_url=cluster.url)`` at it. Thread-safe; workers start one at a time.
    """

    def __init__(
        self,
        directory: Path | None = None,
        *,
        heartbeat_interval_s: float = 0.5,
        start_timeout_s: float = WORKER_START_TIMEOUT_S,
        appendonly: bool = False,
    ) -> None:
        self._given_directory = directory
        self._appendonly = appendonly
        self._directory: Path | None = directory
        self.heartbeat_interval_s = heartbeat_interval_s
        self.start_timeout_s = start_timeout_s
        self._lock = threading.RLock()
        self._owner_pid = os.getpid()
        self._redis: _Redis | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._workers: dict[str, _Worker] = {}
        self._logs = 0

    @property
    def directory(self) -> Path:
        """Where Redis and the worker logs live; a temporary one is made on first use."""
        with self._lock:
            if self._directory is None:
                self._directory = Path(tempfile.mkdtemp(prefix="sibylq-"))
            return self._directory

    @property
    def url(self) -> str:
        """The broker (and result) URL; raises ConfigurationError before ``start()``."""
        server = self._redis
        if server is None:
            raise ConfigurationError("the embedded cluster is not started")
        return server.url

    @property
    def pids(self) -> list[int]:
        """Process ids of redis-server, the watchdog and each worker's main process, in
        that order (a worker's pool processes are in its process group)."""
        with self._lock:
            processes = [self._watchdog, *(w.process for w in self._workers.values())]
            pids = [p.pid for p in processes if p is not None]
            redis_pid = None if self._redis is None else self._redis.pid
            return pids if redis_pid is None else [redis_pid, *pids]

    def start(self) -> str:
        """Start Redis (once); returns its URL."""
        with self._lock:
            if self._redis is None:
                self._owner_pid = os.getpid()
                try:
                    self._start_redis()
                except BaseException:
                    self.stop()
                    raise
                _PROCESS.track(self)
            return self.url

    def _start_redis(self) -> None:
        directory = self.directory
        directory.mkdir(parents=True, exist_ok=True)
        program = [inspect.getsource(function) for function in (_watchdog, _watchdog_stop)]
        temporary = "" if self._given_directory is not None else str(directory)
        script = directory / "watchdog.py"
        script.write_text("\n".join([*program, f"_watchdog({WATCHDOG_GRACE_S!r}, {temporary!r})"]))
        with (directory / "watchdog.log").open("ab") as log:
            self._watchdog = subprocess.Popen(
                [sys.executable, "-I", "-S", str(script)],
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # not hit by a terminal's Ctrl-C
            )
        self._redis = _Redis(
            directory / "redis",
            lambda p: self._tell_watchdog(f"redis {p.pid}"),
            appendonly=self._appendonly,
        )
        self._redis.start()

    def ensure_redis(self) -> int | None:
        """Start Redis again, on the same port and directory (its append-only file, if it
        keeps one, restores what it held), if its process has ended; returns the status it
        ended with, or None if it was running. Raises ConfigurationError if it cannot be
        started again (another process took the port, say)."""
        with self._lock:
            server = self._redis
            status = None if server is None else server.exit_status()
            if server is None or status is None:
                return None
            self._tell_watchdog(f"- {server.pid}")
            server.stop()
            try:
                server.start()
            except ConfigurationError as exc:
                raise ConfigurationError(
                    f"redis-server exited (status {status}) and could not be started again: {exc}"
                ) from None
            return status

    def _tell_watchdog(self, line: str) -> None:
        watchdog = self._watchdog
        if watchdog is not None and watchdog.stdin is not None:
            with contextlib.suppress(OSError, ValueError):  # gone: nothing to tell
                os.write(watchdog.stdin.fileno(), f"{line}\n".encode())

    def ensure_worker(self, model: str, *, concurrency: int | None = None) -> None:
        """Start a worker for ``model``'s queue unless one of this cluster's serves it (then
        ``concurrency`` is ignored); one that died is replaced.

        Starts the cluster if needed, and returns once the worker's heartbeat shows. Raises
        UnknownModelError for a bad reference, ConfigurationError (with the end of the
        worker's log) when the worker exits or does not come up in ``start_timeout_s``.
        """
        ref = parse_model_ref(model, any_api_model=True)
        with self._lock:
            self.start()
            current = self._workers.get(ref.queue)
            if current is not None and current.process.poll() is None:
                return
            if current is not None:  # it died: clear what is left of it, start another
                self._stop_workers([current])
            since = time.time()  # a heartbeat older than this may be a dead worker's
            worker = self._start_worker(model, ref, concurrency)
            try:
                self._wait_ready(worker, since=since)
            except BaseException:
                self._stop_workers([worker])
                raise

    def _start_worker(self, model: str, ref: ModelRef, concurrency: int | None) -> _Worker:
        if concurrency is None and ref.provider == "fake":
            concurrency = 8
        command = [sys.executable, "-m", "workers", model]
        if concurrency is not None:
            command += ["-c", str(concurrency)]
        env = {key: value for key, value in os.environ.items() if key != "SIBYLQ_RESULT_BACKEND"}
        env.update(
            SIBYLQ_BROKER_URL=self.url,
            SIBYLQ_HEARTBEAT_INTERVAL_S=str(self.heartbeat_interval_s),
            PYTHONUNBUFFERED="1",
        )
        self._logs += 1
        log_path = self.directory / f"worker-{self._logs}-{ref.queue}.log"
        with log_path.open("ab") as log:
            process = _spawn(
                command, log=log, env=env, on_start=lambda p: self._tell_watchdog(f"worker {p.pid}")
            )
        worker = _Worker(model, ref.queue, process, log_path)
        self._workers[ref.queue] = worker
        return worker

    def _wait_ready(self, worker: _Worker, *, since: float) -> None:
        """Wait for the worker's first heartbeat after ``since``."""
        client = redis.Redis.from_url(self.url, socket_connect_timeout=2)
        deadline = time.monotonic() + self.start_timeout_s
        try:
            while client.zcount(workers_key(worker.queue), since, "+inf") == 0:
                if worker.process.poll() is not None:
                    raise ConfigurationError(
                        f"the worker for {worker.model!r} exited (status "
                        f"{worker.process.returncode}) before it was ready; the end of "
                        f"{worker.log_path}:\n{worker.log_tail()}"
                    )
                if time.monotonic() > deadline:
                    raise ConfigurationError(
                        f"the worker for {worker.model!r} did not start within "
                        f"{self.start_timeout_s:g}s; the end of {worker.log_path}:\n"
                        f"{worker.log_tail()}"
                    )
                time.sleep(0.05)
        finally:
            client.close()

    def _forget(self, worker: _Worker) -> None:
        if self._workers.get(worker.queue) is worker:
            del self._workers[worker.queue]
        self._tell_watchdog(f"- {worker.process.pid}")

    def _stop_workers(self, workers: list[_Worker]) -> None:
        """SIGTERM each worker's group, wait up to STOP_GRACE_S in all, then SIGKILL."""
        for worker in workers:
            _signal_group(worker.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for worker in workers:
            try:
                worker.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(worker.process.pid, signal.SIGKILL)
                worker.process.wait()
            _signal_group(worker.process.pid, signal.SIGKILL)  # pool children left behind
            self._forget(worker)

    def stop(self) -> None:
        """Stop the workers, then Redis, then the watchdog; idempotent."""
        with self._lock:
            if os.getpid() != self._owner_pid:
                return  # a forked child: the cluster is its parent's
            self._stop_workers(list(self._workers.values()))
            if self._redis is not None:
                self._tell_watchdog(f"- {self._redis.pid}")
                self._redis.stop()
                self._redis = None
            self._stop_watchdog()
            _PROCESS.untrack(self)
            if self._given_directory is None and self._directory is not None:
                shutil.rmtree(self._directory, ignore_errors=True)
                self._directory = None

    def _stop_watchdog(self) -> None:
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is None:
            return
        if watchdog.stdin is not None:
            watchdog.stdin.close()  # EOF: it stops whatever is still registered, then exits
        try:
            watchdog.wait(timeout=2 * WATCHDOG_GRACE_S + 5)
        except subprocess.TimeoutExpired:
            watchdog.kill()
            watchdog.wait()

    def __enter__(self) -> EmbeddedCluster:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(OSError):  # the group is gone already
        os.killpg(pgid, sig)


class _ProcessClusters:
    """What belongs to this process as a whole, not to one cluster: the spawner thread, every
    started cluster (stopped by one ``atexit`` hook and one SIGTERM handler, which are
    process-wide by nature) and the default cluster. One instance, ``_PROCESS``."""

    def __init__(self) -> None:
        self._lock = threading.RLock()  # an RLock: the SIGTERM handler takes it too
        self._started: list[EmbeddedCluster] = []
        self._spawner: _Spawner | None = None
        self._default: EmbeddedCluster | None = None
        atexit.register(self.stop_all)

    def spawner(self) -> _Spawner:
        with self._lock:
            if self._spawner is None or self._spawner.pid != os.getpid():
                self._spawner = _Spawner()  # after fork() the old thread is gone
            return self._spawner

    def default(self) -> EmbeddedCluster:
        with self._lock:
            if self._default is None:
                self._default = EmbeddedCluster()
            default = self._default
        default.start()
        return default

    def track(self, cluster: EmbeddedCluster) -> None:
        with self._lock:
            if cluster not in self._started:
                self._started.append(cluster)
        install_sigterm_handler()

    def untrack(self, cluster: EmbeddedCluster) -> None:
        with self._lock:
            if cluster in self._started:
                self._started.remove(cluster)

    def stop_all(self, lock_timeout_s: float = 5.0) -> None:
        """Stop every started cluster, newest first. One busy in another thread for longer
        than ``lock_timeout_s`` (starting a worker) is left to PDEATHSIG and the watchdog."""
        with self._lock:
            clusters = self._started[::-1]
        for cluster in clusters:
            if not cluster._lock.acquire(timeout=lock_timeout_s):
                continue
            try:
                cluster.stop()
            finally:
                cluster._lock.release()


def install_sigterm_handler() -> None:
    """Stop the clusters on SIGTERM, if SIGTERM still has its default action. Called when a
    cluster starts, and by a producer about to start one from a thread (an event loop's first
    use): only the main thread may set it."""
    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread may set handlers; PDEATHSIG and the watchdog remain
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    _PROCESS.stop_all()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)  # die of SIGTERM, as without this handler


_PROCESS = _ProcessClusters()


def default_cluster() -> EmbeddedCluster:
    """The process-wide embedded cluster, started on first use and stopped at exit."""
    return _PROCESS.default()


def run_up(models: list[str]) -> int:
    """``sibylq up MODEL...``: a cluster serving ``models`` in the foreground until Ctrl-C or
    SIGTERM. Workers that die are restarted, and so is Redis, on the same port, from its
    append-only file (so jobs queued survive it). Returns 0 once stopped."""
    stop_requested = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop_requested.set())
    cluster = EmbeddedCluster(appendonly=True)
    try:
        url = cluster.start()
        for model in models:
            cluster.ensure_worker(model)
        _print_banner(url, models, cluster.directory)
        while not stop_requested.wait(1.0):
            status = cluster.ensure_redis()
            if status is not None:
                print(f"sibylq: redis-server exited (status {status}); started again", flush=True)
            with contextlib.suppress(redis.ConnectionError):  # Redis died meanwhile: next tick
                for model in models:
                    cluster.ensure_worker(model)  # restarts a worker that died
    except KeyboardInterrupt:
        pass
    finally:
        print("sibylq: stopping", flush=True)
        cluster.stop()
        if previous is not None:  # None: a handler not set from Python, cannot be restored
            signal.signal(signal.SIGTERM, previous)
    return 0


def _print_banner(url: str, models: list[str], directory: Path) -> None:
    served = ", ".join(f"{m} ({parse_model_ref(m, any_api_model=True).queue})" for m in models)
    print(f"sibylq: Redis at {url}; workers: {served or 'none'}; logs in {directory}")
    print("Use it from other shells with:")
    print(f"  export SIBYLQ_BROKER_URL={url}")
    print("Press Ctrl-C to stop.", flush=True)
