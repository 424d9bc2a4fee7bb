"""The output file: JSONL (or CSV when the name says so), appended a row at a time.

Every finished row is flushed at once, so a crash or Ctrl-C keeps it. On a re-run the file
is scanned (streamed) for the keys already there; a torn last line from a crash is cut off.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .ids import key_text
from .results import LabelResult

CSV_COLUMNS = [
    "key", "line", "status", "result", "error", "attempts",
    "prompt_tokens", "completion_tokens", "latency_s", "job_id",
]  # fmt: skip


@dataclass
class Previous:
    """What an earlier run left in the output: done keys, and failed keys with attempts."""

    done: set[str] = field(default_factory=set)
    failed: dict[str, int] = field(default_factory=dict)


class OutputFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.is_csv = path.suffix.lower() == ".csv"
        self._file: IO[str] | None = None
        self._csv: Any = None

    def scan(self) -> Previous:
        previous = Previous()
        for record in self._records():
            key = key_text(record.get("key"))
            if record.get("status") == "done":
                previous.done.add(key)
                previous.failed.pop(key, None)
            else:
                previous.failed[key] = int(record.get("attempts") or 1)
        return previous

    def drop_failed(self) -> None:
        """Rewrite the file without its failed rows, atomically (they are about to be re-run)."""
        if not self.path.exists():
            return
        temporary = self.path.with_name(self.path.name + ".tmp")
        with OutputFile(temporary) as kept:
            for record in self._records():
                if record.get("status") == "done":
                    kept.write_record(record)
        os.replace(temporary, self.path)

    def __enter__(self) -> OutputFile:
        self._cut_torn_tail()
        new = not self.path.exists() or self.path.stat().st_size == 0
        self._file = self.path.open("a", encoding="utf-8", newline="")
        if self.is_csv:
            self._csv = csv.DictWriter(self._file, fieldnames=CSV_COLUMNS)
            if new:
                self._csv.writeheader()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def write(self, result: LabelResult) -> None:
        self.write_record(result.to_record())

    def write_record(self, record: dict[str, Any]) -> None:
        assert self._file is not None, "use OutputFile as a context manager"
        if self.is_csv:
            encoded = {
                name: json.dumps(record[name]) if name in ("result", "error") else record[name]
                for name in CSV_COLUMNS
            }
            self._csv.writerow(encoded)
        else:
            self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()

    def _records(self) -> Iterator[dict[str, Any]]:
        if not self.path.exists():
            return
        with self.path.open(encoding="utf-8", newline="") as source:
            if self.is_csv:
                for row in csv.DictReader(source):
                    yield dict(row)
                return
            for line in source:
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn line: that row was not finished

    def _cut_torn_tail(self) -> None:
        """A crash mid-write can leave a last line without its newline: drop it."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with self.path.open("rb+") as raw:
            raw.seek(0, os.SEEK_END)
            size = raw.tell()
            raw.seek(max(0, size - 1))
            if raw.read(1) == b"\n":
                return
            raw.seek(0)
            data = raw.read()
            raw.truncate(data.rfind(b"\n") + 1)
