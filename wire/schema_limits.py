"""What a job's JSON schema may be: checked before a job is enqueued, and again by the worker
before any backend sees it (a job pushed by hand or by an older producer).

A schema reaches recursive Python code (``json``, pydantic, jsonschema) and native code
(llama.cpp's grammar). The rules, the same for every backend:

- at most ``MAX_DEPTH`` levels of nested objects and arrays, and ``MAX_BYTES`` of JSON;
- every ``$ref`` is local (``#`` or ``#/a/json/pointer``) and resolves: a worker never fetches
  a schema; ``$dynamicRef`` and ``$recursiveRef`` are not supported;
- a ``$ref`` cycle must pass through an object's property or an array's items: a recursive
  data structure, such as a tree (a pydantic model with a ``list["Node"]`` field), is
  allowed: llama.cpp makes a grammar of it (measured with SmolLM2), the fake backend a value,
  and remote APIs get it as it is. A schema that reaches itself without nesting
  (``{"$ref": "#"}``, A -> B -> A, or through ``anyOf``/``allOf``...) is refused:
  jsonschema recurses forever on it, and llama.cpp's grammar for it crashes its process
  (SIGSEGV).

Every check is iterative: a hostile schema cannot exhaust the stack here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from wire.errors import InvalidRequestError

MAX_DEPTH = 64
MAX_BYTES = 256 * 1024

#: Keywords whose subschemas describe an object's members or an array's elements: a
#: ``$ref`` cycle through one of them nests, and so ends.
_NESTED_ONE = frozenset(
    {"additionalProperties", "additionalItems", "unevaluatedItems", "unevaluatedProperties",
     "contains", "propertyNames"}
)  # fmt: skip
_NESTED_MANY = frozenset({"properties", "patternProperties", "prefixItems"})
#: Keywords whose subschemas apply to the same value.
_SAME_ONE = frozenset({"not", "if", "then", "else"})
_SAME_MANY = frozenset({"allOf", "anyOf", "oneOf", "dependentSchemas"})
_DEFINITIONS = ("$defs", "definitions")
_UNSUPPORTED_REFS = ("$dynamicRef", "$recursiveRef")


def check_schema(schema: Any) -> None:
    """Raise InvalidRequestError, saying what to change, if ``schema`` breaks a rule above."""
    depth = _depth(schema)
    if depth > MAX_DEPTH:
        raise InvalidRequestError(
            f"the JSON schema nests {depth} levels deep or more; at most {MAX_DEPTH} are "
            "allowed: flatten the output type"
        )
    try:
        size = len(json.dumps(schema, allow_nan=False))  # JSON has no NaN, no infinity
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(f"the JSON schema is not JSON: {exc}") from exc
    if size > MAX_BYTES:
        raise InvalidRequestError(
            f"the JSON schema is {size} bytes of JSON; at most {MAX_BYTES} are allowed"
        )
    if isinstance(schema, dict):
        _check_refs(schema)


def _depth(value: Any) -> int:
    """How deep ``value``'s objects and arrays nest, counted up to just past MAX_DEPTH."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            deepest = max(deepest, depth)
            if depth > MAX_DEPTH:
                return depth
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children)
    return deepest


def _check_refs(root: dict[str, Any]) -> None:
    """Every ``$ref`` resolves, and none loops back without nesting."""
    edges: dict[str, list[tuple[str, bool]]] = {}
    pending = ["#", *_definitions(root)]
    while pending:
        pointer = pending.pop()
        if pointer not in edges:
            edges[pointer] = list(_refs_in(_resolve(root, pointer)))
            pending.extend(target for target, _ in edges[pointer])
    cycle = _unnested_cycle(edges)
    if cycle:
        raise InvalidRequestError(
            f"the JSON schema refers to itself without nesting ({' -> '.join(cycle)}): "
            "validators loop on it and llama.cpp cannot make a grammar of it. A recursive "
            "schema must recurse through an object property or array items, as a tree does"
        )


def _definitions(root: dict[str, Any]) -> Iterator[str]:
    """Pointers to every definition, referred to or not: each of their ``$ref`` must resolve."""
    for keyword in _DEFINITIONS:
        definitions = root.get(keyword)
        if isinstance(definitions, dict):
            yield from (f"#/{keyword}/{_escape(name)}" for name in definitions)


def _refs_in(schema: Any) -> Iterator[tuple[str, bool]]:
    """The ``$ref`` targets in ``schema`` and its subschemas (not through another ``$ref``,
    nor into definitions), each with whether an object member or array item is on the way."""
    stack = [(schema, False)]
    while stack:
        node, nested = stack.pop()
        if not isinstance(node, dict):
            continue
        for keyword in _UNSUPPORTED_REFS:
            if keyword in node:
                raise InvalidRequestError(f"{keyword} is not supported in a job's JSON schema")
        if "$ref" in node:
            yield _local(node["$ref"]), nested
        for keyword, value in node.items():
            stack.extend((child, nested or nests) for child, nests in _subschemas(keyword, value))


def _subschemas(keyword: str, value: Any) -> Iterator[tuple[Any, bool]]:
    if keyword == "items":
        keyword = "prefixItems" if isinstance(value, list) else "additionalItems"
    if keyword in _NESTED_ONE or keyword in _SAME_ONE:
        yield value, keyword in _NESTED_ONE
    elif keyword in _NESTED_MANY or keyword in _SAME_MANY:
        children = list(value.values()) if isinstance(value, dict) else value
        if isinstance(children, list):
            yield from ((child, keyword in _NESTED_MANY) for child in children)


def _local(ref: Any) -> str:
    if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
        raise InvalidRequestError(
            f"$ref {ref!r} is not supported: a job's schema may only refer to its own parts "
            '("#/$defs/Name"); a worker never fetches a schema'
        )
    return ref


def _resolve(root: dict[str, Any], pointer: str) -> Any:
    node: Any = root
    for token in pointer.removeprefix("#").split("/")[1:]:
        part = token.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise InvalidRequestError(f"$ref {pointer!r} does not resolve within the JSON schema")
    if not isinstance(node, dict | bool):
        raise InvalidRequestError(f"$ref {pointer!r} points to {node!r}, not a schema")
    return node


def _escape(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")


def _unnested_cycle(edges: dict[str, list[tuple[str, bool]]]) -> list[str]:
    """A cycle of ``$ref`` edges none of which nests, as pointers; empty if there is none."""
    state: dict[str, str] = {}  # pointer -> "open" (on the current path) or "done"
    for start in edges:
        if start in state:
            continue
        path = [start]
        todo = [iter([target for target, nested in edges[start] if not nested])]
        state[start] = "open"
        while todo:
            following = next(todo[-1], None)
            if following is None:
                state[path.pop()] = "done"
                todo.pop()
            elif state.get(following) == "open":
                return [*path[path.index(following) :], following]
            elif following not in state:
                state[following] = "open"
                path.append(following)
                todo.append(iter([t for t, nested in edges[following] if not nested]))
    return []
