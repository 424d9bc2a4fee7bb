"""Which command made an output file's rows: ``OUT.manifest.json``, next to ``OUT``.

A re-run reuses ``OUT``'s rows only when its own manifest matches the one on disk: the same
model, task, prompt template, instruction, schema, generation settings, row key and format.
Rows made by another command are never mixed with this one's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from wire.errors import InvalidRequestError

from ..version import sibylq_version
from .ids import schema_digest
from .runner import LabelTask

MANIFEST_SUFFIX = ".manifest.json"
#: Bumped when the output's records change shape: older outputs are then not resumed.
MANIFEST_VERSION = 1
#: Shown in full when a re-run differs; longer values show as a hash prefix.
_SHOWN_CHARS = 160
#: Not compared (the version), or compared through the fields they derive from.
_NOT_SHOWN = frozenset({"sibylq_version", "fingerprint", "schema_sha256"})


class Manifest(BaseModel):
    """The command behind an output file. Every field but ``sibylq_version`` must match for
    a re-run to reuse the file's rows."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    manifest_version: int = MANIFEST_VERSION
    fingerprint: str
    model: str
    task: str
    template: str
    inst: str | None
    labels: list[str] | None = None
    # Stored as "schema"; ``schema`` itself would shadow a BaseModel attribute.
    schema_: dict[str, Any] | None = Field(alias="schema")
    schema_sha256: str
    genconf: dict[str, Any]
    id_field: str | None
    format: str
    sibylq_version: str

    @classmethod
    def for_run(cls, task: LabelTask, output_format: str, id_field: str | None) -> Manifest:
        schema = task.target.json_schema
        return cls(
            fingerprint=task.fingerprint,
            model=str(task.model.ref),
            task=str(task.kind),
            template=task.template.template,
            inst=task.inst,
            labels=None if task.labels is None else list(task.labels),
            schema_=schema,
            schema_sha256=schema_digest(schema),
            genconf=task.effective_genconf.model_dump(mode="json"),
            id_field=id_field,
            format=output_format,
            sibylq_version=sibylq_version(),
        )

    def differences(self, before: Manifest) -> list[str]:
        """What differs from ``before``, a phrase each: ``model "a" before, "b" now``."""
        changes: list[str] = []
        # A classification's schema differs with its labels: the labels say it better.
        hidden = _NOT_SHOWN | ({"schema_"} if before.labels != self.labels else set())
        for field in type(self).model_fields:
            if field not in hidden:
                changes += _changes(_name(field), getattr(before, field), getattr(self, field))
        if not changes and before.fingerprint != self.fingerprint:
            changes.append(f"fingerprint {before.fingerprint} before, {self.fingerprint} now")
        return changes

    def save(self, output: Path) -> None:
        """Write atomically: a crash leaves the old manifest or the new one, never half."""
        text = json.dumps(self.model_dump(mode="json", by_alias=True), indent=2) + "\n"
        write_atomically(manifest_path(output), text)

    @classmethod
    def load(cls, output: Path) -> Manifest | None:
        """The manifest of ``output``; None when there is none."""
        path = manifest_path(output)
        try:
            return cls.model_validate(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, ValidationError) as exc:
            raise InvalidRequestError(
                f"cannot read {path}, which says which command made {output}: {exc}. "
                "Give another -o, or add --overwrite to replace both"
            ) from exc


def write_atomically(path: Path, text: str) -> None:
    """``path`` holds ``text`` afterwards; a crash leaves the old file or the new one."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def manifest_path(output: Path) -> Path:
    return output.with_name(output.name + MANIFEST_SUFFIX)


def _changes(name: str, before: Any, now: Any) -> list[str]:
    if before == now:
        return []
    if name == "genconf" and isinstance(before, dict) and isinstance(now, dict):
        keys = sorted(set(before) | set(now))
        return [
            f"{name} {key} {_shown(before.get(key))} before, {_shown(now.get(key))} now"
            for key in keys
            if before.get(key) != now.get(key)
        ]
    return [f"{name} {_shown(before)} before, {_shown(now)} now"]


def _name(field: str) -> str:
    return field.rstrip("_").replace("_", " ")


def _shown(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    if len(text) <= _SHOWN_CHARS:
        return text
    return f"(sha256 {schema_digest(value)[:12]})"
