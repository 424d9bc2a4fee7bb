"""``typing.TypedDict`` made acceptable to pydantic on every supported Python.

Before Python 3.12 pydantic refuses a ``typing.TypedDict`` (it needs the runtime details only
``typing_extensions.TypedDict`` keeps) and asks for ``typing_extensions.TypedDict`` instead.
sibylq accepts either: a ``typing`` TypedDict is rebuilt as a ``typing_extensions`` one with the
same name, fields, docstring, totality and ``Required``/``NotRequired`` keys, and type
expressions holding one (``list[Movie]``, ``Movie | None``, ``Annotated[Movie, "..."]``) are
rebuilt around it. A typing TypedDict inside a dataclass or a pydantic model is not reached:
those classes are the caller's own, and cannot be rebuilt without changing what they return.
"""

from __future__ import annotations

import functools
import operator
import types
from functools import lru_cache
from typing import (
    Annotated,
    Any,
    Literal,
    NotRequired,
    Required,
    Union,
    get_args,
    get_origin,
    get_type_hints,
)

import typing_extensions
from typing_extensions import is_typeddict


def is_typing_typeddict(python_type: Any) -> bool:
    """Whether ``python_type`` is a TypedDict class made by ``typing.TypedDict``."""
    return (
        isinstance(python_type, type)
        and is_typeddict(python_type)
        and type(python_type).__module__ == "typing"
    )


def portable(python_type: Any) -> Any:
    """``python_type`` with every ``typing.TypedDict`` in it rebuilt (``rebuild_typeddict``);
    the type itself when it holds none."""
    if is_typing_typeddict(python_type):
        return rebuild_typeddict(python_type)
    origin, args = get_origin(python_type), get_args(python_type)
    if not args or origin is Literal:
        return python_type
    new_args = tuple(portable(arg) for arg in args)
    if new_args == args:
        return python_type
    if origin is Annotated:
        return Annotated[(new_args[0], *python_type.__metadata__)]
    if origin is types.UnionType:
        return functools.reduce(operator.or_, new_args)
    if origin is Union:
        return Union[new_args]  # noqa: UP007 - rebuilding a typing.Union as it was
    return origin[new_args] if len(new_args) > 1 else origin[new_args[0]]


@lru_cache(maxsize=256)
def rebuild_typeddict(cls: type) -> type:
    """A ``typing_extensions.TypedDict`` equal to ``cls``: the same fields (their types made
    portable too), totality and required keys."""
    required = frozenset(getattr(cls, "__required_keys__", frozenset()))
    fields: dict[str, Any] = {}
    for name, hint in get_type_hints(cls, include_extras=True).items():
        marker = get_origin(hint)
        # A marker wins: typing's own __required_keys__ misses Required/NotRequired written
        # as strings (``from __future__ import annotations``) before Python 3.12.
        is_required = marker is Required or (marker is not NotRequired and name in required)
        hint = portable(unmarked(hint))
        fields[name] = Required[hint] if is_required else NotRequired[hint]
    total = getattr(cls, "__total__", True)
    rebuilt: type = typing_extensions.TypedDict(  # type: ignore[misc]
        cls.__name__, fields, total=total
    )
    rebuilt.__doc__ = cls.__doc__
    rebuilt.__module__ = cls.__module__
    rebuilt.__qualname__ = cls.__qualname__
    return rebuilt


def unmarked(hint: Any) -> Any:
    """``Required[T]`` or ``NotRequired[T]`` -> ``T`` (the keys sets already say which)."""
    while get_origin(hint) in (Required, NotRequired):
        hint = get_args(hint)[0]
    return hint
