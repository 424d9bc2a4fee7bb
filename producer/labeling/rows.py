"""Input rows, streamed: JSONL or CSV, one row at a time, bad rows reported with their line.

Nothing here loads the whole file: a million-row input costs the memory of one row.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wire.errors import InvalidRequestError


@dataclass(frozen=True)
class Row:
    """One input row: its key (the id field, else the line number), its fields, its line."""

    key: Any
    fields: Mapping[str, Any]
    line: int


@dataclass(frozen=True)
class BadRow:
    """A row that cannot be used: malformed JSON, bad bytes, no key..."""

    key: Any
    line: int
    error: str


def read_rows(
    path: Path, *, id_field: str | None = None, needs: Collection[str] = ()
) -> Iterator[Row | BadRow]:
    """Rows of a ``.jsonl`` / ``.ndjson`` or ``.csv`` file, in order. The first readable row
    must have the fields in ``needs`` (and ``id_field``): else InvalidRequestError."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return _keyed(_jsonl_fields(path), id_field, needs)
    if suffix == ".csv":
        return _keyed(_csv_fields(path), id_field, needs)
    raise InvalidRequestError(f"cannot read {path}: use a .jsonl or .csv file")


def rows_from(
    records: Iterable[Mapping[str, Any]],
    *,
    id_field: str | None = None,
    needs: Collection[str] = (),
) -> Iterator[Row | BadRow]:
    """Rows from in-memory records (dicts), numbered from 1."""
    numbered = ((n, record, None) for n, record in enumerate(records, 1))
    return _keyed(numbered, id_field, needs)


def head_read(
    rows: Iterator[Row | BadRow], source: Path, limit: int = 1000
) -> Iterator[Row | BadRow]:
    """``rows``, with its head read now, up to the first readable row (at most ``limit``):
    the check of the first row's fields raises here, before any work starts. So does an
    input with no row, or none that can be labeled (not JSON Lines, say)."""
    head: list[Row | BadRow] = []
    for row in rows:
        head.append(row)
        if isinstance(row, Row) or len(head) >= limit:
            return itertools.chain(head, rows)
    if not head:
        raise InvalidRequestError(f"{source} holds no rows: nothing to label")
    first = head[0]  # every row is a BadRow: none was readable
    assert isinstance(first, BadRow)
    more = "" if len(head) == 1 else f", and the {len(head) - 1} other rows cannot either"
    raise InvalidRequestError(
        f"no row of {source} can be labeled ({first.error}{more}). {_FORMATS}"
    )


_FORMATS = (
    "sibylq label reads JSON Lines (.jsonl: one JSON object a line) or CSV (.csv: a header "
    "line, then one row a line)"
)


FieldsOrError = tuple[int, Mapping[str, Any] | None, str | None]


def _jsonl_fields(path: Path) -> Iterator[FieldsOrError]:
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                # A byte order mark (Windows editors write one) is no part of the first row.
                record = json.loads(raw.decode("utf-8-sig" if number == 1 else "utf-8"))
            except UnicodeDecodeError as exc:
                yield number, None, f"line {number} is not UTF-8: {exc.reason} at byte {exc.start}"
                continue
            except json.JSONDecodeError as exc:
                yield number, None, f"line {number} is not valid JSON: {exc.msg}"
                continue
            if not isinstance(record, dict):
                yield number, None, f"line {number} is not a JSON object"
                continue
            yield number, record, None


def _csv_fields(path: Path) -> Iterator[FieldsOrError]:
    with path.open("rb") as raw:
        # utf-8-sig: a byte order mark (Excel writes one) is no part of the first column's name.
        text = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="strict", newline="")
        reader = csv.DictReader(text)
        while True:
            try:
                record = next(reader)
            except StopIteration:
                return
            except UnicodeDecodeError as exc:
                # The CSV reader cannot resume after bad bytes: report and stop here.
                yield (
                    reader.line_num + 1,
                    None,
                    f"not UTF-8 after line {reader.line_num}: {exc.reason}",
                )
                return
            except csv.Error as exc:
                yield reader.line_num, None, f"line {reader.line_num}: {exc}"
                continue
            yield reader.line_num, record, None


def _keyed(
    items: Iterable[FieldsOrError], id_field: str | None, needs: Collection[str]
) -> Iterator[Row | BadRow]:
    """Attach keys. ``id_field=None`` means ``id`` when rows have one, else the line number."""
    checked = False
    for line, fields, error in items:
        if fields is None:
            yield BadRow(key=line, line=line, error=error or "unreadable row")
            continue
        if not checked:
            _check_fields(fields, line, id_field, needs)
            checked = True
        field = id_field if id_field is not None else ("id" if "id" in fields else None)
        if field is not None and (field not in fields or fields[field] in (None, "")):
            yield BadRow(key=line, line=line, error=f"line {line} has no {field!r} field")
            continue
        key = line if field is None else fields[field]
        nulls = [name for name in sorted(needs) if name in fields and fields[name] is None]
        if nulls:  # it would be asked about "None"
            named = ", ".join(repr(name) for name in nulls)
            yield BadRow(key=key, line=line, error=f"line {line}: {named} is null")
        else:
            yield Row(key=key, fields=fields, line=line)


def _check_fields(
    fields: Mapping[str, Any], line: int, id_field: str | None, needs: Collection[str]
) -> None:
    """The first readable row stands for the others: a field it lacks is a mistake in the
    command (or the input), not a failure of one row."""
    has = f"line {line} has: {_names(fields)}"
    if id_field is not None and id_field not in fields:
        raise InvalidRequestError(f"the rows have no id field {id_field!r} ({has})")
    missing = [name for name in sorted(needs) if name not in fields]
    if missing:
        wanted = ", ".join("{" + name + "}" for name in missing)
        raise InvalidRequestError(
            f"the prompt template uses {wanted}, but the rows have no such field ({has}). "
            "Fix the template or the input"
        )


def _names(fields: Mapping[str, Any], shown: int = 20) -> str:
    names = [str(name) for name in fields]
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return (", ".join(names[:shown]) or "no fields") + more
