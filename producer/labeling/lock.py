"""One run at a time per output: ``OUT.lock``, next to ``OUT``, held for the whole run.

Two runs appending to one output would interleave their rows and each rewrite the other's
manifest. The second run stops at once instead, saying which run holds the output. The lock
is the kernel's (``flock``): a run killed with SIGKILL holds it no more, and the file it left
is taken over and removed by the next run that ends.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from wire.errors import InvalidRequestError

LOCK_SUFFIX = ".lock"


def lock_path(output: Path) -> Path:
    return output.with_name(output.name + LOCK_SUFFIX)


@contextlib.contextmanager
def output_lock(output: Path) -> Iterator[None]:
    """Hold ``output``'s lock while the block runs; InvalidRequestError if another run holds
    it. Where the file system has no locks, the run goes on unlocked."""
    path = lock_path(output)
    descriptor = _locked(path, output)
    try:
        yield
    finally:
        if descriptor is not None:
            with contextlib.suppress(OSError):
                path.unlink()  # while still held: a run that opened it meanwhile retries
            os.close(descriptor)


def _locked(path: Path, output: Path) -> int | None:
    """A descriptor of ``path`` holding its lock; None where locks are not supported."""
    while True:
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise InvalidRequestError(
                f"-o {output}: cannot create its lock file {path}: {exc.strerror}"
            ) from exc
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _holder(descriptor)
            os.close(descriptor)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):  # no locks on this FS
                with contextlib.suppress(OSError):
                    path.unlink()
                return None
            raise InvalidRequestError(
                f"another sibylq label run{holder} is writing {output} ({path.name} is "
                "locked): wait for it to end, or give another -o"
            ) from exc
        if _same_file(descriptor, path):
            os.ftruncate(descriptor, 0)
            os.write(descriptor, f"{os.getpid()}\n".encode())
            return descriptor
        os.close(descriptor)  # removed by the run that held it, between open and lock


def _same_file(descriptor: int, path: Path) -> bool:
    try:
        on_disk = path.stat()
    except FileNotFoundError:
        return False
    held = os.fstat(descriptor)
    return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _holder(descriptor: int) -> str:
    """`` (process N)`` from the lock file, when it says."""
    try:
        pid = os.pread(descriptor, 32, 0).decode().strip()
    except (OSError, UnicodeDecodeError):
        return ""
    return f" (process {pid})" if pid.isdigit() else ""
