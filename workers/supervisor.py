"""``sibylq worker MODEL --processes N``: N worker processes started, signalled and stopped as one.

A threads-pool worker runs every job's Python (the SDK's request building and parsing, Celery's
delivery and acks) under one GIL: an API worker tops out at about one core, ~100-150 requests/s,
however many threads it has. Like dramatiq's ``--processes``, N processes share the concurrency
(``-c 64 --processes 2``: two workers of 32 threads) and use N cores.

The supervisor forwards SIGINT, SIGTERM and SIGQUIT to every child (Celery's warm and cold
shutdowns keep their meaning). When one child exits on its own, the others are stopped (warm)
and the supervisor exits with that child's code: one failure handling for the fleet manager
(Docker, Kubernetes, systemd) that restarts the whole worker; a child killed by a signal N
exits the supervisor with 128 + N.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import FrameType

log = logging.getLogger(__name__)

_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT)


def split_concurrency(total: int, processes: int) -> list[int]:
    """``total`` jobs at once over ``processes`` processes, as even as can be (each at least 1)."""
    if processes < 1:
        raise ValueError("processes must be at least 1")
    base, extra = divmod(max(total, processes), processes)
    return [base + (index < extra) for index in range(processes)]


@dataclass(frozen=True)
class Child:
    """One worker process: its argv, and what its environment adds to the supervisor's."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


def supervise(specs: Sequence[Child], poll_s: float = 0.2) -> int:
    """Run every child until one exits; returns that child's exit code."""
    children = [subprocess.Popen(spec.argv, env={**os.environ, **spec.env}) for spec in specs]
    stopping: list[int] = []

    def forward(signum: int, _frame: FrameType | None) -> None:
        stopping.append(signum)
        _signal_all(children, signum)

    previous = {signum: signal.signal(signum, forward) for signum in _FORWARDED}
    try:
        first = _wait_any(children, poll_s)
        if not stopping:
            log.warning(
                "worker process %d exited with %d: stopping the others", first.pid, first.returncode
            )
            _signal_all(children, signal.SIGTERM)
        for child in children:
            child.wait()
        return _exit_code(first.returncode)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _wait_any(children: list[subprocess.Popen[bytes]], poll_s: float) -> subprocess.Popen[bytes]:
    while True:
        for child in children:
            if child.poll() is not None:
                return child
        time.sleep(poll_s)


def _exit_code(returncode: int) -> int:
    """A child killed by signal N (``returncode`` -N) exits the supervisor with 128 + N, as a
    shell reports it."""
    return 128 - returncode if returncode < 0 else returncode


def _signal_all(children: list[subprocess.Popen[bytes]], signum: int) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signum)


def child_command(argv: Sequence[str], concurrency: int) -> list[str]:
    """The argv of one child: a worker with its own share of the concurrency."""
    return [sys.executable, "-m", "workers", *argv, f"--concurrency={concurrency}"]
