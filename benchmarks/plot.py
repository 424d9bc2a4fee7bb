"""The README's plot: throughput against concurrency (remote concurrency, and scaling)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .report import Result, median

PNG_NAME = "throughput_vs_concurrency.png"


def plot_throughput(results: list[Result], out: Path) -> Path | None:
    """Write ``out/throughput_vs_concurrency.png`` from the remote and scaling results (one
    panel each that ran); None when neither ran or matplotlib is missing."""
    panels = [result for result in results if result.name in ("remote", "scaling")]
    if not panels:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  (no plot: pip install matplotlib)")
        return None
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for axis, result in zip(axes[0], panels, strict=True):
        if result.name == "remote":
            _remote(axis, result)
        else:
            _scaling(axis, result)
    figure.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / PNG_NAME
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _remote(axis: Any, result: Result) -> None:
    samples = result.samples["throughput_req_s"]
    levels = sorted(int(level) for level in samples)
    for side, label, marker in (
        ("sibylq", "sibylq: one worker, 2 processes of threads", "o"),
        ("baseline", "asyncio + AsyncOpenAI + semaphore", "s"),
    ):
        axis.plot(
            levels, [median(samples[str(n)][side]) for n in levels], marker=marker, label=label
        )
    axis.plot(
        levels, [n / 0.25 for n in levels], linestyle=":", color="grey", label="ideal: N / 250 ms"
    )
    _log_axes(axis, levels)
    axis.set_xlabel("concurrency N (requests in flight)")
    axis.set_ylabel("requests/s")
    axis.set_title("Remote API stub, 250 ms per request")
    axis.legend()


def _scaling(axis: Any, result: Result) -> None:
    samples = result.samples["throughput_jobs_s"]
    levels = sorted(int(level) for level in samples)
    one = median(samples[str(levels[0])])
    axis.plot(levels, [median(samples[str(n)]) for n in levels], marker="o", label="sibylq")
    axis.plot(levels, [n * one for n in levels], linestyle="--", label="linear (N x one worker)")
    axis.plot(
        levels, [n / 0.2 for n in levels], linestyle=":", color="grey", label="ideal: N / 200 ms"
    )
    _log_axes(axis, levels)
    axis.set_xlabel("workers (concurrency one each)")
    axis.set_ylabel("jobs/s")
    axis.set_title("fake:delay=0.2, scaling out")
    axis.legend()


def _log_axes(axis: Any, levels: list[int]) -> None:
    from matplotlib.ticker import FuncFormatter

    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xticks(levels, [str(n) for n in levels])
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    axis.yaxis.set_major_formatter(plain)
    axis.yaxis.set_minor_formatter(plain)
    axis.grid(True, which="both", alpha=0.3)
