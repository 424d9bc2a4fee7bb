"""``python -m benchmarks [NAME ...] [--quick] [--out DIR] [--rows N]``: run sibylq's benchmarks.

Each prints a table (metric | sibylq | baseline | ratio | target | met?) and writes
``DIR/<name>.json``; the run writes ``DIR/summary.json`` and, when the remote concurrency or
scaling benchmark ran, ``DIR/throughput_vs_concurrency.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from .env import BENCH_ENV, Context
from .report import Result, Row, Skipped

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def _registry() -> dict[str, Callable[[Context], Result]]:
    from . import fanout, labeling, llama, loop_lag, queue_overhead, remote, scaling

    return {
        queue_overhead.NAME: queue_overhead.run,
        remote.NAME: remote.run,
        llama.NAME: llama.run,
        fanout.NAME: fanout.run,
        labeling.NAME: labeling.run,
        scaling.NAME: scaling.run,
        loop_lag.NAME: loop_lag.run,
    }


def build_parser(names: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"benchmarks to run (default: all): {', '.join(names)}",
    )
    parser.add_argument("--quick", action="store_true", help="smoke sizes: seconds, not minutes")
    parser.add_argument(
        "--out",
        type=Path,
        help=f"JSON and PNG go here (default: {DEFAULT_OUT}, --quick: {DEFAULT_OUT / 'quick'})",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the scratch directory (worker and Redis logs)"
    )
    parser.add_argument(
        "--rows", type=int, help="rows of the bulk labeling run (default: 100000; --quick: 500)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    registry = _registry()
    args = build_parser(list(registry)).parse_args(argv)
    unknown = [name for name in args.names if name not in registry]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {list(registry)}", file=sys.stderr)
        return 2
    os.environ.update(BENCH_ENV)  # this process is a producer too: no answer cache
    # Stopped by `timeout` or kill: unwind, so that the workers and Redis it started (each in
    # a session of its own) are stopped too, not left running.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if args.out is None:
        args.out = DEFAULT_OUT / "quick" if args.quick else DEFAULT_OUT
    args.out.mkdir(parents=True, exist_ok=True)  # the summary is written even if all failed
    started = time.monotonic()
    results: list[Result] = []
    failed: list[str] = []
    with _scratch(args.keep) as scratch:
        ctx = Context(quick=args.quick, out=args.out, workdir=Path(scratch), rows=args.rows)
        for name in args.names or list(registry):
            result = _run_one(name, registry[name], ctx)
            if result is None:
                failed.append(name)
            elif result.rows:
                results.append(result)
    total_s = time.monotonic() - started
    _summarize(results, failed, args, total_s)
    return 1 if failed else 0


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _scratch(keep: bool) -> contextlib.AbstractContextManager[str]:
    if not keep:
        return tempfile.TemporaryDirectory(prefix="sibylq-bench-")
    kept = tempfile.mkdtemp(prefix="sibylq-bench-")
    print(f"scratch (kept): {kept}", flush=True)
    return contextlib.nullcontext(kept)


def _run_one(name: str, run: Callable[[Context], Result], ctx: Context) -> Result | None:
    """Run, print and write one benchmark; None if it failed (an empty Result if skipped)."""
    began = time.monotonic()
    try:
        result = run(ctx)
    except Skipped as skipped:
        print(f"== {name}: skipped: {skipped} ==\n", flush=True)
        return Result(name, "skipped", "", "")
    except Exception:
        print(f"== {name}: FAILED ==\n{traceback.format_exc()}", flush=True)
        return None
    result.wall_s = time.monotonic() - began
    result.write(ctx.out)
    print(result.table() + "\n", flush=True)
    return result


def _verdict(row: Row) -> str:
    """``metric: 0.93x (target >= 0.9x) met``."""
    assert row.target is not None
    on_ratio = row.target.on == "ratio" and row.ratio is not None
    times = "x" if row.unit == "x" else ""  # a ratio measured as such (same-block ratios)
    figure = f"{row.ratio:.2f}x" if on_ratio else f"{row.sibylq:.3g}{times}"
    verdict = {True: "met", False: "MISSED", None: "n/a"}[row.met]
    return f"{row.metric}: {figure} (target {row.target.text()}{times}) {verdict}"


def _summarize(
    results: list[Result], failed: list[str], args: argparse.Namespace, total_s: float
) -> None:
    from .plot import plot_throughput

    png = plot_throughput(results, args.out)
    targets = [(result.name, row) for result in results for row in result.targets]
    summary = {
        "quick": args.quick,
        "total_s": total_s,
        "failed": failed,
        "targets": [{"benchmark": name, **row.to_json()} for name, row in targets],
        "benchmarks": [result.name for result in results],
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"== summary ({total_s:.0f}s{', quick' if args.quick else ''}) ==")
    for name, row in targets:
        print(f"  {name}: {_verdict(row)}")
    if png is not None:
        print(f"  plot: {png}")
    for name in failed:
        print(f"  {name}: FAILED (see above)")


if __name__ == "__main__":
    sys.exit(main())
