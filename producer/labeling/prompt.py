"""Prompt templates over a row's fields: ``"Is this SMS spam? {text}"``."""

from __future__ import annotations

import string
from collections.abc import Mapping
from typing import Any

from wire.errors import InvalidRequestError


class PromptTemplate:
    """A ``str.format`` template; a row missing a field the template needs is an error."""

    def __init__(self, template: str) -> None:
        if not template.strip():
            raise InvalidRequestError("the prompt template is empty")
        try:
            parsed = list(string.Formatter().parse(template))
        except ValueError as exc:
            raise InvalidRequestError(f"bad prompt template {template!r}: {exc}") from exc
        self.template = template
        self.fields = {name.split(".")[0].split("[")[0] for _, name, _, _ in parsed if name}
        if "" in self.fields or any(name.isdigit() for name in self.fields):
            raise InvalidRequestError("name the template's fields, e.g. {text}, not {} or {0}")

    def render(self, fields: Mapping[str, Any]) -> str:
        missing = sorted(self.fields - set(fields))
        if missing:
            raise InvalidRequestError(f"row has no field {', '.join(map(repr, missing))}")
        return self.template.format_map(fields)
