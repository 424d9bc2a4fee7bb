"""Prompt templates over a row's fields: ``"Is this SMS spam? {text}"``."""

from __future__ import annotations

import string
from collections.abc import Iterator, Mapping
from typing import Any

from wire.errors import InvalidRequestError

#: What may follow a field's ``!``: ``str.format`` knows these alone.
_CONVERSIONS = (None, "r", "s", "a")


class PromptTemplate:
    """A ``str.format`` template; a row missing a field the template needs, or whose values
    the template cannot format, is an error."""

    def __init__(self, template: str) -> None:
        if not template.strip():
            raise InvalidRequestError("the prompt template is empty")
        try:
            parsed = list(_fields(template))
        except ValueError as exc:
            raise InvalidRequestError(f"bad prompt template {template!r}: {exc}") from exc
        if any(conversion not in _CONVERSIONS for _, conversion in parsed):
            raise InvalidRequestError(
                f"bad prompt template {template!r}: a field's conversion is !r, !s or !a"
            )
        self.template = template
        self.fields = {name.split(".")[0].split("[")[0] for name, _ in parsed}
        if "" in self.fields or any(name.isdigit() for name in self.fields):
            raise InvalidRequestError("name the template's fields, e.g. {text}, not {} or {0}")

    def render(self, fields: Mapping[str, Any]) -> str:
        missing = sorted(self.fields - set(fields))
        if missing:
            raise InvalidRequestError(f"row has no field {', '.join(map(repr, missing))}")
        try:
            return self.template.format_map(fields)
        except (LookupError, AttributeError, ValueError, TypeError) as exc:
            # "{price:.2f}" over a CSV's text, "{text[5]}" over a shorter one...
            raise InvalidRequestError(
                f"the prompt template {self.template!r} cannot format this row's values: "
                f"{type(exc).__name__}: {exc}"
            ) from exc


def _fields(template: str) -> Iterator[tuple[str, str | None]]:
    """Each replacement field's name and conversion, those nested in format specs too
    (``{text:{width}}``)."""
    for _, name, spec, conversion in string.Formatter().parse(template):
        if name is not None:
            yield name, conversion
        if spec and "{" in spec:
            yield from _fields(spec)
