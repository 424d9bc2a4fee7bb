"""Figures, targets and tables: what each benchmark hands back, printed and written as JSON."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

T = TypeVar("T")
V = TypeVar("V")


class Skipped(Exception):  # noqa: N818 - a verdict, not an error
    """A benchmark cannot run here (a missing optional dependency or dataset)."""


def median(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100), interpolating between the closest ranks."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def alternate(repeats: int, sides: Sequence[T], measure: Callable[[T], V]) -> dict[T, list[V]]:
    """Measure every side ``repeats`` times, interleaved (A B A B ...), so drift in the
    machine's load falls on both sides alike; the samples per side."""
    samples: dict[T, list[V]] = {side: [] for side in sides}
    for _ in range(repeats):
        for side in sides:
            samples[side].append(measure(side))
    return samples


@dataclass(frozen=True)
class Target:
    """``on`` the ratio (sibylq / baseline) or sibylq's own figure, ``op`` a bound ``value``."""

    op: Literal["<=", ">="]
    value: float
    on: Literal["ratio", "sibylq"] = "ratio"

    def text(self) -> str:
        suffix = "x" if self.on == "ratio" else ""
        return f"{self.op} {self.value:g}{suffix}"

    def met(self, figure: float) -> bool:
        return figure <= self.value if self.op == "<=" else figure >= self.value


@dataclass
class Row:
    metric: str
    unit: str
    sibylq: float
    baseline: float | None = None
    target: Target | None = None

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or self.baseline == 0:
            return None
        return self.sibylq / self.baseline

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        figure = self.ratio if self.target.on == "ratio" else self.sibylq
        return None if figure is None else self.target.met(figure)

    def to_json(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "unit": self.unit,
            "sibylq": self.sibylq,
            "baseline": self.baseline,
            "ratio": self.ratio,
            "target": None if self.target is None else self.target.text(),
            "met": self.met,
        }


@dataclass
class Result:
    """One benchmark's outcome: its table, what each side was, and the raw samples."""

    name: str
    title: str
    sibylq_side: str
    baseline_side: str
    rows: list[Row] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    samples: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    @property
    def targets(self) -> list[Row]:
        return [row for row in self.rows if row.target is not None]

    def table(self) -> str:
        header = ("metric", "sibylq", "baseline", "ratio", "target", "met?")
        cells = [header, *(_cells(row) for row in self.rows)]
        widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
        lines = [f"== {self.name}: {self.title} ({self.wall_s:.0f}s) =="]
        for index, line in enumerate(cells):
            lines.append(
                " | ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True))
            )
            if index == 0:
                lines.append("-+-".join("-" * width for width in widths))
        lines.append(f"  sibylq:   {self.sibylq_side}")
        lines.append(f"  baseline: {self.baseline_side}")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "sibylq_side": self.sibylq_side,
            "baseline_side": self.baseline_side,
            "wall_s": self.wall_s,
            "params": self.params,
            "rows": [row.to_json() for row in self.rows],
            "samples": self.samples,
            "notes": self.notes,
        }

    def write(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{self.name}.json"
        path.write_text(json.dumps(self.to_json(), indent=2, default=_jsonable) + "\n")
        return path


def _cells(row: Row) -> tuple[str, str, str, str, str, str]:
    ratio = row.ratio
    met = {None: "", True: "yes", False: "NO"}[row.met]
    return (
        f"{row.metric} ({row.unit})" if row.unit else row.metric,
        _figure(row.sibylq),
        "" if row.baseline is None else _figure(row.baseline),
        "" if ratio is None else ("n/a" if math.isnan(ratio) else f"{ratio:.2f}x"),
        "" if row.target is None else row.target.text(),
        met,
    )


def _figure(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    if value != 0 and abs(value) < 0.1:
        return f"{value:.3g}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"


def _jsonable(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    return str(value)
