"""The output file: JSONL or CSV, decided once per run from its name, appended a row at a time.

Every finished row is flushed at once, so a crash or Ctrl-C keeps it; a torn last line (a
crash mid-write) is cut off. Next to it, ``OUT.manifest.json`` says which command made the
rows (``manifest.py``): a re-run reuses them only when it is the same command.

Nothing is created or changed before the first row is written: a run that fails to start
leaves no file behind, and the old one untouched.
"""

from __future__ import annotations

import csv
import json
import os
import stat
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import IO, Any

from wire.errors import InvalidRequestError

from . import retrying
from .ids import key_text
from .manifest import Manifest, manifest_path
from .results import LabelResult, Previous

COLUMNS = (
    "key", "line", "status", "result", "error", "attempts", "retries",
    "prompt_tokens", "completion_tokens", "latency_s", "job_id", "label_probs",
)  # fmt: skip
#: The columns of a CSV made before ``label_probs``: still resumed, in its own columns.
_EARLIER_COLUMNS = COLUMNS[:-1]
_INT_COLUMNS = ("line", "attempts", "retries", "prompt_tokens", "completion_tokens")
_JSON_COLUMNS = ("result", "error", "label_probs")
_STATUSES = ("done", "failed")


class OutputFormat(StrEnum):
    JSONL = "jsonl"
    CSV = "csv"

    @classmethod
    def for_path(cls, path: Path) -> OutputFormat:
        """CSV when the name ends in ``.csv``, else JSONL."""
        return cls.CSV if path.suffix.lower() == ".csv" else cls.JSONL


class Reuse(StrEnum):
    """What a run does with the rows an output already holds (made by the same command)."""

    #: Keep them all: the run labels only the rows the output lacks.
    KEEP = "keep"
    #: Keep the done rows; re-run the failed ones (``--retry-failed``).
    RETRY_FAILED = "retry-failed"
    #: Keep nothing: the first row written replaces the file (``--overwrite``).
    OVERWRITE = "overwrite"


def check_writable(path: Path) -> None:
    """Raise InvalidRequestError unless ``path`` can be created or appended to."""
    parent = path.parent
    if path.is_dir():
        raise InvalidRequestError(
            f"-o {path} is a directory: name a file, e.g. {path / 'out.jsonl'}"
        )
    if not parent.is_dir():
        raise InvalidRequestError(f"-o {path}: the directory {parent} does not exist")
    if path.exists() and not stat.S_ISREG(path.stat().st_mode):
        raise InvalidRequestError(f"-o {path} is not a regular file")
    # The directory too: the manifest and a --retry-failed rewrite are created next to it.
    for needed in (parent, path) if path.exists() else (parent,):
        if not os.access(needed, os.W_OK):
            raise InvalidRequestError(f"-o {path}: {needed} is not writable")


class OutputFile:
    """One run's output. ``previous()`` reads what is reusable; ``write`` appends a row."""

    def __init__(self, path: Path, manifest: Manifest, reuse: Reuse = Reuse.KEEP) -> None:
        self.path = path
        self.manifest = manifest
        self.format = OutputFormat(manifest.format)
        self.reuse = reuse
        self._file: IO[str] | None = None
        self._csv: Any = None
        #: What ``previous()`` found: failed rows, and retries in flight (``retrying.py``).
        self._previous = Previous()
        #: A CSV's columns: its header's, when it has one.
        self._columns: tuple[str, ...] = COLUMNS

    def previous(self) -> Previous:
        """The rows this run must not label again. Raises InvalidRequestError when the file
        holds rows of another command (or of no known command). The caller has checked that
        the path is writable (``check_writable``: before it takes the output's lock)."""
        if self.reuse is Reuse.OVERWRITE or not self._holds_data():
            return Previous()
        before = Manifest.load(self.path)
        if before is None:
            raise InvalidRequestError(
                f"{self.path} already exists, and no {manifest_path(self.path).name} next to "
                "it says which command made it: give another -o, or add --overwrite to replace it"
            )
        changes = self.manifest.differences(before)
        if changes:
            raise InvalidRequestError(
                f"{self.path} holds rows made by another command ({'; '.join(changes)}). "
                "They cannot be reused: give another -o, or add --overwrite to replace them"
            )
        previous = Previous()
        for record in self._records():
            key = key_text(record["key"])
            if record["status"] == "done":
                previous.done.add(key)
                previous.failed.pop(key, None)
            else:
                previous.failed[key] = record["retries"]
        previous.retrying = {
            key: retries
            for key, retries in retrying.load(self.path).items()
            if key not in previous.done and key not in previous.failed
        }
        self._previous = previous
        return previous

    def write(self, result: LabelResult) -> None:
        if self._file is None:
            self._open()
        assert self._file is not None
        if self._csv is not None:
            self._csv.writerow(_to_cells(result.to_record(), self._columns))
        else:
            self._file.write(json.dumps(result.to_record(), ensure_ascii=False) + "\n")
        self._file.flush()

    def finish(self) -> None:
        """At the end of a run: the file exists (with its manifest) even if no row was
        written, then it is closed; no retry is in flight any more."""
        if self._file is None:
            self._open()
        self.close()
        retrying.remove(self.path)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    # -- the first write: manifest, then the file -----------------------------------------

    def _open(self) -> None:
        # The old rows go before the new manifest is saved: a crash in between must not
        # leave a manifest that vouches for another command's rows.
        if self.reuse is Reuse.OVERWRITE:
            self.path.unlink(missing_ok=True)
        self.manifest.save(self.path)
        failed = self._previous.failed
        if self.reuse is Reuse.RETRY_FAILED and failed:
            # Saved before the rows go: the next run attaches to their retries' jobs.
            retries = {key: n + 1 for key, n in failed.items()}
            retrying.save(self.path, {**self._previous.retrying, **retries})
            self._drop_failed()
        elif not self._previous.retrying:
            retrying.remove(self.path)  # another command's, or left by an older run
        _cut_torn_tail(self.path)
        new = not self.path.exists() or self.path.stat().st_size == 0
        self._file = self.path.open("a", encoding="utf-8", newline="")
        if self.format is OutputFormat.CSV:
            self._csv = csv.writer(self._file)
            if new:
                self._columns = COLUMNS
                self._csv.writerow(COLUMNS)

    def _drop_failed(self) -> None:
        """Rewrite the file without its failed rows (they are about to run again), in its own
        format, atomically."""
        temporary = self.path.with_name(self.path.name + ".tmp")
        with temporary.open("w", encoding="utf-8", newline="") as kept:
            writer = csv.writer(kept) if self.format is OutputFormat.CSV else None
            if writer is not None:
                writer.writerow(self._columns)  # the header ``previous()`` read
            for record in self._records():
                if record["status"] != "done":
                    continue
                if writer is not None:
                    writer.writerow(_to_cells(record, self._columns))
                else:
                    kept.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(temporary, self.path)

    # -- reading ---------------------------------------------------------------------------

    def _holds_data(self) -> bool:
        return self.path.exists() and self.path.stat().st_size > 0

    def _records(self) -> Iterator[dict[str, Any]]:
        """The file's records, decoded to their types; a torn last line is left out."""
        with self.path.open(encoding="utf-8", newline="") as source:
            lines = _whole_lines(source)
            if self.format is OutputFormat.CSV:
                yield from self._csv_records(lines)
            else:
                yield from self._jsonl_records(lines)

    def _jsonl_records(self, lines: Iterator[str]) -> Iterator[dict[str, Any]]:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise self._unreadable(number, f"not JSON ({exc.msg})") from exc
            yield self._checked(record, number)

    def _csv_records(self, lines: Iterator[str]) -> Iterator[dict[str, Any]]:
        reader = csv.reader(lines)
        header = next(reader, None)
        if header is not None:
            if tuple(header) not in (COLUMNS, _EARLIER_COLUMNS):
                raise self._unreadable(1, f"the header is not {','.join(COLUMNS)}")
            self._columns = tuple(header)
        for cells in reader:
            try:
                record = _from_cells(cells, self._columns)
            except (ValueError, TypeError) as exc:
                raise self._unreadable(reader.line_num, str(exc)) from exc
            yield self._checked(record, reader.line_num)

    def _checked(self, record: Any, number: int) -> dict[str, Any]:
        if not isinstance(record, dict) or "key" not in record:
            raise self._unreadable(number, "not a labeled row")
        if record.get("status") not in _STATUSES:
            raise self._unreadable(number, f"unknown status {record.get('status')!r}")
        record.setdefault("retries", 0)
        return record

    def _unreadable(self, line: int, why: str) -> InvalidRequestError:
        return InvalidRequestError(
            f"{self.path} line {line} is {why}: the file was changed by hand. Fix it, give "
            "another -o, or add --overwrite to replace it"
        )


def _to_cells(record: dict[str, Any], columns: tuple[str, ...]) -> list[Any]:
    """A record as CSV cells: JSON for results, errors and probabilities, the key as text,
    None as ''."""
    cells: list[Any] = []
    for name in columns:
        value = record[name]
        if name in _JSON_COLUMNS:
            cells.append(json.dumps(value, ensure_ascii=False))
        elif name == "key":
            cells.append(key_text(value))
        else:
            cells.append("" if value is None else value)
    return cells


def _from_cells(cells: list[str], columns: tuple[str, ...]) -> dict[str, Any]:
    """The inverse of ``_to_cells`` (keys stay text: they compare as text)."""
    if len(cells) != len(columns):
        raise ValueError(f"a row of {len(cells)} cells, not {len(columns)}")
    record: dict[str, Any] = dict(zip(columns, cells, strict=True))
    for name in _INT_COLUMNS:
        record[name] = int(record[name])
    for name in _JSON_COLUMNS:
        if name in record:
            record[name] = json.loads(record[name])
    record["latency_s"] = float(record["latency_s"])
    record["job_id"] = record["job_id"] or None
    return record


def _whole_lines(source: IO[str]) -> Iterator[str]:
    """The lines of ``source`` that end with a newline: a last line without one is torn."""
    for line in source:
        if line.endswith("\n"):
            yield line


def _cut_torn_tail(path: Path) -> None:
    """A crash mid-write can leave a last line without its newline: drop it."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb+") as raw:
        raw.seek(-1, os.SEEK_END)
        if raw.read(1) == b"\n":
            return
        raw.seek(0)
        data = raw.read()
        raw.truncate(data.rfind(b"\n") + 1)
