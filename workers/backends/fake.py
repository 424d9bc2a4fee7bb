"""The ``fake`` backend: schema-valid output with no model at all, after an optional delay.

For dry runs, pipeline tests and benchmarks: ``fake`` or ``fake:delay=0.2`` (seconds). A delay
past the job's time limit ends at the limit, as a ``JobTimeLimitError``.
"""

from __future__ import annotations

import json
import time
from typing import Any

from wire.contract import Usage
from wire.errors import BackendError
from wire.modelref import fake_delay_s

from .base import Completion, CompletionRequest, ModelContext, TokenCount

#: The context the fake model claims: what ``max_tokens`` 0 or negative resolves against.
FAKE_CTX_LEN = 4096

_FORMAT_EXAMPLES = {
    "date-time": "2024-01-01T00:00:00Z",
    "date": "2024-01-01",
    "time": "00:00:00",
    "email": "someone@example.com",
    "uri": "https://example.com",
    "uuid": "00000000-0000-4000-8000-000000000000",
}


class FakeBackend:
    def context(self, model: str) -> ModelContext:
        return ModelContext(ctx_len=FAKE_CTX_LEN)

    def count_tokens(self, request: CompletionRequest) -> TokenCount:
        """One token a word: the count its completions report as ``prompt_tokens``."""
        return TokenCount(_word_count(request), exact=True)

    def complete(self, request: CompletionRequest) -> Completion:
        delay_s = fake_delay_s(request.options)
        deadline = request.deadline
        if deadline is not None and delay_s >= deadline.remaining_s():
            time.sleep(max(0.0, deadline.remaining_s()))
            raise deadline.error()
        if delay_s:  # sleep(0) still yields the CPU: a cost when every core is busy
            time.sleep(delay_s)
        if request.json_schema is None:
            text = "fake output"
        else:
            text = json.dumps(example_value(request.json_schema))
        return Completion(
            text=text,
            finish_reason="stop",
            usage=Usage(prompt_tokens=_word_count(request), completion_tokens=len(text.split())),
            model="fake",
        )


def _word_count(request: CompletionRequest) -> int:
    """Words of the prompt's text; images (which the fake model accepts) count for nothing."""
    return sum(len(message.text.split()) for message in request.messages)


def example_value(
    schema: dict[str, Any], root: dict[str, Any] | None = None, refs: tuple[str, ...] = ()
) -> Any:
    """A small value that validates against ``schema`` (the subset sibylq's targets produce).
    ``refs``: the ``$ref`` being expanded; a recursive schema (a tree) ends where an array of
    one may be empty."""
    root = schema if root is None else root
    if "$ref" in schema:
        ref = schema["$ref"]
        if ref in refs:
            raise BackendError(
                f"the fake backend has no finite value for {ref}: it requires itself"
            )
        return example_value(_resolve(ref, root), root, (*refs, ref))
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            return example_value(schema[key][0], root, refs)
    kind = schema.get("type", "object")
    if isinstance(kind, list):
        kind = kind[0]
    return _EXAMPLES_BY_TYPE[kind](schema, root, refs)


def _resolve(ref: str, root: dict[str, Any]) -> dict[str, Any]:
    node: Any = root
    for part in ref.removeprefix("#").split("/")[1:]:
        node = node[part]
    return dict(node)


def _example_object(
    schema: dict[str, Any], root: dict[str, Any], refs: tuple[str, ...]
) -> dict[str, Any]:
    properties = schema.get("properties", {})
    return {
        name: example_value(properties[name], root, refs) for name in schema.get("required", [])
    }


def _example_array(
    schema: dict[str, Any], root: dict[str, Any], refs: tuple[str, ...]
) -> list[Any]:
    items = schema.get("items", {"type": "string"})
    fewest = 0 if items.get("$ref") in refs else 1  # a tree's leaves have no children
    count = max(int(schema.get("minItems", fewest)), fewest)
    return [example_value(items, root, refs) for _ in range(count)]


def _example_string(schema: dict[str, Any], *_: Any) -> str:
    text = _FORMAT_EXAMPLES.get(schema.get("format", ""), "fake")
    return text.ljust(int(schema.get("minLength", 0)), "x")


def _example_number(schema: dict[str, Any], *_: Any) -> float:
    return float(schema.get("minimum", 0))


def _example_integer(schema: dict[str, Any], *_: Any) -> int:
    return int(schema.get("minimum", 0))


_EXAMPLES_BY_TYPE: dict[str, Any] = {
    "object": _example_object,
    "array": _example_array,
    "string": _example_string,
    "number": _example_number,
    "integer": _example_integer,
    "boolean": lambda *_: True,
    "null": lambda *_: None,
}
