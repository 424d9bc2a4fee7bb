"""``Thread`` and ``Msg``: Sibila's conversation objects, with Sibila's shapes and semantics.

A thread holds an instruction (``inst``, the system message) and messages that alternate
between IN (the user) and OUT (the model). Adding a message of the same kind as the last one
joins it to that one (texts joined by ``join_sep``, images appended), as Sibila does. A thread
is built from another thread, a ``Msg``, a ChatML dict (``{"role", "content"}``), a
``(text, image)`` tuple or a plain string, or a list of any of those: strings and tuples take
the kind that comes next (IN first).

Images are URLs: ``http(s)://`` (the API fetches them; sibylq never does), ``data:image/...``,
or a local file, read at once and kept as a base64 data URL (``producer.images``).

Only the caller's process sees these objects: ``producer.messages`` turns a thread into the
job contract's messages, which are JSON.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Union, overload

from wire.errors import InvalidRequestError

from .images import image_url

#: An image as Sibila takes it: a URL or a local path, or a dict with a "url" key (and
#: optionally "detail"); a message takes one or a list of them.
Image = Union[str, Path, dict[str, str]]  # noqa: UP007 - a runtime alias, kept readable
Images = Union[Image, Sequence[Image], None]  # noqa: UP007
#: What a thread is built from or extended with.
ThreadLike = Union["Thread", "Msg", dict[str, Any], tuple[Any, ...], str, list[Any]]

_ROLES = {"IN": "user", "OUT": "assistant", "INST": "system"}


@dataclass
class Msg:
    """One message: its kind, its text and its images (dicts with a ``url`` key)."""

    class Kind(Enum):
        IN = "IN"  #: from the user
        OUT = "OUT"  #: from the model
        INST = "INST"  #: the instruction (system message)

        def as_chatml_role(self) -> str:
            return _ROLES[self.value]

        @staticmethod
        def from_chatml_role(role: str) -> Msg.Kind:
            for kind, chatml in _ROLES.items():
                if chatml == role:
                    return Msg.Kind(kind)
            raise InvalidRequestError(f"unknown ChatML role {role!r}: system, user or assistant")

        @staticmethod
        def flip(kind: Msg.Kind) -> Msg.Kind:
            return Msg.Kind.OUT if kind is Msg.Kind.IN else Msg.Kind.IN

    kind: Kind
    text: str
    images: list[dict[str, str]] | None = field(default=None)

    def __post_init__(self) -> None:
        if not isinstance(self.kind, Msg.Kind):
            raise InvalidRequestError(f"a Msg's kind is a Msg.Kind, not {self.kind!r}")
        if not isinstance(self.text, str):
            raise InvalidRequestError(f"a Msg's text is a string, not {self.text!r}")
        self.set_images(self.images)

    @staticmethod
    def make_IN(text: str, images: Images = None) -> Msg:  # noqa: N802 - Sibila's name
        return Msg(Msg.Kind.IN, text, images)  # type: ignore[arg-type]  # set_images resolves

    @staticmethod
    def make_OUT(text: str, images: Images = None) -> Msg:  # noqa: N802
        return Msg(Msg.Kind.OUT, text, images)  # type: ignore[arg-type]

    @staticmethod
    def make_INST(text: str, images: Images = None) -> Msg:  # noqa: N802
        return Msg(Msg.Kind.INST, text, images)  # type: ignore[arg-type]

    def set_images(self, images: Images) -> None:
        """Set the images: one or a list of URLs, paths or ``{"url": ...}`` dicts; local files
        are read now (raises InvalidRequestError for a missing or non-image file)."""
        if images is None:
            self.images = None
            return
        listed = images if isinstance(images, list | tuple) else [images]
        self.images = [_image(image) for image in listed]

    @property
    def has_images(self) -> bool:
        return bool(self.images)

    def clone(self) -> Msg:
        return Msg(self.kind, self.text, [dict(image) for image in self.images or []] or None)

    def join_same_kind(self, other: Msg, join_sep: str) -> None:
        """Append ``other``'s text (after ``join_sep``) and images to this message's."""
        if other.kind != self.kind:
            raise InvalidRequestError(f"cannot join a {other.kind.name} to a {self.kind.name}")
        self.text = _join(self.text, other.text, join_sep)
        if other.images:
            self.images = [*(self.images or []), *other.images]

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "text": self.text, "images": self.images}

    @staticmethod
    def from_dict(dic: dict[str, Any]) -> Msg:
        return Msg(Msg.Kind(dic["kind"]), dic["text"], dic.get("images"))

    def as_chatml(self) -> dict[str, Any]:
        """``{"role", "content"}``: content parts (text, then images) when there are images."""
        role = self.kind.as_chatml_role()
        if not self.images:
            return {"role": role, "content": self.text}
        parts: list[dict[str, Any]] = [{"type": "text", "text": self.text}] if self.text else []
        parts += [{"type": "image_url", "image_url": dict(image)} for image in self.images]
        return {"role": role, "content": parts}

    @staticmethod
    def from_chatml(dic: dict[str, Any], join_sep: str = "\n") -> Msg:
        """A message from a ChatML dict whose content is a string or a list of parts."""
        if not isinstance(dic.get("role"), str) or "content" not in dic:
            raise InvalidRequestError(
                f"bad message {dic!r}: a ChatML message has a role (system, user or "
                "assistant) and a content"
            )
        kind = Msg.Kind.from_chatml_role(dic["role"])
        content = dic["content"]
        if isinstance(content, str):
            return Msg(kind, content)
        if not isinstance(content, list):
            raise InvalidRequestError(f"a message's content is a string or a list of parts: {dic}")
        text, images = "", []
        for part in content:
            kind_of_part = part.get("type") if isinstance(part, dict) else None
            if kind_of_part == "text" and isinstance(part.get("text"), str):
                text = _join(text, part["text"], join_sep)
            elif kind_of_part == "image_url" and isinstance(part.get("image_url"), dict):
                images.append(part["image_url"])
            else:
                raise InvalidRequestError(
                    f"content part {part!r}: give {{'type': 'text', 'text': ...}} or "
                    "{'type': 'image_url', 'image_url': {'url': ...}}"
                )
        return Msg(kind, text, images or None)

    def __str__(self) -> str:
        shown = f"{self.kind.name}={self.text!r}"
        if self.images:
            urls = [_short(image["url"]) for image in self.images]
            shown += f" images={urls}"
        return shown

    __repr__ = __str__


class Thread(Sequence[Msg]):
    """IN and OUT messages, alternating, and an instruction ``inst`` (a Msg of kind INST)."""

    def __init__(self, t: ThreadLike | None = None, inst: str = "", join_sep: str = "\n") -> None:
        """``t``: a Thread, Msg, ChatML dict, ``(text, images)`` tuple or str, or a list of
        those. ``inst``: the instruction; when ``t`` is a thread with its own, ``inst`` comes
        first and the thread's follows, joined by ``join_sep`` (Sibila's order)."""
        self._msgs: list[Msg] = []
        self.inst = Msg.make_INST(inst)
        self.join_sep = join_sep
        if t is not None:
            self.concat(t)

    # -- building ---------------------------------------------------------------------------

    @staticmethod
    def make_IN(in_text: str, in_images: Images = None) -> Thread:  # noqa: N802
        thread = Thread()
        thread.add_IN(in_text, in_images)
        return thread

    @staticmethod
    def make_INST_IN(inst_text: str, in_text: str, in_images: Images = None) -> Thread:  # noqa: N802
        thread = Thread(inst=inst_text)
        thread.add_IN(in_text, in_images)
        return thread

    def init_INST_IN(self, inst_text: str, in_text: str, in_images: Images = None) -> None:  # noqa: N802
        self.clear()
        self.inst.text = inst_text
        self.add_IN(in_text, in_images)

    def add_IN(self, in_text: str, in_images: Images = None) -> None:  # noqa: N802
        self.add(Msg.Kind.IN, in_text, in_images)

    def add_OUT(self, out_text: str, out_images: Images = None) -> None:  # noqa: N802
        self.add(Msg.Kind.OUT, out_text, out_images)

    def add_OUT_IN(  # noqa: N802
        self, out_text: str, in_text: str, *, out_images: Images = None, in_images: Images = None
    ) -> None:
        self.add(Msg.Kind.OUT, out_text, out_images)
        self.add(Msg.Kind.IN, in_text, in_images)

    def add(
        self,
        t: Msg | dict[str, Any] | tuple[Any, ...] | str | Msg.Kind,
        text: str | None = None,
        images: Images = None,
    ) -> None:
        """Add one message: ``add(msg)``, ``add(chatml_dict)``, ``add((text, images))``,
        ``add("text")`` (the next kind), or ``add(Msg.Kind.IN, "text", images)``. A message
        of the last message's kind joins it; an INST one joins ``inst``."""
        msg = self._msg(t, text, images)
        if msg.kind is Msg.Kind.INST:
            self.inst.join_same_kind(msg, self.join_sep)
        elif not self._msgs or msg.kind is self.next_kind:
            self._msgs.append(msg)
        else:
            self._msgs[-1].join_same_kind(msg, self.join_sep)

    def _msg(self, t: object, text: str | None, images: Images) -> Msg:
        if text is not None:
            if not isinstance(t, Msg.Kind):
                raise InvalidRequestError("add(kind, text): with a text, give a Msg.Kind first")
            return Msg(t, text, images)  # type: ignore[arg-type]
        if isinstance(t, Msg):
            return t.clone()
        if isinstance(t, dict):
            return Msg.from_chatml(t, self.join_sep)
        if isinstance(t, tuple) and 1 <= len(t) <= 2 and isinstance(t[0], str):
            return Msg(self.next_kind, t[0], t[1] if len(t) == 2 else None)
        if isinstance(t, str):
            return Msg(self.next_kind, t, images)  # type: ignore[arg-type]
        raise InvalidRequestError(
            f"cannot make a message of {t!r}: give a Msg, a ChatML dict, a (text, image) tuple "
            "or a string"
        )

    def concat(self, t: ThreadLike) -> None:
        """Append a Thread (its messages, and its inst after this one's), a list of messages
        or one message."""
        if isinstance(t, Thread):
            for msg in t:
                self.add(msg)
            self.inst.join_same_kind(t.inst, self.join_sep)
        else:
            for item in t if isinstance(t, list) else [t]:
                self.add(item)

    def clone(self) -> Thread:
        return Thread(self, join_sep=self.join_sep)

    def clear(self, clear_inst: bool = True) -> None:
        self._msgs = []
        if clear_inst:
            self.inst.text = ""

    # -- reading ----------------------------------------------------------------------------

    @property
    def next_kind(self) -> Msg.Kind:
        """The kind the next string added will take: IN on an empty thread."""
        return Msg.Kind.flip(self._msgs[-1].kind) if self._msgs else Msg.Kind.IN

    @property
    def has_images(self) -> bool:
        return self.inst.has_images or any(msg.has_images for msg in self._msgs)

    def has_text_lower(self, text_lower: str) -> bool:
        return any(text_lower in msg.text.lower() for msg in self._msgs)

    def as_chatml(self, include_INST: bool = True) -> list[dict[str, Any]]:  # noqa: N803
        """The thread as ChatML dicts: the instruction first (when set), then the messages."""
        head = [self.inst.as_chatml()] if include_INST and self.inst.text else []
        return head + [msg.as_chatml() for msg in self._msgs]

    def as_dict(self) -> dict[str, Any]:
        return {
            "_msgs": [msg.as_dict() for msg in self._msgs],
            "inst": self.inst.as_dict(),
            "join_sep": self.join_sep,
        }

    @staticmethod
    def from_dict(state: dict[str, Any]) -> Thread:
        thread = Thread(join_sep=state.get("join_sep", "\n"))
        for dic in state["_msgs"]:
            thread.add(Msg.from_dict(dic))
        thread.inst = Msg.from_dict(state["inst"])
        return thread

    @staticmethod
    def ensure(query: ThreadLike, inst: str | None = None) -> Thread:
        """The thread a model method runs on. A str, tuple, Msg or list becomes a new thread
        whose instruction is ``inst``; a Thread is used as it is, or, with ``inst``, copied
        with ``inst`` first and its own instruction after (as Sibila merges them)."""
        if isinstance(query, Thread):
            return query if inst is None else Thread(query, inst, query.join_sep)
        thread = Thread(query)
        if inst is not None:
            thread.inst = Msg.make_INST(_join(inst, thread.inst.text, thread.join_sep))
        return thread

    def __len__(self) -> int:
        return len(self._msgs)

    @overload
    def __getitem__(self, index: int) -> Msg: ...
    @overload
    def __getitem__(self, index: slice) -> list[Msg]: ...
    def __getitem__(self, index: int | slice) -> Msg | list[Msg]:
        return self._msgs[index]

    def __delitem__(self, index: int) -> None:
        """Delete a message, keeping the alternation as Sibila does: a message between two of
        the same kind is deleted with the next one, whose text and images join the previous."""
        msgs = self._msgs
        index = range(len(msgs))[index]  # IndexError as a list raises it
        if 0 < index < len(msgs) - 1:
            msgs[index - 1].join_same_kind(msgs[index + 1], self.join_sep)
            del msgs[index + 1]
        del msgs[index]

    def get_iter(self, include_set_inst: bool) -> Iterator[Msg]:
        """The messages, after ``inst`` when ``include_set_inst`` and it is set."""
        if include_set_inst and self.inst.text:
            yield self.inst
        yield from self._msgs

    def save(self, path: str | Path) -> None:
        """Write the thread to a JSON file (``as_dict``)."""
        Path(path).write_text(json.dumps(self.as_dict(), indent=2), encoding="utf-8")

    def load(self, path: str | Path, clear: bool) -> None:
        """Read a thread saved with ``save``; with ``clear``, in place of this one's messages
        and instruction, else appended to them."""
        if clear:
            self.clear()
        self.concat(Thread.from_dict(json.loads(Path(path).read_text(encoding="utf-8"))))

    def __iter__(self) -> Iterator[Msg]:
        """The IN and OUT messages; ``inst`` is not one of them."""
        return iter(self._msgs)

    def __add__(self, other: ThreadLike) -> Thread:
        out = self.clone()
        out.concat(other)
        return out

    def __iadd__(self, other: ThreadLike) -> Thread:
        self.concat(other)
        return self

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Thread):
            return NotImplemented
        return (self._msgs, self.inst, self.join_sep) == (other._msgs, other.inst, other.join_sep)

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __str__(self) -> str:
        lines = [f"Thread inst={self.inst.text!r}, join_sep={self.join_sep!r}, len={len(self)}"]
        lines += [f"{index}: {msg}" for index, msg in enumerate(self._msgs)]
        return "\n".join(lines)

    __repr__ = __str__


def _image(image: object) -> dict[str, str]:
    if isinstance(image, str | Path):
        return {"url": image_url(image)}
    if isinstance(image, dict) and isinstance(image.get("url"), str):
        return {**image, "url": image_url(image["url"])}
    raise InvalidRequestError(
        f"image {image!r}: give a URL, a local file path or a dict with a 'url' key"
    )


def _join(first: str, second: str, sep: str) -> str:
    """Sibila's join: no separator around an empty text, none doubled."""
    if not second:
        return first
    if not first:
        return second
    return first + second if first.endswith(sep) else first + sep + second


def _short(url: str) -> str:
    return url if len(url) <= 64 else url[:64] + "(...)"
