"""The tokens and stop strings ``Llama.create_chat_completion`` would send for a conversation.

The batching engine decodes tokens itself, but its prompts must equal the one-job path's to
the token: the same chat template (the model's own, as llama-cpp-python picks it), the same
BOS handling, the same stop strings. Rather than re-implement the handler's choices, the
model's own chat handler is called with a stand-in for ``Llama`` that records what the handler
passes to ``create_completion`` and stops there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llama_cpp import Llama
from llama_cpp import llama_chat_format as chat_format

from wire.contract import Message
from wire.errors import BackendError

from .base import with_schema_instruction


@dataclass(frozen=True)
class ChatPrompt:
    tokens: tuple[int, ...]
    stop: tuple[str, ...]


def chat_messages(messages: tuple[Message, ...], schema: dict[str, Any] | None) -> list[Any]:
    """The conversation as the model sees it, with string contents (llama.cpp's text chat
    formats), the schema instruction added for JSON jobs. Producers refuse images for
    llama.cpp models before enqueueing; a job with images from elsewhere fails."""
    if any(message.images for message in messages):
        raise BackendError(
            "this llama.cpp worker takes no images (sibylq loads no multimodal projector yet); "
            "send image jobs to an openai: model"
        )
    chat: list[dict[str, Any]] = [
        {"role": message.role, "content": message.text} for message in messages
    ]
    return chat if schema is None else with_schema_instruction(chat, schema)


def chat_prompt(llm: Llama, messages: list[Any], stop: tuple[str, ...]) -> ChatPrompt:
    """What ``llm.create_chat_completion(messages=messages, stop=list(stop))`` would evaluate."""
    name = llm.chat_format or ""
    handler = (
        llm.chat_handler
        or llm._chat_handlers.get(name)
        or chat_format.get_chat_completion_handler(name)
    )
    recorder: Any = _Recorder(llm)  # stands in for the Llama the handler expects
    try:
        handler(llama=recorder, messages=messages, stop=list(stop) or None)
    except _Recorded as recorded:
        return recorded.prompt
    raise RuntimeError(f"the chat handler of {llm.chat_format} did not call create_completion")


class _Recorded(Exception):  # noqa: N818 - a signal carrying the prompt, not an error
    def __init__(self, prompt: ChatPrompt) -> None:
        super().__init__("recorded")
        self.prompt = prompt


class _Recorder:
    """Enough of ``Llama`` for a chat handler: it tokenizes with the real model, and its
    ``create_completion`` raises what it was given."""

    def __init__(self, llm: Llama) -> None:
        self._llm = llm
        self.verbose = False

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        return self._llm.tokenize(text, add_bos=add_bos, special=special)

    def create_completion(self, *, prompt: list[int], stop: Any = None, **_: Any) -> None:
        stops = [] if stop is None else [stop] if isinstance(stop, str) else list(stop)
        raise _Recorded(ChatPrompt(tuple(prompt), tuple(stops)))
