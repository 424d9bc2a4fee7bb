"""``sibylq worker MODEL`` (or ``python -m workers MODEL``): a Celery worker on MODEL's queue
with the right pool for it."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from celery import Celery

from wire.connections import check_usable
from wire.errors import ConfigurationError, SibylqError
from wire.modelref import ModelRef, model_stem, parse_model_ref
from wire.providers import API_PROVIDERS, api_provider
from wire.settings import Settings, get_settings

from .supervisor import Child, child_command, split_concurrency, supervise

DESCRIPTION = (
    "Start a Celery worker serving MODEL's queue at SIBYLQ_BROKER_URL, with the pool that suits "
    "the model: prefork, one job a process, for llama.cpp (threads feeding one batching "
    "engine a process at SIBYLQ_LLAMA_BATCH>1); threads for remote APIs."
)
EPILOG = (
    "examples:\n  export SIBYLQ_BROKER_URL=redis://localhost:6379/0\n"
    "  sibylq worker llamacpp:smollm2\n  sibylq worker openai -c 128 --processes 2\n"
    "  GROQ_API_KEY=... sibylq worker groq   # every groq:<model> job (queue sibylq.groq)"
)


def add_worker_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The worker command's arguments (``sibylq worker`` and ``python -m workers``)."""
    parser.add_argument(
        "model",
        metavar="MODEL",
        help=f"{'|'.join(API_PROVIDERS)}[:name], llamacpp:<name or .gguf path>, or fake[:delay=S]",
    )
    parser.add_argument(
        "-c", "--concurrency", type=int, metavar="N", help="jobs at once (default: "
        "SIBYLQ_LLAMA_BATCH for llama.cpp, SIBYLQ_OPENAI_CONCURRENCY for APIs, 8 for fake)"
    )  # fmt: skip
    parser.add_argument(
        "-P", "--pool", help="Celery pool (default: prefork for llama.cpp unbatched, else threads)"
    )
    parser.add_argument("-Q", "--queue", help="consume this queue instead of the model's own")
    parser.add_argument("-l", "--loglevel", default="INFO", help="Celery's log level")
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        metavar="N",
        help="API workers: run N processes sharing -c, one GIL each",
    )
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "python -m workers") -> int:
    """Parse the worker command's arguments and run it; a configuration error exits 2."""
    parser = argparse.ArgumentParser(
        prog=prog, description=DESCRIPTION, epilog=EPILOG, formatter_class=_HelpFormatter
    )
    args = add_worker_arguments(parser).parse_args(argv)
    try:
        return run_worker(
            args.model,
            concurrency=args.concurrency,
            pool=args.pool,
            queue=args.queue,
            loglevel=args.loglevel,
            processes=args.processes,
        )
    except SibylqError as exc:
        print(f"sibylq: error: {exc}", file=sys.stderr)
        return 2


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The examples as written, and each option's default when it has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


@dataclass(frozen=True)
class PoolDefaults:
    pool: str
    concurrency: int


def pool_defaults(ref: ModelRef, settings: Settings) -> PoolDefaults:
    """APIs are I/O-bound: many threads share one HTTP client. ``Llama`` is not thread-safe:
    with batching (``SIBYLQ_LLAMA_BATCH`` > 1) a threads pool of that many hands its jobs to
    the process's one engine thread; without, one job per process (prefork)."""
    if api_provider(ref.provider) is not None:
        return PoolDefaults("threads", settings.openai_concurrency)
    if ref.provider == "llamacpp":
        batch = settings.llama_batch
        return PoolDefaults("threads", batch) if batch > 1 else PoolDefaults("prefork", 1)
    return PoolDefaults("threads", 8)


def llama_threads(processes: int) -> int:
    """CPU threads per llama.cpp process when ``SIBYLQ_LLAMA_N_THREADS`` is unset: the CPUs
    this worker may use, shared by its processes. (llama-cpp-python's own default, half the
    CPUs, assumes two hardware threads per core: on a 2-vCPU machine it leaves one idle, and
    a classification takes a third longer.)"""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus // max(1, processes))


def llama_environment(pool: str, concurrency: int, processes: int, settings: Settings) -> Settings:
    """The settings a llama.cpp worker's processes inherit: a threads pool's engine batches as
    many sequences as the pool has threads (prefork: one job a process, no batching), and
    unset CPU threads are shared among the processes that run llama.cpp."""
    batch = concurrency if pool == "threads" else 1
    os.environ["SIBYLQ_LLAMA_BATCH"] = str(batch)
    if settings.llama_n_threads is None:
        llama_processes = processes if pool == "threads" else concurrency
        os.environ["SIBYLQ_LLAMA_N_THREADS"] = str(llama_threads(llama_processes))
    get_settings.cache_clear()
    settings = get_settings()
    if batch > 1:
        print(
            f"sibylq: llama.cpp batching {batch} sequences a process: KV cache of "
            f"{batch} x n_ctx {settings.llama_n_ctx} = {batch * settings.llama_n_ctx} cells",
            file=sys.stderr,
        )
    return settings


def run_worker(
    model: str,
    *,
    concurrency: int | None = None,
    pool: str | None = None,
    queue: str | None = None,
    loglevel: str = "INFO",
    processes: int = 1,
) -> int:
    ref = parse_model_ref(model, any_api_model=True)
    os.environ["SIBYLQ_WORKER_MODEL"] = str(ref)
    get_settings.cache_clear()
    settings = get_settings()
    if ref.provider == "llamacpp":
        from .model_files import resolve_model_path

        resolve_model_path(ref.name, settings)  # fail now, not at the first job
    api = api_provider(ref.provider)
    if api is not None:
        api.api_key()  # MissingApiKeyError now (exit 2), not a 401 at every job
    for url in dict.fromkeys((settings.broker, settings.result_url)):
        check_usable(url, settings)  # exit now, not retry a refused password forever
    defaults = pool_defaults(ref, settings)
    pool, concurrency = pool or defaults.pool, concurrency or defaults.concurrency
    if ref.provider == "llamacpp":
        settings = llama_environment(pool, concurrency, processes, settings)
    if processes > 1:
        argv = [str(ref), f"--pool={pool}", f"--loglevel={loglevel}"]
        argv += [f"--queue={queue}"] if queue else []
        return run_processes(argv, pool, concurrency, processes, settings)
    from . import default_app

    node = f"sibylq-{ref.provider}-{model_stem(ref.name) or 'any'}-{os.getpid()}@%h"
    return celery_worker(
        default_app(),
        [
            "worker",
            f"--queues={queue or ref.queue}",
            f"--pool={pool}",
            f"--concurrency={concurrency}",
            f"--hostname={node}",
            f"--loglevel={loglevel}",
            "--without-gossip",
            "--without-mingle",
        ],
    )


def celery_worker(app: Celery, argv: list[str]) -> int:
    """Run ``celery worker`` in this process; returns its exit code.

    What ``app.worker_main(argv)`` does, except for the exit code: ``Celery.start`` runs the
    command with click's ``standalone_mode=False``, where click *returns* the code the worker
    exits with (1 after "Unrecoverable error"), and drops it: every stop looked like success
    (exit 0), and a supervisor restarting on failure never restarted the worker.
    """
    from celery.bin.celery import celery as command

    command.params[0].default = app  # the --app option, as Celery.start sets it
    try:
        code = command.main(args=argv, standalone_mode=False)
    finally:
        command.params[0].default = None
    return code if isinstance(code, int) else 0


def run_processes(
    argv: list[str], pool: str, concurrency: int, processes: int, settings: Settings
) -> int:
    """``argv``'s worker as ``processes`` processes sharing ``concurrency`` (a fixed metrics
    port becomes one port per process, counting up)."""
    if pool != "threads":
        raise ConfigurationError(
            "--processes is for threads pools (API workers); a prefork pool's -c is already "
            "its number of processes"
        )
    children = []
    for index, share in enumerate(split_concurrency(concurrency, processes)):
        port = settings.metrics_port
        env = {"SIBYLQ_METRICS_PORT": str(port + index)} if port else {}
        children.append(Child(child_command(argv, share), env))
    return supervise(children)
