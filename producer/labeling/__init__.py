"""Dataset labeling: classify or extract every row of a file or an iterable, resumably.

``label_file`` backs ``sibylq label``; ``label`` / ``label_async`` do the same for in-memory
records and yield results as they complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import importlib
import json
from collections.abc import AsyncGenerator, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from wire.contract import GenConf, JobKind
from wire.errors import InvalidRequestError

from ..models import Model
from ..pricing import price_for
from ..targets import Target, classify_target, json_target, target_for
from .lock import output_lock
from .manifest import Manifest
from .output import OutputFile, OutputFormat, Reuse, check_writable
from .progress import Progress, Summary
from .prompt import PromptTemplate
from .results import LabelResult
from .rows import head_read, read_rows, rows_from
from .runner import LabelTask, label_rows

__all__ = [
    "LabelResult",
    "LabelTask",
    "Reuse",
    "Summary",
    "label",
    "label_async",
    "label_file",
    "make_task",
]


def make_task(
    model: Model,
    *,
    prompt: str,
    classify: Any = None,
    extract: Any = None,
    inst: str | None = None,
    genconf: GenConf | None = None,
) -> LabelTask:
    """``classify``: labels (list, Enum, Literal); ``extract``: a Python type or a JSON
    schema dict. Exactly one of them."""
    if (classify is None) == (extract is None):
        raise InvalidRequestError("give exactly one of classify= (labels) or extract= (a type)")
    template = PromptTemplate(prompt)
    if classify is None:
        return LabelTask(model, JobKind.EXTRACT, _extract_target(extract), template, inst, genconf)
    target = classify_target(classify)
    labels = _labels_of(classify)
    return LabelTask(model, JobKind.CLASSIFY, target, template, inst, genconf, labels)


async def label_async(
    task: LabelTask,
    records: Iterable[Mapping[str, Any]],
    *,
    id_field: str | None = None,
    max_in_flight: int = 256,
    ordered: bool = False,
) -> AsyncGenerator[LabelResult, None]:
    """Label in-memory records; yields each row's result as it completes."""
    rows = rows_from(records, id_field=id_field, needs=task.template.fields)
    results = label_rows(task, rows, max_in_flight=max_in_flight, ordered=ordered)
    async with contextlib.aclosing(results):
        async for result in results:
            if isinstance(result, LabelResult):
                yield result


def label(
    task: LabelTask,
    records: Iterable[Mapping[str, Any]],
    *,
    id_field: str | None = None,
    max_in_flight: int = 256,
    ordered: bool = False,
) -> Iterator[LabelResult]:
    """``label_async`` for synchronous code: drives it on a private event loop."""
    loop = asyncio.new_event_loop()
    results = label_async(
        task, records, id_field=id_field, max_in_flight=max_in_flight, ordered=ordered
    )
    try:
        while True:
            try:
                yield loop.run_until_complete(results.__anext__())
            except StopAsyncIteration:
                return
    finally:
        loop.run_until_complete(results.aclose())
        loop.run_until_complete(task.model.client.aclose_listener())
        loop.close()


async def label_file(
    task: LabelTask,
    input_path: Path,
    output_path: Path,
    *,
    progress: Progress,
    id_field: str | None = None,
    max_in_flight: int = 256,
    ordered: bool = False,
    reuse: Reuse = Reuse.KEEP,
) -> Summary:
    """Label every row of ``input_path`` that ``output_path`` does not hold yet; resumable.

    Everything that can be checked before work starts is (InvalidRequestError): the input,
    the output's directory, that the output's rows were made by this same command
    (``OUT.manifest.json``), and the first row's fields against the template and
    ``id_field``. Nothing is written before the first row's result but ``OUT.lock``, which
    keeps a second run off the output while this one runs (``lock.py``)."""
    _check_input(input_path, output_path)
    output_path = _followed(output_path)
    check_writable(output_path)
    with output_lock(output_path):
        output_format = OutputFormat.for_path(output_path)
        output = OutputFile(output_path, Manifest.for_run(task, output_format, id_field), reuse)
        previous = output.previous()
        needs = task.template.fields
        rows = head_read(read_rows(input_path, id_field=id_field, needs=needs), input_path)
        summary = Summary(price=price_for(task.model.ref, task.model.client.connect()))
        results = label_rows(
            task,
            rows,
            previous=previous,
            retry_failed=reuse is Reuse.RETRY_FAILED,
            max_in_flight=max_in_flight,
            ordered=ordered,
        )
        try:
            async with contextlib.aclosing(results):  # stops the waits at once on an error
                async for result in results:
                    if isinstance(result, LabelResult):
                        output.write(result)
                    summary.add(result)
                    progress.update(summary)
            output.finish()
        finally:
            output.close()
            progress.close()
        return summary


def _check_input(input_path: Path, output_path: Path) -> None:
    if not input_path.is_file():
        raise InvalidRequestError(f"no input file {input_path}")
    try:
        input_path.open("rb").close()
    except OSError as exc:
        raise InvalidRequestError(f"cannot read input file {input_path}: {exc.strerror}") from exc
    if output_path.exists() and output_path.samefile(input_path):
        raise InvalidRequestError(f"-o {output_path} is the input file: name another output")


def _followed(output_path: Path) -> Path:
    """The file a symbolic link ``-o`` points to: the manifest goes next to it, and a rewrite
    (``--overwrite``, ``--retry-failed``) replaces it, not the link."""
    if not output_path.is_symlink():
        return output_path
    try:
        target = output_path.resolve(strict=False)
    except (OSError, RuntimeError) as exc:  # a loop of links
        raise InvalidRequestError(f"-o {output_path} is a link that leads nowhere: {exc}") from exc
    if not target.parent.is_dir():
        raise InvalidRequestError(
            f"-o {output_path} is a link to {target}, whose directory {target.parent} does "
            "not exist"
        )
    return target


def _labels_of(classify: Any) -> tuple[str, ...]:
    """The labels of a valid ``classify=``; a classification needs two at least (with one,
    every row gets it)."""
    if isinstance(classify, type) and issubclass(classify, enum.Enum):
        labels = tuple(str(member.value) for member in classify)
    elif get_origin(classify) is Literal:
        labels = tuple(str(label) for label in get_args(classify))
    else:
        labels = tuple(classify)
    if len(set(labels)) < 2:
        raise InvalidRequestError(
            f"classify needs two labels or more to choose from, not {list(labels)!r}"
        )
    return labels


def _extract_target(extract: Any) -> Target:
    if isinstance(extract, dict):
        return json_target(extract)
    return target_for(extract)


def load_extract_spec(spec: str) -> Any:
    """``--extract``: a JSON schema file, or ``module:Class``."""
    path = Path(spec)
    if path.suffix == ".json" or path.is_file():
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as exc:  # UnicodeDecodeError, JSONDecodeError
            raise InvalidRequestError(f"cannot read JSON schema {spec}: {exc}") from exc
    module_name, _, attribute = spec.partition(":")
    if not attribute:
        raise InvalidRequestError(
            f"--extract takes a .json schema file or module:Class, not {spec!r}"
        )
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise InvalidRequestError(f"cannot import {spec!r}: {exc}") from exc


def load_labels(spec: str) -> list[str]:
    """``--classify``: ``spam,ham`` or a file with one label per line."""
    path = Path(spec)
    if path.is_file():
        try:
            lines = path.read_text().splitlines()
        except (OSError, ValueError) as exc:  # UnicodeDecodeError
            raise InvalidRequestError(f"cannot read labels file {spec}: {exc}") from exc
        labels = [line.strip() for line in lines if line.strip()]
    else:
        labels = [label.strip() for label in spec.split(",")]
    if len(set(labels)) < 2:
        raise InvalidRequestError(
            f"--classify needs two labels or more, comma-separated (--classify spam,ham) or "
            f"one a line in a file, not {spec!r}"
        )
    return labels
