"""The probability a model gave each label of a classification, read at the choice point.

A classification's answer is ``{"output": <label>}`` with the label one of the schema's
``enum``. While the answer is generated, ``ChoiceProbe`` follows its text: once inside the
value and for as long as more than one label can still be written, each step's candidate
tokens (their text and log-probability, from local logits or an API's ``top_logprobs``) are
sorted by the labels they can begin. A token that fits one label gives that label its
probability; the labels the model then drops are settled. When labels share a beginning
(``"not spam"``, ``"not sure"``) and the model writes it, the next step divides what was
carried. A shared beginning the model did not write is divided evenly among its labels: the
model never said which it meant. Probabilities are renormalized over the tokens that fit a
label (what the schema's grammar allows there), so they sum to 1.

Backends know nothing of this but how to list a step's candidates: one core for the local
engine, the one-job llama path and OpenAI-compatible ``logprobs``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from typing import Any

#: The answer's text up to its value: ``{"output":`` with the whitespace JSON allows.
_VALUE_START = re.compile(r'\s*\{\s*"output"\s*:\s*')
#: What may follow a complete label inside the same token: the object's end.
_AFTER_LABEL = re.compile(r"\s*(\}\s*)?")


def choice_labels(schema: dict[str, Any] | None) -> list[Any] | None:
    """The labels of a classification's schema (``{"output": {"enum": [...]}}``, two or
    more), or None for any other job."""
    if schema is None:
        return None
    output = schema.get("properties", {}).get("output")
    labels = output.get("enum") if isinstance(output, dict) else None
    if not isinstance(labels, list) or len(labels) < 2:
        return None
    return labels


def label_key(label: Any) -> str:
    """How a label is named among the probabilities: a string label as itself, any other
    as its JSON text (``1``, ``true``)."""
    return label if isinstance(label, str) else json.dumps(label)


class ChoiceProbe:
    """Follows one answer; ``wants`` says whether the next step's candidates matter,
    ``observe`` takes them, ``result`` gives the probabilities once the choice is made."""

    def __init__(self, labels: list[Any]) -> None:
        self._texts = {label_key(label): _spellings(label) for label in labels}
        self._settled: dict[str, float] = dict.fromkeys(self._texts, 0.0)
        self._carried = 1.0  # the probability not yet settled on a label
        self._pending: list[tuple[frozenset[str], float]] | None = None
        self._observed = False

    @property
    def spellings(self) -> tuple[str, ...]:
        """Every label's JSON texts: what a token must be part of to fit a label."""
        return tuple(sorted({text for texts in self._texts.values() for text in texts}))

    def wants(self, text: str) -> bool:
        """Whether the step after ``text`` (the answer so far) is before the choice is made."""
        open_labels = self._open(text)
        self._resolve(open_labels)
        return open_labels is not None and len(open_labels) > 1

    def observe(self, text: str, candidates: Iterable[tuple[str, float]]) -> None:
        """The step after ``text``: each candidate token's text and log-probability."""
        value = self._value(text)
        assert value is not None, "observe only where wants() said so"
        groups: dict[frozenset[str], float] = {}
        for piece, logprob in candidates:
            if not piece:  # a special token (end of text...): it spells no label
                continue
            fits = self._fitting(value, piece)
            if fits:
                groups[fits] = groups.get(fits, 0.0) + math.exp(logprob)
        total = sum(groups.values())
        if total > 0:
            self._pending = [(fits, mass / total) for fits, mass in groups.items()]
            self._observed = True

    def result(self, text: str) -> dict[str, float] | None:
        """The probability of each label, given the whole answer; None when no step at the
        choice was observed (the answer never reached its value, or one label was left)."""
        self._resolve(self._open(text))
        if not self._observed:
            return None
        total = sum(self._settled.values())
        if total <= 0:
            return None
        return {key: mass / total for key, mass in self._settled.items()}

    def _value(self, text: str) -> str | None:
        start = _VALUE_START.match(text)
        return None if start is None else text[start.end() :]

    def _open(self, text: str) -> frozenset[str] | None:
        """The labels ``text`` can still become (None: not inside the value yet)."""
        value = self._value(text)
        if value is None:
            return None
        return self._fitting(value, "")

    def _fitting(self, value: str, piece: str) -> frozenset[str]:
        written = (value + piece).lstrip() if not value else value + piece
        return frozenset(
            key
            for key, spellings in self._texts.items()
            if any(_fits(label, written) for label in spellings)
        )

    def _resolve(self, now_open: frozenset[str] | None) -> None:
        """Settle the last observed step, now that the token the model chose is known by the
        labels still open after it."""
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        carried, followed = self._carried, 0.0
        for fits, share in pending:
            if now_open is not None and len(now_open) > 1 and fits == now_open:
                followed += share  # the model went on along this shared beginning
                continue
            for key in fits:
                self._settled[key] += carried * share / len(fits)
        self._carried = carried * followed


def _spellings(label: Any) -> tuple[str, ...]:
    """A label's JSON texts: escaped, as llama.cpp's grammar writes a string, and as is."""
    return tuple({json.dumps(label), json.dumps(label, ensure_ascii=False)})


def _fits(label: str, written: str) -> bool:
    """Whether ``written`` (the value so far) can become ``label``, or is it and ends the
    object."""
    if label.startswith(written):
        return True
    return written.startswith(label) and _AFTER_LABEL.fullmatch(written[len(label) :]) is not None
