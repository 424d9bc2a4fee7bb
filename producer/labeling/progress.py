"""Progress of a labeling run: a live bar on a terminal, log lines otherwise, or nothing."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import IO, Protocol

from tqdm import tqdm

from wire.contract import Usage
from wire.settings import Price

from ..pricing import cost_usd
from .results import LabelResult, Skipped


@dataclass
class Summary:
    done: int = 0
    failed: int = 0
    #: Rows the output held already, done or failed.
    skipped: int = 0
    #: Of those, the failed ones (``--retry-failed`` re-runs them).
    skipped_failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    started: float = field(default_factory=time.monotonic)
    #: The model's price (``SIBYLQ_PRICES``), to report the run's cost.
    price: Price | None = None

    def add(self, result: LabelResult | Skipped) -> None:
        if isinstance(result, Skipped):
            self.skipped += 1
            self.skipped_failed += result.failed
            return
        if result.ok:
            self.done += 1
        else:
            self.failed += 1
        self.prompt_tokens += result.usage.prompt_tokens
        self.completion_tokens += result.usage.completion_tokens

    @property
    def failed_rows(self) -> int:
        """Rows the output holds as failed at the end of the run."""
        return self.failed + self.skipped_failed

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    @property
    def rows_per_s(self) -> float:
        return (self.done + self.failed) / max(self.elapsed_s, 1e-9)

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def cost_usd(self) -> float | None:
        """What the run's tokens cost (failed rows' and retries' included); None when the
        model has no price."""
        if self.price is None:
            return None
        usage = Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens)
        return cost_usd(usage, self.price)

    def line(self) -> str:
        cost = "" if self.cost_usd is None else f", cost ${self.cost_usd:.4f}"
        failed_before = f" ({self.skipped_failed} failed)" if self.skipped_failed else ""
        return (
            f"done {self.done}, failed {self.failed}, skipped {self.skipped}{failed_before} in "
            f"{self.elapsed_s:.1f}s ({self.rows_per_s:.1f} rows/s), tokens {self.tokens} "
            f"({self.prompt_tokens} prompt + {self.completion_tokens} completion){cost}"
        )


class Progress(Protocol):
    def update(self, summary: Summary) -> None: ...
    def close(self) -> None: ...


class NoProgress:
    def update(self, summary: Summary) -> None:
        pass

    def close(self) -> None:
        pass


class BarProgress:
    """A tqdm bar: rows done, failed, rows/s, ETA (when the total is known) and tokens."""

    def __init__(self, total: int | None, stream: IO[str]) -> None:
        self._bar = tqdm(total=total, unit="row", file=stream, dynamic_ncols=True)

    def update(self, summary: Summary) -> None:
        self._bar.n = summary.done + summary.failed + summary.skipped
        self._bar.set_postfix(
            done=summary.done, failed=summary.failed, tokens=summary.tokens, refresh=False
        )
        self._bar.refresh()

    def close(self) -> None:
        self._bar.close()


class LogProgress:
    """A plain line every ``every_s`` seconds, for logs and pipes."""

    def __init__(self, stream: IO[str], every_s: float = 5.0) -> None:
        self._stream = stream
        self._every_s = every_s
        self._last = time.monotonic()

    def update(self, summary: Summary) -> None:
        if time.monotonic() - self._last >= self._every_s:
            self._last = time.monotonic()
            print(f"sibylq label: so far {summary.line()}", file=self._stream, flush=True)

    def close(self) -> None:
        pass


def progress_for(quiet: bool, total: int | None, stream: IO[str] = sys.stderr) -> Progress:
    if quiet:
        return NoProgress()
    if stream.isatty():
        return BarProgress(total, stream)
    return LogProgress(stream)
