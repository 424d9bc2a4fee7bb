"""Dataset labeling: classify or extract every row of a file or an iterable, resumably.

``label_file`` backs ``sibylq label``; ``label`` / ``label_async`` do the same for in-memory
records and yield results as they complete.
"""

from __future__ import annotations

import asyncio
import importlib
import json
from collections.abc import AsyncGenerator, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from wire.contract import GenConf, JobKind
from wire.errors import InvalidRequestError

from ..models import Model
from ..pricing import price_for
from ..targets import Target, classify_target, json_target, target_for
from .output import OutputFile, Previous
from .progress import Progress, Summary
from .prompt import PromptTemplate
from .results import LabelResult
from .rows import read_rows, rows_from
from .runner import LabelTask, label_rows

__all__ = [
    "LabelResult",
    "LabelTask",
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
    if classify is not None:
        kind, target = JobKind.CLASSIFY, classify_target(classify)
    else:
        kind, target = JobKind.EXTRACT, _extract_target(extract)
    return LabelTask(model, kind, target, PromptTemplate(prompt), inst, genconf)


async def label_async(
    task: LabelTask,
    records: Iterable[Mapping[str, Any]],
    *,
    id_field: str | None = None,
    max_in_flight: int = 256,
    ordered: bool = False,
) -> AsyncGenerator[LabelResult, None]:
    """Label in-memory records; yields each row's result as it completes."""
    rows = rows_from(records, id_field=id_field)
    async for result in label_rows(task, rows, max_in_flight=max_in_flight, ordered=ordered):
        if result is not None:
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
    retry_failed: bool = False,
) -> Summary:
    """Label every row of ``input_path`` not yet in ``output_path``; resumable."""
    output = OutputFile(output_path)
    if retry_failed:
        previous = output.scan()
        output.drop_failed()
    else:
        scanned = output.scan()
        previous = Previous(done=scanned.done | set(scanned.failed))
    summary = Summary(price=price_for(task.model.ref, task.model.client.settings))
    rows = read_rows(input_path, id_field=id_field)
    with output:
        try:
            async for result in label_rows(
                task, rows, previous=previous, max_in_flight=max_in_flight, ordered=ordered
            ):
                if result is not None:
                    output.write(result)
                summary.add(result)
                progress.update(summary)
        finally:
            progress.close()
    return summary


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
        except (OSError, json.JSONDecodeError) as exc:
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
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return [label.strip() for label in spec.split(",")]
