"""Python types <-> JSON schema: what the model must produce and how it comes back typed.

A target is built in the caller's process, before anything is enqueued, so an unsupported
type fails fast. Targets that are not JSON objects with properties (``str``, ``list[T]``,
``Literal``, enums, unions...) are wrapped as ``{"output": ...}`` for the model and unwrapped
on the way back; dataclasses, pydantic models and TypedDicts travel as they are.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from functools import lru_cache
from typing import Annotated, Any, Literal, get_args, get_origin, get_type_hints

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from pydantic import BaseModel, PydanticSchemaGenerationError, TypeAdapter, ValidationError
from pydantic.errors import PydanticInvalidForJsonSchema, PydanticUserError
from pydantic_core import PydanticSerializationError
from typing_extensions import is_typeddict

from wire.errors import InvalidRequestError, OutputValidationError, UnsupportedTargetError
from wire.schema_limits import MAX_DEPTH, check_schema

from .typeddicts import portable, unmarked

WRAP_KEY = "output"

_UNSUPPORTED = (
    PydanticSchemaGenerationError,
    PydanticInvalidForJsonSchema,
    PydanticUserError,
    PydanticSerializationError,  # an Enum whose values are not JSON
    TypeError,
    NameError,
)


@dataclass(frozen=True)
class Target:
    """The JSON schema a job's output must follow, and how to turn that JSON into a value."""

    json_schema: dict[str, Any] | None
    wrapped: bool = False
    adapter: TypeAdapter[Any] | None = field(default=None, compare=False)
    #: The value comes back as JSON text (``call()`` with ``GenConf(format="json")``).
    as_text: bool = False

    def parse(self, value: Any, *, raw_text: str = "", finish_reason: str = "") -> Any:
        """Convert a worker's JSON value into the target's Python value."""
        if self.wrapped:
            if not isinstance(value, dict) or WRAP_KEY not in value:
                raise OutputValidationError(
                    f"expected an object with key {WRAP_KEY!r}, got {value!r}",
                    raw_text=raw_text,
                    finish_reason=finish_reason,
                )
            value = value[WRAP_KEY]
        if self.as_text:
            return json.dumps(value, ensure_ascii=False)
        if self.adapter is None:
            return value
        try:
            return self.adapter.validate_python(value)
        except ValidationError as exc:
            raise OutputValidationError(
                f"output does not match the requested type: {exc}",
                raw_text=raw_text,
                finish_reason=finish_reason,
            ) from exc


TEXT = Target(json_schema=None)


def target_for(python_type: Any) -> Target:
    """The target for ``extract(python_type, ...)``; raises UnsupportedTargetError, or
    InvalidRequestError for a type whose schema breaks ``wire.schema_limits``. A list of
    values (``["red", "blue"]``) picks one of them, as in Sibila: ``classify_target``."""
    if isinstance(python_type, list | tuple):
        return classify_target(python_type)
    try:
        try:
            return _cached_target(python_type)
        except TypeError as exc:  # an unhashable type expression: build it every time
            if isinstance(exc, UnsupportedTargetError):
                raise
            return _build_target(python_type)
    except RecursionError:  # hashing the type, pydantic, even its repr: all recursive
        raise InvalidRequestError(
            f"the output type nests too deeply (at most {MAX_DEPTH} levels of JSON schema): "
            "flatten it"
        ) from None


@lru_cache(maxsize=512)
def _cached_target(python_type: Any) -> Target:
    return _build_target(python_type)


def _build_target(python_type: Any) -> Target:
    if inspect.isroutine(python_type):  # pydantic would validate a function's arguments
        raise UnsupportedTargetError(f"cannot use the function {python_type!r} as an output type")
    python_type = portable(python_type)  # typing.TypedDict: pydantic < 3.12 refuses it
    base, description = _split_annotated(python_type)
    try:
        adapter: TypeAdapter[Any] = TypeAdapter(python_type)
        schema = TypeAdapter(base).json_schema()
    except _UNSUPPORTED as exc:
        raise UnsupportedTargetError(
            f"cannot use {python_type!r} as an output type: {exc}. Use str, int, float, bool, "
            "list[T], dict[str, T], Literal, Enum, unions, dataclasses, pydantic models, "
            "TypedDicts, datetime or date."
        ) from exc
    if description:
        schema["description"] = description
    check_schema(schema)
    _describe_fields(base, schema)
    if _is_object_with_properties(schema):
        return Target(json_schema=schema, adapter=adapter)
    return Target(json_schema=_wrap(schema), wrapped=True, adapter=adapter)


def classify_target(labels: Any) -> Target:
    """The target for ``classify(labels, ...)``: a list of labels (strings, ints, floats or
    bools, all of one type, as Sibila requires), an Enum or a Literal. The label comes back
    in its own type."""
    if isinstance(labels, type) and issubclass(labels, Enum):
        if not list(labels):
            raise InvalidRequestError(f"enum {labels.__name__} has no members to choose from")
        return target_for(labels)
    if get_origin(labels) is Literal:
        _check_labels(get_args(labels))
        return target_for(labels)
    if isinstance(labels, str) or not isinstance(labels, Sequence):
        raise InvalidRequestError(
            "labels must be a list of strings, ints, floats or bools, an Enum or a Literal, "
            f"not {labels!r}"
        )
    _check_labels(labels)
    return _labels_target(type(labels[0]).__name__, tuple(labels))


@lru_cache(maxsize=512)
def _labels_target(kind: str, labels: tuple[Any, ...]) -> Target:
    """Keyed by the labels' type and order: ``Literal`` compares its values as a set (and
    ``1 == 1.0``), so ``target_for``'s cache would answer ``["b", "a"]`` with the schema of
    ``["a", "b"]``, and ``[1.0]`` with that of ``[1]``."""
    return _build_target(Literal[labels])


def json_target(json_schema: dict[str, Any] | str | None) -> Target:
    """The target for ``json(query, json_schema)``: any JSON object when no schema is given."""
    if json_schema is None:
        return Target(json_schema={"type": "object"})
    schema = _load_schema(json_schema)
    if _is_object_with_properties(schema) or schema.get("type") == "object":
        return Target(json_schema=schema)
    return Target(json_schema=_wrap(schema), wrapped=True)


_LABEL_TYPES = (str, int, float, bool)


def _check_labels(labels: Sequence[Any]) -> None:
    if not labels:
        raise InvalidRequestError("labels must not be empty: give at least one label")
    kind = type(labels[0])
    if kind not in _LABEL_TYPES or any(type(label) is not kind for label in labels):
        raise InvalidRequestError(
            "labels must all be of one type, str, int, float or bool (not mixed, as in "
            f"Sibila): {list(labels)!r}"
        )
    bad = [label for label in labels if not _usable_label(label)]
    if bad:
        raise InvalidRequestError(
            f"labels must be non-empty strings or finite numbers; bad labels: {bad!r}"
        )
    if len(set(labels)) != len(labels):
        raise InvalidRequestError(f"labels must be unique: {list(labels)!r}")


def _usable_label(label: Any) -> bool:
    if isinstance(label, str):
        return bool(label.strip())
    return not isinstance(label, float) or math.isfinite(label)


def _load_schema(json_schema: dict[str, Any] | str) -> dict[str, Any]:
    if isinstance(json_schema, str):
        try:
            json_schema = json.loads(json_schema)
        except json.JSONDecodeError as exc:
            raise InvalidRequestError(f"json_schema is not valid JSON: {exc}") from exc
        except RecursionError:
            raise InvalidRequestError(
                f"json_schema nests too deeply (at most {MAX_DEPTH} levels)"
            ) from None
    if not isinstance(json_schema, dict):
        raise InvalidRequestError(f"json_schema must be a JSON object, not {json_schema!r}")
    check_schema(json_schema)  # first: jsonschema's own check recurses
    try:
        Draft202012Validator.check_schema(json_schema)
    except SchemaError as exc:
        raise InvalidRequestError(f"json_schema is not a valid JSON schema: {exc.message}") from exc
    return json_schema


def _split_annotated(python_type: Any) -> tuple[Any, str | None]:
    """``Annotated[T, "desc"]`` -> (T, "desc"); pydantic ignores plain-string metadata."""
    if get_origin(python_type) is not Annotated:
        return python_type, None
    base, *metadata = get_args(python_type)
    texts = [item for item in metadata if isinstance(item, str)]
    others = [item for item in metadata if not isinstance(item, str)]
    if others:
        base = Annotated[(base, *others)]
    return base, " ".join(texts) or None


def _describe_fields(python_type: Any, schema: dict[str, Any]) -> None:
    """Copy ``Annotated[T, "text"]`` field descriptions of dataclasses, TypedDicts and
    pydantic models into the schema: pydantic ignores plain-string metadata."""
    for cls in _classes_in(python_type, set()):
        properties = _properties_of(schema, cls)
        for name, hint in get_type_hints(cls, include_extras=True).items():
            text = _split_annotated(unmarked(hint))[1]
            if text and name in properties:
                properties[name].setdefault("description", text)


def _classes_in(python_type: Any, seen: set[Any]) -> Iterator[type]:
    """Every dataclass, TypedDict and pydantic model reachable from ``python_type``."""
    if isinstance(python_type, type) and _has_fields(python_type):
        if python_type in seen:
            return
        seen.add(python_type)
        yield python_type
        for hint in get_type_hints(python_type, include_extras=True).values():
            yield from _classes_in(hint, seen)
    for argument in get_args(python_type):
        yield from _classes_in(argument, seen)


def _has_fields(cls: type) -> bool:
    return dataclasses.is_dataclass(cls) or is_typeddict(cls) or issubclass(cls, BaseModel)


def _properties_of(schema: dict[str, Any], cls: type) -> dict[str, Any]:
    node = schema.get("$defs", {}).get(cls.__name__)
    if node is None and schema.get("title") == cls.__name__:
        node = schema
    return dict[str, Any]() if node is None else node.get("properties", {})


def _is_object_with_properties(schema: dict[str, Any]) -> bool:
    return schema.get("type") == "object" and bool(schema.get("properties"))


def _wrap(schema: dict[str, Any]) -> dict[str, Any]:
    inner = dict(schema)
    defs = inner.pop("$defs", None)
    wrapped: dict[str, Any] = {
        "type": "object",
        "properties": {WRAP_KEY: inner},
        "required": [WRAP_KEY],
    }
    if defs:
        wrapped["$defs"] = defs
    return wrapped
