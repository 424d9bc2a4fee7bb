"""A model's facts (context, output limit, a prompt's token length), asked of a worker.

Only a worker serving the model knows them: the context it loaded the model with, the
tokenizer and chat template. An ``INFO`` job asks; the answers are kept per ``Model`` object
(the context once, token lengths per distinct prompt), so budgeting a prompt the way Sibila
allows costs one round trip per new question.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING

from pydantic import TypeAdapter

from wire.contract import JobKind, JobSpec, Message, ModelFacts

from .messages import Query, build_messages
from .targets import Target

if TYPE_CHECKING:
    from .models import Model

#: Token lengths kept per model: enough for a session's distinct prompts, bounded.
TOKEN_LENS_KEPT = 256

_FACTS = Target(json_schema=None, adapter=TypeAdapter(ModelFacts))
#: The message of an INFO job that asks only for the context (a job has at least one).
_NO_PROMPT = (Message(role="user", content="."),)


class FactsCache:
    """The facts a worker gave for one ``Model``."""

    def __init__(self, model: Model) -> None:
        self._model = model
        self._context: ModelFacts | None = None
        self._token_lens: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()

    def context(self, timeout: float | None = None) -> ModelFacts:
        """The model's context and output limit, asked once."""
        if self._context is None:
            self.ask(None, timeout)
        assert self._context is not None
        return self._context

    def token_len(self, query: Query, timeout: float | None = None) -> int:
        """Tokens ``query`` takes, asked once per distinct prompt."""
        messages = build_messages(query)
        key = json.dumps([message.model_dump() for message in messages])
        with self._lock:
            if key in self._token_lens:
                self._token_lens.move_to_end(key)
                return self._token_lens[key]
        facts = self._ask(messages, timeout)
        assert facts.token_len is not None
        with self._lock:
            self._token_lens[key] = facts.token_len
            while len(self._token_lens) > TOKEN_LENS_KEPT:
                self._token_lens.popitem(last=False)
        return facts.token_len

    def ask(self, query: Query | None, timeout: float | None = None) -> ModelFacts:
        """A fresh answer from a worker: the context, and ``query``'s length when given."""
        return self._ask(_NO_PROMPT if query is None else build_messages(query), timeout)

    def _ask(self, messages: tuple[Message, ...], timeout: float | None) -> ModelFacts:
        model = self._model
        spec = JobSpec(
            model=str(model.ref),
            kind=JobKind.INFO,
            messages=messages,
            ctx_len=model.wanted_ctx_len,
            max_tokens_limit=model.wanted_max_tokens_limit,
        )
        facts: ModelFacts = model.enqueue(spec, _FACTS).result(timeout)
        self._context = facts
        return facts
