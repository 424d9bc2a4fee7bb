"""Queries and instructions -> the contract's messages: the one place that conversion happens.

A query is what Sibila's model methods take: a string, a ``Thread``, a ``Msg``, a
``(text, image)`` tuple, or a list of messages (``Msg``, ChatML dicts, contract ``Message``s,
tuples, or alternating plain strings, user first). ``Thread.ensure`` gives it Sibila's
semantics (``inst`` merged before a thread's own instruction); this module checks the result
and writes it as JSON-ready ``Message``s.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from wire.contract import Message
from wire.errors import InvalidRequestError
from wire.modelref import ModelRef

from .thread import Msg, Thread, ThreadLike

Query = (
    str
    | Thread
    | Msg
    | tuple[Any, ...]
    | Sequence[Message | Msg | Mapping[str, Any] | tuple[Any, ...] | str]
)

#: Providers whose workers take no images: llama.cpp workers load no multimodal projector yet,
#: so a job with images for one fails here, before it is sent. Every other provider (an
#: OpenAI-compatible API, or ``fake``) takes OpenAI's content parts.
_NO_IMAGES = frozenset({"llamacpp"})
_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
_EMPTY = "the query is empty: give the model something to answer"


def build_messages(
    query: Query, inst: str | None = None, *, model: ModelRef | None = None
) -> tuple[Message, ...]:
    """The job's messages for ``query`` and the system instruction ``inst``. Raises
    InvalidRequestError for an empty query, a malformed message, or images ``model`` cannot
    take; warns (and goes on, as Sibila does) when the thread does not start or end with a
    user message."""
    if isinstance(query, str):  # the common case, at labeling scale: no Thread on the way
        _check_vision(model, has_images=False)
        return _plain(query, inst)
    thread = Thread.ensure(_thread_like(query), inst)
    _check(thread)
    _check_vision(model, has_images=thread.has_images)
    return tuple(_message(chatml) for chatml in thread.as_chatml())


def _check_vision(model: ModelRef | None, *, has_images: bool) -> None:
    if model is None or model.provider not in _NO_IMAGES:
        return
    instead = (
        "Send image queries to an openai: model, or to an OpenAI-compatible server with a "
        "vision model (llama.cpp's own server with --mmproj, say) through OPENAI_BASE_URL"
    )
    if "*" in model.name:
        raise InvalidRequestError(
            f"{model}: sibylq's llama.cpp workers load no multimodal projector yet (Sibila's "
            f"'model.gguf*mmproj.gguf'); use llamacpp:<model> for text. {instead}"
        )
    if has_images:
        raise InvalidRequestError(
            f"{model} cannot take images: sibylq's llama.cpp workers load no multimodal "
            f"projector yet. {instead}"
        )


def _plain(query: str, inst: str | None) -> tuple[Message, ...]:
    """What ``Thread.ensure(query, inst).as_chatml()`` gives for a string, made directly."""
    if not query.strip():
        raise InvalidRequestError(_EMPTY)
    user = Message(role="user", content=query)
    return (Message(role="system", content=inst), user) if inst else (user,)


def _thread_like(query: object) -> ThreadLike:
    if isinstance(query, Message):
        return _item(query)  # type: ignore[no-any-return]
    if isinstance(query, str | Thread | Msg | tuple | dict):
        return query
    if isinstance(query, Sequence):
        return [_item(item) for item in query]
    raise InvalidRequestError(
        f"query must be a string, a Thread, a Msg, a (text, image) tuple or a list of messages, "
        f"not {query!r}"
    )


def _item(item: object) -> Any:
    if isinstance(item, Message):
        return item.model_dump(mode="json", exclude_none=True)
    if isinstance(item, Mapping) and not isinstance(item, dict):
        return dict(item)
    return item


def _check(thread: Thread) -> None:
    last = thread[-1] if len(thread) else None
    if last is None or (last.kind is Msg.Kind.IN and not last.text.strip() and not last.images):
        raise InvalidRequestError(_EMPTY)
    if thread[0].kind is not Msg.Kind.IN:
        _warn("the thread's first message is not a user (IN) message")
    if last.kind is not Msg.Kind.IN:
        _warn(
            "the thread's last message is not a user (IN) message: the model continues after "
            "its own answer"
        )


def _warn(message: str) -> None:
    """Warn at the caller's line: the first frame outside sibylq's producer package."""
    frame, level = sys._getframe(1), 2  # level 2: the frame that called _warn
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1  # type: ignore[assignment]
    warnings.warn(message, UserWarning, stacklevel=level)


def _message(chatml: dict[str, Any]) -> Message:
    try:
        return Message.model_validate(chatml)
    except ValidationError as exc:
        reasons = "; ".join(error["msg"] for error in exc.errors())
        raise InvalidRequestError(f"bad message {_shown(chatml)}: {reasons}") from exc


def _shown(chatml: dict[str, Any]) -> str:
    text = repr(chatml)
    return text if len(text) <= 200 else text[:200] + "...}"
