"""Queries and instructions -> the contract's messages."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from wire.contract import Message
from wire.errors import InvalidRequestError

Query = str | Sequence[Message | Mapping[str, Any]]


def build_messages(query: Query, inst: str | None = None) -> tuple[Message, ...]:
    """``query`` is a string or a list of messages ({"role", "content"}); ``inst`` the system
    instruction. The conversation must end with a non-empty user message."""
    if isinstance(query, str):
        turns = [Message(role="user", content=query)]
    elif isinstance(query, Sequence):
        turns = [_message(item) for item in query if not isinstance(item, str)]
        if len(turns) != len(query):
            raise InvalidRequestError("a list query holds messages ({role, content}), not strings")
    else:
        raise InvalidRequestError(f"query must be a string or a list of messages, not {query!r}")
    if inst is not None:
        if turns and turns[0].role == "system":
            raise InvalidRequestError("give the system instruction either as inst= or in query")
        turns.insert(0, Message(role="system", content=inst))
    _check(turns)
    return tuple(turns)


def _message(item: Message | Mapping[str, Any]) -> Message:
    if isinstance(item, Message):
        return item
    try:
        return Message.model_validate(item)
    except ValidationError as exc:
        raise InvalidRequestError(
            f"bad message {item!r}: each message needs a role (system, user or assistant) and "
            "a string content"
        ) from exc


def _check(turns: list[Message]) -> None:
    if not turns or turns[-1].role != "user":
        raise InvalidRequestError("the query must end with a user message")
    if not turns[-1].content.strip():
        raise InvalidRequestError("the query is empty: give the model something to answer")
